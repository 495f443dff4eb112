"""FAVOR+ positive random features (Performer, Choromanski et al. 2021)."""

from __future__ import annotations

import torch

from macformer.features.base import FeatureMap
from macformer.features.samplers import get_sampler

__all__ = ["PositiveRandomFeatures"]


class PositiveRandomFeatures(FeatureMap):
    """phi(x) = m^-1/2 exp(W x - |x|^2 / 2) with m = num_features rows of W (orthogonal blocks with
    chi(d) row norms by default).

    E[phi(x) . phi(y)] = exp(x . y) on the map's own input; with x = q d^-1/4 (applied by the
    attention layer) attention estimates softmax attention. Features are positive, so attention
    denominators are too. For queries (`is_query=True`) the per-row maximum of the exponent is
    subtracted: a per-row constant factor, which cancels between numerator and denominator.
    """

    def __init__(
        self,
        dim: int,
        num_features: int,
        sampler: str = "orthogonal",
        seed: int | None = None,
        redraw_interval: int | None = None,
    ) -> None:
        super().__init__(dim, num_features, seed, redraw_interval)
        self.sampler = get_sampler(sampler)
        self.sampler_name = sampler
        self.register_buffer("weights", torch.zeros(num_features, dim))
        self._draw(self._generator())

    def _draw(self, generator: torch.Generator) -> None:
        self._set_buffer("weights", self.sampler(self.num_features, self.dim, generator))

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        exponent = x @ self.weights.T.to(x.dtype) - 0.5 * x.square().sum(-1, keepdim=True)
        if is_query:
            exponent = exponent - exponent.amax(-1, keepdim=True).detach()
        return exponent.exp() * self.num_features**-0.5

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sampler={self.sampler_name}"
