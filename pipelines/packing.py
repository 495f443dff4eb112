"""Pack a stream of tokenized documents into fixed causal-LM windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from macformer.errors import MacformerError


@dataclass
class PackedWindows:
    windows: np.ndarray  # [n, seq_len + 1] int32
    document_starts: list[np.ndarray]  # per window: positions where a document's first token sits


class WindowPacker:
    """Concatenates documents (each already ending in EOS) and cuts windows of seq_len + 1 tokens at
    stride seq_len: window i holds tokens [i*S, i*S + S], so inputs w[:-1] and targets w[1:] of
    consecutive windows cover every token of the stream exactly once as a target. Document starts
    are recorded per window so a trainer can mask the loss or reset attention at boundaries."""

    def __init__(self, seq_len: int) -> None:
        if seq_len < 1:
            raise MacformerError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self._buffer = np.empty(0, dtype=np.int32)
        self._starts = np.empty(0, dtype=np.int64)  # document starts, as offsets into _buffer
        self.total_tokens = 0
        self.windows_emitted = 0

    def add(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> PackedWindows:
        """Append documents given as one flat token array and their lengths; return full windows."""
        offsets = len(self._buffer) + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else []
        self._starts = np.concatenate([self._starts, np.asarray(offsets, dtype=np.int64)])
        self._buffer = np.concatenate([self._buffer, flat_tokens.astype(np.int32, copy=False)])
        self.total_tokens += int(flat_tokens.size)
        stride, width = self.seq_len, self.seq_len + 1
        count = max(0, (len(self._buffer) - 1) // stride)
        if count == 0:
            return PackedWindows(np.empty((0, width), dtype=np.int32), [])
        windows = np.lib.stride_tricks.sliding_window_view(self._buffer, width)[: count * stride: stride].copy()
        begins = np.arange(count) * stride
        lo = np.searchsorted(self._starts, begins, side="left")
        hi = np.searchsorted(self._starts, begins + width, side="left")
        starts = [(self._starts[a:b] - begin).astype(np.int32) for a, b, begin in zip(lo, hi, begins, strict=True)]
        consumed = count * stride  # the last token of the last window starts the next one
        self._buffer = self._buffer[consumed:]
        self._starts = self._starts[np.searchsorted(self._starts, consumed):] - consumed
        self.windows_emitted += count
        return PackedWindows(windows, starts)

    @property
    def packed_tokens(self) -> int:
        """Distinct stream tokens inside emitted windows."""
        return self.windows_emitted * self.seq_len + 1 if self.windows_emitted else 0

    @property
    def dropped_tokens(self) -> int:
        """Tail tokens that never filled a window."""
        return self.total_tokens - self.packed_tokens
