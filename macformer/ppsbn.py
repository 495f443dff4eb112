"""ppSBN: pre- and post-scaling batch normalisation of attention (Macformer, Guo et al. 2024).

PreSBN centres and l2-normalises each query/key head vector, then scales it by sqrt(t) so that
|q . k| <= t: t, the temperature, bounds how sharp attention can be (the largest and smallest kernel
value of a row differ by at most f(t) / f(-t)). PostSBN restores the output scale with a learnable
per-channel factor before the output projection.

The temperature scheme, chosen by measurement (benchmarks/RESULTS.md, "Sharp attention"):
- It must be able to move. At the paper's d^-1/4 scaling (t = d^-1/2, 0.18 at head_dim 32) every
  row is near-uniform, and a temperature t = bound * sigmoid(theta) trained like any weight barely
  moves: Adam changes theta by about lr per step (~0.2 in a few hundred steps at lr 2e-3). theta
  starts at 0 (t = bound / 2, where its gradient is largest) and trains at TEMPERATURE_LR_SCALE times
  the model's learning rate without weight decay (`PreTrainedMacformer.optimizer_groups`); decay
  would pull every temperature towards half its bound. With it, exact exp-kernel attention under
  ppSBN trains its first layer's temperatures to the bound and learns ListOps as well as softmax
  (0.367 / 0.371 vs 0.365 / 0.365 on two seeds), and so does FAVOR+ under ppSBN (0.369 / 0.377).
- Exact kernels and the softmax-estimating feature maps (`series_temperature_bound`): bound 2 for
  an infinite radius (weights up to e^4 = 55x apart), 0.95 of a finite one.
- RMFA (`rmfa_temperature_bound`): its signed random features are accurate only at small t. A
  feature of degree n has second moment up to (3 t^2)^n, reached as x -> y, so the noise of the
  estimate is largest for exactly the pairs sharp attention picks out. The bound is the largest t at
  which that pair's standard deviation stays within RMFA_RELATIVE_STD of its kernel value f(t)
  (`aligned_pair_relative_std`): the weight attention is sharp about is estimated to within 20%. It
  grows with D (exp: 1.37 at D = 128 and head_dim 32, 1.68 at D = 256, 2 from D = 512). For
  radius-1 kernels it is also at most 0.95 / sqrt(3 p): with P(n) ∝ p^-n the variance is finite for
  every pair only where 3 p t^2 < 1 (0.41 at p = 2), which caps how sharp they can be (inverse:
  weights within (1 + t) / (1 - t) = 2.2x).
  Measured on position recall over 64 tokens (the task in benchmarks/RESULTS.md that needs sharp
  attention): at 1200 steps RMFA-exp at this bound learns it on four seeds of six (0.84-0.93), with
  the earlier rule's 0.70 (noise within a quarter of the smallest value f(-t), e^2t stricter) on none
  (0.15-0.41); given 3000 steps both get there, this bound in half the steps (0.96 at step 1500
  against 0.42) and to softmax's 1.0. ListOps and the causal LM do not lose by it. Past it (2 at
  D = 128) the noise wins again: recall is learnt on neither seed.
  Training fits q and k to the one draw it sees (the trained draw ends 2-47x off exact attention
  while a fresh draw is within 6-14%: `fresh_draw_error` in the attention health), and the fitted
  draw gives sharper attention than the exp kernel at the same t (the temperatures end at 0.5-0.9
  where exact attention needs 1.7-2); features redrawn every step, which cannot be fitted, did not
  learn recall even at bound 2. So draws stay fixed by default and the model is evaluated with its own.
- What kept the default Macformer at the majority class on half of the ListOps seeds was not this
  bound but the embeddings' initial scale (`MacformerConfig.embedding_init_std`): with them at 1 it
  learns on every seed measured, as does exact attention held at the same bound, and so does
  attention held near-uniform (t = 0.01) nearly as well at that budget. Where sharpness is needed
  (position recall) the bound is what limits, as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from macformer.errors import MacformerError

NORM_EPS = 1e-6
# Bound on |q . k| for kernels with an infinite radius (exp, trigh) and the softmax-estimating maps.
EXP_MAX_TEMPERATURE = 2.0
# Fraction of a finite radius of convergence that the bound may reach.
RADIUS_MARGIN = 0.95
# RMFA's bound: the aligned pair's random-feature noise stays within this fraction of its value f(t).
RMFA_RELATIVE_STD = 0.2
# Learning-rate multiplier of the temperature logits (see the module docstring).
TEMPERATURE_LR_SCALE = 30.0


def series_temperature_bound(radius: float) -> float:
    """Bound for exact kernels and the positive / trigonometric feature maps: 2 for an infinite
    radius, 0.95 of a finite one."""
    return RADIUS_MARGIN * radius if math.isfinite(radius) else EXP_MAX_TEMPERATURE


def rmfa_temperature_bound(relative_std: Callable[[float], float], radius: float, p: float) -> float:
    """Largest t (to 1e-3) at which relative_std(t), the aligned pair's random-feature standard
    deviation over f(t), is at most RMFA_RELATIVE_STD; for a finite radius also at most
    0.95 radius / sqrt(3 p), inside the region where every pair's variance is finite."""
    low, high = 0.0, RADIUS_MARGIN * radius / math.sqrt(3 * p) if math.isfinite(radius) else EXP_MAX_TEMPERATURE
    if relative_std(high) <= RMFA_RELATIVE_STD:
        return high
    while high - low > 1e-3:  # relative_std grows with t
        middle = (low + high) / 2
        low, high = (middle, high) if relative_std(middle) <= RMFA_RELATIVE_STD else (low, middle)
    return low


class PreSBN(nn.Module):
    """x -> sqrt(t) (x - mean(x)) / |x - mean(x)| on the last dimension, t per head.

    Inputs are [batch, heads, seq, head_dim]. A constant vector maps to 0 (no division by zero).
    t = max_temperature * sigmoid(temperature_logit) (strictly inside the bound, positive, so sqrt(t)
    never sees a negative value), starting at initial_temperature; with learnable=False it stays there.
    """

    def __init__(
        self, num_heads: int, max_temperature: float, initial_temperature: float, learnable: bool = True,
    ) -> None:
        super().__init__()
        if not max_temperature > 0:
            raise MacformerError(f"max_temperature must be positive, got {max_temperature}")
        if not 0 < initial_temperature < max_temperature:
            raise MacformerError(
                f"initial_temperature must lie in (0, max_temperature={max_temperature}), got {initial_temperature}"
            )
        self.max_temperature = max_temperature
        fraction = initial_temperature / max_temperature
        logit = torch.full((num_heads, 1, 1), math.log(fraction / (1 - fraction)))
        if learnable:
            self.temperature_logit = nn.Parameter(logit)
        else:
            self.register_buffer("temperature_logit", logit)

    def temperature(self) -> torch.Tensor:
        """t per head, [heads, 1, 1]: the bound on |q . k| after scaling."""
        return self.max_temperature * torch.sigmoid(self.temperature_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        # One [..., 1] factor, so that only one temporary of x's size lives beside the output.
        norm = centred.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        return centred * (self.temperature().sqrt().to(x.dtype) / norm)

    def extra_repr(self) -> str:
        return f"max_temperature={self.max_temperature}"


class PostSBN(nn.Module):
    """Learnable per-channel output scale (initialised to 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
