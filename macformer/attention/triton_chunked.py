"""Triton kernels for the chunkwise-parallel causal form on precomputed features (CUDA).

The same computation as `linear._UngatedChunks`, each program sweeping the chunks of one (batch,
head) with its slice of the running state kept on chip (never materialised per chunk in memory):

    forward:   O_c = tril(Q_c K_c^T) V_c + Q_c S_c,               S_{c+1} = S_c + K_c^T V_c
    backward:  dQ_c = tril(dO_c V_c^T) K_c + dO_c S_c^T           (the forward kernel on dO, V, K)
               dK_c = triu(V_c dO_c^T) Q_c + V_c G_c^T,
               dV_c = triu(K_c Q_c^T) dO_c + K_c G_c,             G_{c-1} = G_c + Q_c^T dO_c
               (reverse sweeps; G starts at the final state's gradient and ends as the initial
               state's).

The state is split over programs in tiles of TILE_D features x TILE_V value columns, as
flash-linear-attention's chunk kernels split it: each program sweeps the chunks with its [TILE_D,
TILE_V] state tile on chip and writes its share of the outputs, which sum over the tiles (the intra-chunk
scores Q K^T are sums over feature tiles, and every term is linear in them). So the on-chip footprint
does not grow with D or V: one program holding a whole [128, 128] state needed 256-336 KB of shared
memory compiled for sm_90, more than an H100/H200 block may have (227 KB), and could not launch at the
sizes the GPU config uses. `tests/test_triton_kernels.py` compiles every kernel for sm_90 without a GPU
and checks what it needs.

Products run in fp32 with IEEE precision (no TF32): signed random features cancel, and the
features are fp32 by design. With TRITON_INTERPRET=1 Triton's interpreter runs these kernels on the
CPU, which is how CI tests them against the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
# A program's tile of the state: TILE_D rows (features) x TILE_V columns (values), 8 KB in fp32.
TILE_D = 64
TILE_V = 32
# The kernels' chunk: at most this many tokens (the results do not depend on it, only the speed).
MAX_CHUNK = 64
# Chunks of Q, K, V (and dO) in flight per program: loads pipelined two deep.
NUM_STAGES = 2


@triton.jit
def _load_rows(base, rows, n, cols, width):
    return tl.load(base + rows[:, None] * width + cols[None, :], mask=(rows < n)[:, None] & (cols < width)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(base, rows, n, cols, width, value):
    tl.store(base + rows[:, None] * width + cols[None, :], value, mask=(rows < n)[:, None] & (cols < width)[None, :])


@triton.jit
def _state_pointers(base, d_cols, v_cols, D, V):
    return base + d_cols[:, None] * V + v_cols[None, :], (d_cols < D)[:, None] & (v_cols < V)[None, :]


@triton.jit
def _tile_columns(tile, BLOCK: tl.constexpr):
    return tile * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, initial_ptr, partial_out_ptr, final_ptr, n, D, V, heads,
                    HAS_INITIAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (head, d tile, v tile): the output's v columns from this d tile's share (summed over d
    tiles afterwards) and the final state's (d, v) tile."""
    head, d_tile = tl.program_id(0), tl.program_id(1)
    q_ptr, k_ptr, v_ptr = q_ptr + head * n * D, k_ptr + head * n * D, v_ptr + head * n * V
    partial_out_ptr += (d_tile * heads + head) * n * V
    d_cols, v_cols = _tile_columns(d_tile, BLOCK_D), _tile_columns(tl.program_id(2), BLOCK_V)
    offsets = tl.arange(0, CHUNK)
    causal = offsets[:, None] >= offsets[None, :]
    state_ptrs, state_mask = _state_pointers(head * D * V, d_cols, v_cols, D, V)
    state = tl.zeros([BLOCK_D, BLOCK_V], dtype=tl.float32)
    if HAS_INITIAL:
        state = tl.load(initial_ptr + state_ptrs, mask=state_mask, other=0.0)
    for start in range(0, n, CHUNK):
        rows = start + offsets
        q = _load_rows(q_ptr, rows, n, d_cols, D)
        k = _load_rows(k_ptr, rows, n, d_cols, D)
        v = _load_rows(v_ptr, rows, n, v_cols, V)
        scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
        out = tl.dot(scores, v, input_precision="ieee") + tl.dot(q, state, input_precision="ieee")
        _store_rows(partial_out_ptr, rows, n, v_cols, V, out)
        state += tl.dot(tl.trans(k), v, input_precision="ieee")
    tl.store(final_ptr + state_ptrs, state, mask=state_mask)


