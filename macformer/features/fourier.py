"""Random Fourier features (RFA, Peng et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn

from macformer.features.base import FeatureMap, _check_positive_int
from macformer.features.samplers import get_sampler

__all__ = ["RandomFourierFeatures"]


class RandomFourierFeatures(FeatureMap):
    """phi(x) = m^-1/2 [sin(sigma W x), cos(sigma W x)] with m = num_features / 2 Gaussian rows W.

    E[phi(x) . phi(y)] = exp(-sigma^2 |x - y|^2 / 2) (the Gaussian kernel) on the map's own input.
    For unit-norm x, y this is exp(-sigma^2) exp(sigma^2 x . y): attention with l2-normalised q and k
    and sigma = 1/tau estimates softmax attention with temperature tau^2, the constant cancelling.

    Args:
        sigma: initial bandwidth (> 0).
        learned_sigma: learn one sigma per head (needs num_heads; inputs are [..., heads, seq, dim]).
        sampler: how W is drawn (see `macformer.features.samplers.SAMPLERS`).
    """

    def __init__(
        self,
        dim: int,
        num_features: int,
        sigma: float = 1.0,
        learned_sigma: bool = False,
        num_heads: int | None = None,
        sampler: str = "gaussian",
        seed: int | None = None,
        redraw_interval: int | None = None,
    ) -> None:
        super().__init__(dim, num_features, seed, redraw_interval)
        if num_features % 2:
            raise ValueError(f"random Fourier features come in sin/cos pairs: num_features must be even, "
                             f"got {num_features}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        self.sampler = get_sampler(sampler)
        self.sampler_name = sampler
        if learned_sigma:
            _check_positive_int("num_heads (needed by learned_sigma)", num_heads)
            # log-parameterised so sigma stays positive.
            self.log_sigma = nn.Parameter(torch.full((num_heads, 1, 1), float(sigma)).log())
        else:
            self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.register_buffer("weights", torch.zeros(num_features // 2, dim))
        self._draw(self._generator())

    def _draw(self, generator: torch.Generator) -> None:
        self._set_buffer("weights", self.sampler(self.num_features // 2, self.dim, generator))

    def bandwidth(self) -> torch.Tensor:
        return self.log_sigma.exp() if hasattr(self, "log_sigma") else self.sigma

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        projections = (x @ self.weights.T.to(x.dtype)) * self.bandwidth().to(x.dtype)
        half = self.num_features // 2
        return torch.cat([projections.sin(), projections.cos()], dim=-1) * half**-0.5

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sampler={self.sampler_name}, learned_sigma={hasattr(self, 'log_sigma')}"
