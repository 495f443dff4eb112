"""Freed CPU memory kept for reuse, so that large tensors do not page-fault on every allocation.

glibc's malloc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with fresh
pages from the kernel and unmaps them on free, so each new large CPU tensor pays one page fault per
4 KiB page on first write: the [8 heads, 8192, 128] fp32 features of one attention call are 32 MiB,
and `x * 2` on a 34 MiB tensor took 11 ms (8,321 faults) against 3 ms (none) with its memory reused.
It cost 13% of RMFA's causal forward+backward at 8k tokens on CPU (564 -> 490 ms; softmax
unchanged). PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for this; glibc's own switches
(M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) do the same without a dependency. The cost: like CUDA's caching
allocator, a process keeps what it freed (its resident memory does not shrink after a peak).

The `macformer` command and the benchmarks call `reuse_freed_host_memory()`, and so can a program
that uses the library directly. Training workers start with `process_environment()` instead: Ray
Train runs the training loop in a thread of its own, and glibc serves a thread's allocations from a
separate arena whose heaps hold at most 64 MiB, so larger tensors (the logits of 8k tokens) came from
fresh pages whatever the thresholds: 64-135k page faults per forward and as many per backward at 8k
tokens, next to none with one arena for every thread (RMFA's training step at 8k tokens: forward
0.37-0.42 -> 0.24-0.36 s, backward 0.59-0.72 -> 0.47-0.62 s).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations up to 1 GiB come from the heap; larger ones (rare) still from the kernel.
MMAP_THRESHOLD_BYTES = 1 << 30
# Free memory at the top of the heap is never returned to the kernel by itself (int range of mallopt).
TRIM_THRESHOLD_BYTES = 2**31 - 1
# glibc's initial mmap and trim thresholds (before its dynamic adjustment raises them).
GLIBC_INITIAL_THRESHOLD_BYTES = 128 * 1024

_reusing = False

# The same thresholds for a process from its start, and one arena for all its threads (see above).
GLIBC_TUNABLES = (f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={MMAP_THRESHOLD_BYTES}:"
                  f"glibc.malloc.trim_threshold={TRIM_THRESHOLD_BYTES}")


def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def reuse_freed_host_memory(enabled: bool = True) -> bool:
    """Make freed heap memory serve later allocations (process-wide, idempotent); enabled=False maps
    every allocation above 128 KiB fresh and unmaps it on free (glibc's initial thresholds, without
    its dynamic adjustment). True where it was applied (glibc); False elsewhere (macOS, musl,
    Windows), where the allocator is left as it is."""
    global _reusing
    applied = (_set_thresholds(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES) if enabled
               else _set_thresholds(GLIBC_INITIAL_THRESHOLD_BYTES, GLIBC_INITIAL_THRESHOLD_BYTES))
    if applied:
        _reusing = enabled
    return applied


@contextlib.contextmanager
def large_allocations_mapped_fresh() -> Iterator[None]:
    """Within the block, large allocations are mapped fresh and unmapped on free, so the resident set
    follows the live tensors (what a peak-memory measurement wants: with reuse on, a freed block that
    the next allocation does not fit stays resident beside it); the previous setting after. Memory
    freed before the block is handed back to the kernel on entry: malloc serves a request from a free
    chunk of its heap before it maps fresh pages, whatever the thresholds, so without the trim a
    tensor inside the block could reuse pages that were already resident and go uncounted."""
    previous = _reusing
    reuse_freed_host_memory(False)
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        yield
    finally:
        reuse_freed_host_memory(previous)


def process_environment() -> dict[str, str]:
    """Environment variables that make a new process (a training worker) reuse freed memory from its
    start, in every thread; tunables already set in this environment come after, so they win."""
    existing = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": GLIBC_TUNABLES + (f":{existing}" if existing else "")}
