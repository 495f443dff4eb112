"""Spectraformer's random features: a (component function, weight matrix) pair (Nguyen et al. 2024).

Every component here is a member of the GERF family (generalised exponential random features,
Likhosherstov et al. 2022), which estimates the softmax kernel exp(x . y) with rows w ~ N(0, I):

    f_s(w, x) = (1 - 4A)^(d/4) exp(A |w|^2 + B w . x - s |x|^2 / 2),  B = sqrt(s (1 - 4A)),

and E[f_+1(w, x) f_+1(w, y)] = E[Re f_-1(w, x) conj(f_-1(w, y))] = exp(x . y) for any A < 1/8
(finite variance). s = +1 gives positive features; s = -1 gives real trigonometric pairs
(1 - 4A)^(d/4) exp(A |w|^2 + |x|^2 / 2) [cos(b w . x), sin(b w . x)], b = sqrt(1 - 4A).

- trigrf (s = -1, A = 0): RFA's sin/cos features. Without their exp(|x|^2 / 2) factor they estimate
  the Gaussian kernel exp(-|x - y|^2 / 2); for l2-normalised q, k (RFA) that factor is a constant.
- posrf (s = +1, A = 0): Performer's FAVOR+ positive features exp(w . x - |x|^2 / 2).
- oprf (s = +1, A = A*(rho)): the A minimising the variance for inputs with |x + y|^2 = rho d,
  A* = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16 <= 0 (positive, optimised).
- gerf: any (s, A) with A < 1/8, the family's free parameters.

To estimate softmax attention, feed q d^-1/4 and k d^-1/4 (the attention layer does; or ppSBN'd q, k).
The weight matrix is one of `macformer.features.samplers.SAMPLERS`, or "fastfood_learned"
(FastFoodL: FastFood blocks whose S, G, B are trained, the permutation fixed; never redrawn).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from macformer.errors import MacformerError, check_positive_int
from macformer.features.base import FeatureMap
from macformer.features.samplers import SAMPLERS, fastfood_matrix, fastfood_parameters, get_sampler

__all__ = ["COMPONENTS", "LEARNED_WEIGHTS", "WEIGHTS", "SpectralFeatures", "gerf_parameters", "oprf_a"]

COMPONENTS = ("trigrf", "posrf", "oprf", "gerf")
LEARNED_WEIGHTS = ("fastfood_learned",)
WEIGHTS = (*SAMPLERS, *LEARNED_WEIGHTS)


def oprf_a(rho: float) -> float:
    """OPRF's variance-minimising A for inputs with |x + y|^2 / d = rho (A = 0 at rho = 0)."""
    return (1 - 2 * rho - math.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def default_oprf_rho(dim: int) -> float:
    """|x + y|^2 / d for independent x, y with unit-variance entries scaled by d^-1/4: 2 / sqrt(d)."""
    return 2 / math.sqrt(dim)


def gerf_parameters(component: str, dim: int, gerf_a: float = 0.0, gerf_sign: int = 1,
                    oprf_rho: float | None = None) -> tuple[int, float]:
    """(s, A) of a component; checks the GERF conditions."""
    if component == "trigrf":
        return -1, 0.0
    if component == "posrf":
        return 1, 0.0
    if component == "oprf":
        rho = default_oprf_rho(dim) if oprf_rho is None else oprf_rho
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise MacformerError(f"oprf_rho must be a finite number >= 0 (the mean |x + y|^2 / d), got {rho!r}")
        return 1, oprf_a(rho)
    if component == "gerf":
        if gerf_sign not in (1, -1):
            raise MacformerError(f"gerf_sign must be +1 (positive) or -1 (trigonometric), got {gerf_sign!r}")
        if not (isinstance(gerf_a, (int, float)) and math.isfinite(gerf_a) and gerf_a < 0.125):
            raise MacformerError(f"gerf_a must be a finite number below 1/8 (finite variance), got {gerf_a!r}")
        return gerf_sign, float(gerf_a)
    raise MacformerError(f"unknown component function {component!r}; valid choices: {', '.join(COMPONENTS)}")


class LearnedFastFood(nn.Module):
    """FastFoodL weights: FastFood blocks with trainable S, G, B and a fixed random permutation."""

    def __init__(self, num_rows: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        scales, gaussians, signs, permutations = fastfood_parameters(num_rows, dim, generator)
        self.num_rows, self.dim = num_rows, dim
        self.scales, self.gaussians, self.signs = (nn.Parameter(t) for t in (scales, gaussians, signs))
        self.register_buffer("permutations", permutations)

    def forward(self) -> torch.Tensor:
        return fastfood_matrix(self.scales, self.gaussians, self.signs, self.permutations, self.dim)[: self.num_rows]


class SpectralFeatures(FeatureMap):
    """phi(x) = m^-1/2 [f(w_1, x), ..., f(w_m, x)] for a GERF component f and weight rows w_i,
    with E[phi(x) . phi(y)] = exp(sigma^2 x . y) on the map's own input.

    Args:
        component: "trigrf", "posrf", "oprf" or "gerf" (see the module docstring).
        weights: how the rows w_i are drawn: a sampler name or "fastfood_learned".
        sigma: inputs are multiplied by sigma (RFA's bandwidth; 1 for softmax attention).
        learned_sigma: learn one sigma per head (needs num_heads; inputs are [..., heads, seq, dim]).
        gerf_a, gerf_sign: the free parameters of component "gerf"; oprf_rho: OPRF's expected
            |x + y|^2 / d (default 2 / sqrt(dim), unit-variance inputs scaled by d^-1/4).
    Trigonometric components use num_features / 2 rows (a cos and a sin feature each); positive ones
    use num_features rows. For queries (`is_query=True`) a per-row factor that cancels in the
    attention ratio is dropped: the row maximum of the exponent, or exp(|x|^2 / 2).
    """

    def __init__(
        self,
        dim: int,
        num_features: int,
        component: str = "posrf",
        weights: str = "orthogonal",
        sigma: float = 1.0,
        learned_sigma: bool = False,
        num_heads: int | None = None,
        gerf_a: float = 0.0,
        gerf_sign: int = 1,
        oprf_rho: float | None = None,
        seed: int | None = None,
        redraw_interval: int | None = None,
    ) -> None:
        super().__init__(dim, num_features, seed, redraw_interval)
        self.component = component
        self.sign, self.a = gerf_parameters(component, dim, gerf_a, gerf_sign, oprf_rho)
        if self.sign < 0 and num_features % 2:
            raise MacformerError(f"trigonometric features come in cos/sin pairs: num_features must be even, "
                             f"got {num_features}")
        if weights not in WEIGHTS:
            raise MacformerError(f"unknown weight matrix {weights!r}; valid choices: {', '.join(WEIGHTS)}")
        self.weights_name = weights
        self.learned_weights = weights in LEARNED_WEIGHTS
        if self.learned_weights and redraw_interval is not None:
            raise MacformerError(f"weights={weights!r} are trained, not redrawn: leave redraw_interval unset")
        if not sigma > 0:
            raise MacformerError(f"sigma must be positive, got {sigma!r}")
        if learned_sigma:
            check_positive_int("num_heads (needed by learned_sigma)", num_heads)
            # log-parameterised so sigma stays positive.
            self.log_sigma = nn.Parameter(torch.full((num_heads, 1, 1), float(sigma)).log())
        else:
            self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.num_rows = num_features // 2 if self.sign < 0 else num_features
        if self.learned_weights:
            self.fastfood = LearnedFastFood(self.num_rows, dim, self._generator())
        else:
            self.sampler = get_sampler(weights)
            self.register_buffer("weights", torch.zeros(self.num_rows, dim))
            self._draw(self._generator())

    def _draw(self, generator: torch.Generator) -> None:
        self._set_buffer("weights", self.sampler(self.num_rows, self.dim, generator))

    @property
    def redrawable(self) -> bool:
        return not self.learned_weights

    def redraw(self) -> None:
        if self.learned_weights:
            raise RuntimeError(f"weights={self.weights_name!r} are trained, not redrawn")
        super().redraw()

    def bandwidth(self) -> torch.Tensor:
        return self.log_sigma.exp() if hasattr(self, "log_sigma") else self.sigma

    def weight_matrix(self) -> torch.Tensor:
        return self.fastfood() if self.learned_weights else self.weights

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        w = self.weight_matrix().to(x.dtype)
        x = x * self.bandwidth().to(x.dtype)
        # log of the per-row weight (1 - 4A)^(d/4) exp(A |w|^2) / sqrt(m), shared by x and y.
        log_row_weight = (self.dim / 4) * math.log1p(-4 * self.a) - 0.5 * math.log(self.num_rows)
        if self.a:
            log_row_weight = log_row_weight + self.a * w.square().sum(-1)
        projections = x @ w.T * math.sqrt(1 - 4 * self.a)
        half_norm = 0.5 * x.square().sum(-1, keepdim=True)
        if self.sign > 0:
            exponent = projections - half_norm + log_row_weight
            if is_query:
                exponent = exponent - exponent.amax(-1, keepdim=True).detach()
            return exponent.exp()
        amplitude = (log_row_weight if is_query else half_norm + log_row_weight)
        amplitude = torch.as_tensor(amplitude, dtype=x.dtype, device=x.device).exp()
        return torch.cat([projections.cos() * amplitude, projections.sin() * amplitude], dim=-1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, component={self.component} (s={self.sign:+d}, A={self.a:.4g}), "
                f"weights={self.weights_name}, learned_sigma={hasattr(self, 'log_sigma')}")