@triton.jit
def _backward_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, grad_final_ptr, partial_grad_k_ptr, partial_grad_v_ptr,
                     grad_initial_ptr, n, D, V, heads, HAS_GRAD_FINAL: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (head, d tile, v tile), a reverse sweep: dK's d columns from this v tile's share
    (summed over v tiles afterwards), dV's v columns from this d tile's share (summed over d tiles)
    and the initial state gradient's (d, v) tile."""
    head, d_tile, v_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_ptr, k_ptr = q_ptr + head * n * D, k_ptr + head * n * D
    v_ptr, grad_out_ptr = v_ptr + head * n * V, grad_out_ptr + head * n * V
    partial_grad_k_ptr += (v_tile * heads + head) * n * D
    partial_grad_v_ptr += (d_tile * heads + head) * n * V
    d_cols, v_cols = _tile_columns(d_tile, BLOCK_D), _tile_columns(v_tile, BLOCK_V)
    offsets = tl.arange(0, CHUNK)
    later = offsets[:, None] <= offsets[None, :]  # [j, t]: query t sees key j
    state_ptrs, state_mask = _state_pointers(head * D * V, d_cols, v_cols, D, V)
    grad_state = tl.zeros([BLOCK_D, BLOCK_V], dtype=tl.float32)
    if HAS_GRAD_FINAL:
        grad_state = tl.load(grad_final_ptr + state_ptrs, mask=state_mask, other=0.0)
    num_chunks = tl.cdiv(n, CHUNK)
    for index in range(0, num_chunks):
        rows = (num_chunks - 1 - index) * CHUNK + offsets
        q = _load_rows(q_ptr, rows, n, d_cols, D)
        k = _load_rows(k_ptr, rows, n, d_cols, D)
        v = _load_rows(v_ptr, rows, n, v_cols, V)
        grad_out = _load_rows(grad_out_ptr, rows, n, v_cols, V)
        value_grads = tl.where(later, tl.dot(v, tl.trans(grad_out), input_precision="ieee"), 0.0)
        grad_k = tl.dot(value_grads, q, input_precision="ieee") + tl.dot(v, tl.trans(grad_state),
                                                                          input_precision="ieee")
        key_queries = tl.where(later, tl.dot(k, tl.trans(q), input_precision="ieee"), 0.0)
        grad_v = tl.dot(key_queries, grad_out, input_precision="ieee") + tl.dot(k, grad_state,
                                                                                input_precision="ieee")
        _store_rows(partial_grad_k_ptr, rows, n, d_cols, D, grad_k)
        _store_rows(partial_grad_v_ptr, rows, n, v_cols, V, grad_v)
        grad_state += tl.dot(tl.trans(q), grad_out, input_precision="ieee")
    tl.store(grad_initial_ptr + state_ptrs, grad_state, mask=state_mask)


def block_size(size: int) -> int:
    """A kernel block covering `size`: a power of two >= 16."""
    return max(MIN_BLOCK, triton.next_power_of_2(size))


def kernel_blocks(D: int, V: int, chunk: int) -> dict[str, int]:
    """The block sizes the kernels run with for features of width D, values of width V and a model
    chunk of `chunk` tokens (also what the tests compile for real GPUs)."""
    return {"CHUNK": min(block_size(chunk), MAX_CHUNK), "BLOCK_D": min(block_size(D), TILE_D),
            "BLOCK_V": min(block_size(V), TILE_V)}


