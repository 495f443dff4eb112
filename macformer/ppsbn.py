"""ppSBN: pre- and post-scaling batch normalisation of attention (Macformer, Guo et al. 2024).

PreSBN centres and l2-normalises each query/key head vector, then scales it by sqrt(t) so that
|q . k| <= t < radius of convergence: the kernel's Maclaurin series converges and its random features
have finite variance. t, the temperature, is learnable per head inside (0, max_temperature): a bounded
t avoids the near-uniform attention of a fixed small scale. PostSBN restores the output scale with a
learnable per-channel factor before the output projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_EPS = 1e-6


class PreSBN(nn.Module):
    """x -> sqrt(t) (x - mean(x)) / |x - mean(x)| on the last dimension, t per head.

    Inputs are [batch, heads, seq, head_dim]. A constant vector maps to 0 (no division by zero).
    With learnable=True, t = max_temperature * sigmoid(theta) (strictly inside the bound, positive,
    so sqrt(t) never sees a negative value); otherwise t stays at its initial value.
    """

    def __init__(
        self, num_heads: int, head_dim: int, max_temperature: float, learnable: bool = True,
        initial_temperature: float | None = None,
    ) -> None:
        super().__init__()
        if not max_temperature > 0:
            raise ValueError(f"max_temperature must be positive, got {max_temperature}")
        if initial_temperature is None:  # the paper's d^-1/4 scaling of q and k
            initial_temperature = min(head_dim**-0.5, 0.5 * max_temperature)
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
