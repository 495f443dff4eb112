"""Shared behaviour of random feature maps: seeded draws held in buffers, explicit redraws."""

from __future__ import annotations

import torch
from torch import nn

from macformer.errors import MacformerError, check_positive_int


class FeatureMap(nn.Module):
    """A random feature map phi: R^dim -> R^num_features.

    The random draws live in buffers, so they are saved in the state_dict and follow `.to()`. They
    change only through `redraw()` (or `maybe_redraw()` in training when `redraw_interval` is set),
    never in eval mode. Draw number i of a map uses a generator seeded from (seed, i), and both are
    buffers, so a reloaded map redraws exactly as the original would.

    Subclasses implement `_draw(generator)` and `forward(x, is_query=False)`; `is_query` lets maps of
    positive exponential features subtract a per-row constant that cancels in the attention ratio.
    """

    def __init__(
        self, dim: int, num_features: int, seed: int | None = None, redraw_interval: int | None = None
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_features = check_positive_int("num_features", num_features)
        if redraw_interval is not None:
            check_positive_int("redraw_interval", redraw_interval)
        self.redraw_interval = redraw_interval
        if seed is None:  # follow torch's global RNG so torch.manual_seed makes maps reproducible
            seed = int(torch.randint(0, 2**62, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise MacformerError(f"seed must be an integer or None, got {seed!r}")
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("draw_index", torch.tensor(0, dtype=torch.int64))
        # Training calls since the last draw: counted in Python (no device sync per step) and mirrored
        # in a buffer so that a reloaded map redraws on the same call as the original.
        self.register_buffer("calls_since_draw", torch.tensor(0, dtype=torch.int64))
        self._calls_since_draw = 0

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(hash((int(self.seed), int(self.draw_index))) & (2**63 - 1))
        return generator

    def _draw(self, generator: torch.Generator) -> None:
        raise NotImplementedError

    def _buffers_changed(self) -> None:
        """Hook for maps that cache structure derived from their buffers (after a draw, a load or a move)."""

    @property
    def redrawable(self) -> bool:
        """Whether the map's weights are random draws (False where they are trained)."""
        return True

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw new random weights (the next draw of this map's seeded sequence)."""
        self.draw_index += 1
        self._draw(self._generator())
        self._count_calls(0)

    @torch.no_grad()
    def _count_calls(self, calls: int) -> None:
        self._calls_since_draw = calls
        self.calls_since_draw.fill_(calls)

    def maybe_redraw(self) -> None:
        """Count one training forward pass and redraw every `redraw_interval` of them."""
        if not self.training or self.redraw_interval is None:
            return
        self._count_calls(self._calls_since_draw + 1)
        if self._calls_since_draw >= self.redraw_interval:
            self.redraw()

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        old = self._buffers[name]
        self._buffers[name] = value.to(device=old.device if old is not None else value.device)

    def _apply(self, fn, recurse: bool = True):
        # Random draws stay fp32 under module.half()/.bfloat16() (DeepSpeed casts whole modules):
        # rounding them to 8 mantissa bits would change the kernel being estimated.
        floats = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, original in floats.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        self._buffers_changed()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Maps saved before the call counter existed had counted nothing since their last draw.
        state_dict.setdefault(prefix + "calls_since_draw", torch.tensor(0, dtype=torch.int64))
        # The number of stacked projections of some maps depends on the draw: take the saved shape.
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buffer is not None and saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._calls_since_draw = int(self.calls_since_draw)
        self._buffers_changed()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_features={self.num_features}, redraw_interval={self.redraw_interval}"