def _tiled_products(q, k, v, initial, chunk):
    """(O, final state) of the forward sweep for [heads, n, D] features and [heads, n, V] values."""
    heads, n, D = q.shape
    V = v.shape[-1]
    blocks = kernel_blocks(D, V, chunk)
    d_tiles, v_tiles = triton.cdiv(D, blocks["BLOCK_D"]), triton.cdiv(V, blocks["BLOCK_V"])
    partial_out = v.new_empty(d_tiles, heads, n, V)
    final = q.new_empty(heads, D, V)
    _forward_kernel[(heads, d_tiles, v_tiles)](q, k, v, initial if initial is not None else final, partial_out,
                                                final, n, D, V, heads, HAS_INITIAL=initial is not None,
                                                num_stages=NUM_STAGES, **blocks)
    return partial_out[0] if d_tiles == 1 else partial_out.sum(0), final


class _ChunkedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query_features, key_features, values, state, chunk):
        *lead, n, D = query_features.shape
        V = values.shape[-1]
        q, k, v = (t.reshape(-1, n, t.shape[-1]).contiguous() for t in (query_features, key_features, values))
        initial = None if state is None else state.reshape(q.shape[0], D, V).contiguous()
        out, final = _tiled_products(q, k, v, initial, chunk)
        ctx.save_for_backward(q, k, v, initial)
        ctx.shapes, ctx.chunk = (tuple(lead), n, D, V), chunk
        return out.reshape(*lead, n, V), final.reshape(*lead, D, V)

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, initial = ctx.saved_tensors
        lead, n, D, V = ctx.shapes
        heads = q.shape[0]
        grad_out = (torch.zeros_like(v) if grad_out is None else grad_out.reshape(heads, n, V).contiguous())
        # dQ is the forward sweep of (dO, V, K) from the transposed initial state (D and V swapped; its
        # final state is not needed).
        transposed = None if initial is None else initial.transpose(-1, -2).contiguous()
        grad_q, _ = _tiled_products(grad_out, v, k, transposed, ctx.chunk)
        blocks = kernel_blocks(D, V, ctx.chunk)
        d_tiles, v_tiles = triton.cdiv(D, blocks["BLOCK_D"]), triton.cdiv(V, blocks["BLOCK_V"])
        partial_grad_k, partial_grad_v = q.new_empty(v_tiles, heads, n, D), v.new_empty(d_tiles, heads, n, V)
        grad_initial = q.new_empty(heads, D, V)
        has_grad_final = grad_final is not None
        grad_final = grad_final.reshape(heads, D, V).contiguous() if has_grad_final else grad_initial
        _backward_kernel[(heads, d_tiles, v_tiles)](q, k, v, grad_out, grad_final, partial_grad_k, partial_grad_v,
                                                    grad_initial, n, D, V, heads, HAS_GRAD_FINAL=has_grad_final,
                                                    num_stages=NUM_STAGES, **blocks)
        grad_k = partial_grad_k[0] if v_tiles == 1 else partial_grad_k.sum(0)
        grad_v = partial_grad_v[0] if d_tiles == 1 else partial_grad_v.sum(0)
        grad_state = grad_initial.reshape(*lead, D, V) if initial is not None else None
        return (grad_q.reshape(*lead, n, D), grad_k.reshape(*lead, n, D), grad_v.reshape(*lead, n, V), grad_state,
                None)


def chunked_causal_products(query_features: torch.Tensor, key_features: torch.Tensor, values: torch.Tensor,
                            state: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, final state): O_t = sum_{j<=t} (phi(q_t) . phi(k_j)) v_j + phi(q_t) S_0 for fp32 features
    [..., n, D], values [..., n, V] and an optional initial state S_0 [..., D, V]; `chunk`, the model's
    chunk size, sets the kernels' (`kernel_blocks`). Differentiable in every input."""
    return _ChunkedLinearAttention.apply(query_features, key_features, values, state, chunk)
