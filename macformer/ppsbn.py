"""ppSBN: pre- and post-scaling batch normalisation of attention (Macformer, Guo et al. 2024).

PreSBN centres and l2-normalises each query/key head vector, then scales it by sqrt(t) so that
|q . k| <= t: t, the temperature, bounds how sharp attention can be (the largest and smallest kernel
value of a row differ by at most f(t) / f(-t)). PostSBN restores the output scale with a learnable
per-channel factor before the output projection.

The temperature scheme (`temperature_defaults`), chosen by measurement (benchmarks/RESULTS.md,
"Sharp attention"):
- It must start sharp enough and be able to move. At the paper's d^-1/4 scaling (t = d^-1/2, 0.18
  at head_dim 32) every row is near-uniform (weights within 1.4x), and a task that needs sharp
  attention (ListOps) stays at the majority class. The temperature is t = bound * sigmoid(theta) per
  head; theta starts at 0 (t = bound / 2, where its gradient is largest) and is trained with its own
  learning rate, `temperature_lr_scale` times the model's, without weight decay
  (`PreTrainedMacformer.optimizer_groups`): Adam moves a parameter by about lr per step, so at
  lr = 2e-3 an unscaled theta moves by ~0.2 in a few hundred steps and t barely changes. With the
  exact exp kernel, ListOps trains its temperatures up to the bound within 600 steps.
- exp / trigh (infinite radius): bound 2 (weights up to e^4 = 55x apart). Exact exp-kernel attention
  learns ListOps as well with this bound as with 8, while the random Maclaurin estimate at D = 128
  degrades fast above it (relative error 0.4 at t = 2, 2.2 at t = 3, 8-13 at t = 4).
- Radius-1 kernels (inverse, log, sqrt): the series converges for |t| < 1, but the random features'
  variance is finite only where sum_n a_n^2 m_n / P(n) converges, m_n = E[(w.x)^2 (w.y)^2]^n the
  Rademacher product's second moment. m_n reaches (3 t^2)^n for aligned x = y, and P(n) ∝ p^-n, so
  every pair has finite variance iff 3 p t^2 < 1. The bound is 0.95 / sqrt(3 p) (0.39 at p = 2):
  that caps how sharp these kernels can be (inverse: weights within (1 + t) / (1 - t) = 2.3x).
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_EPS = 1e-6
# Bound on |q . k| for kernels with an infinite radius (exp, trigh) and the softmax-estimating maps.
EXP_MAX_TEMPERATURE = 2.0
# Margin inside the finite-variance region of radius-1 kernels: t <= 0.95 / sqrt(3 p).
RADIUS_MARGIN = 0.95
# Learning-rate multiplier of the temperature logits (see the module docstring).
TEMPERATURE_LR_SCALE = 30.0


def temperature_defaults(radius: float, p: float) -> tuple[float, float]:
    """(initial temperature, bound) of ppSBN for a kernel with this radius of convergence whose
    random Maclaurin features draw degrees with P(n) ∝ p^-n."""
    bound = RADIUS_MARGIN * radius / math.sqrt(3.0 * p) if math.isfinite(radius) else EXP_MAX_TEMPERATURE
    return bound / 2, bound


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
            raise ValueError(f"max_temperature must be positive, got {max_temperature}")
        if not 0 < initial_temperature < max_temperature:
            raise ValueError(
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
        unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        return unit * self.temperature().sqrt().to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_temperature={self.max_temperature}"


class PostSBN(nn.Module):
    """Learnable per-channel output scale (initialised to 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
