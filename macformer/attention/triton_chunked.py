"""Triton kernels for the chunkwise-parallel causal form on precomputed features (CUDA).

The same computation as `linear._UngatedChunks`, one program per (batch, head) sweeping its chunks
with the running state S [D, d_v'] kept on chip (never materialised per chunk in memory):

    forward:   O_c = tril(Q_c K_c^T) V_c + Q_c S_c,               S_{c+1} = S_c + K_c^T V_c
    backward:  dQ_c = tril(dO_c V_c^T) K_c + dO_c S_c^T           (the forward kernel on dO, V, K)
               dK_c = triu(V_c dO_c^T) Q_c + V_c G_c^T,
               dV_c = triu(K_c Q_c^T) dO_c + K_c G_c,             G_{c-1} = G_c + Q_c^T dO_c
               (a reverse sweep; G starts at the final state's gradient and ends as the initial
               state's).

Products run in fp32 with IEEE precision (no TF32): signed random features cancel, and the
features are fp32 by design. With TRITON_INTERPRET=1 Triton's interpreter runs these kernels on the
CPU, which is how CI tests them against the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


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
def _forward_kernel(q_ptr, k_ptr, v_ptr, initial_ptr, out_ptr, final_ptr, n, D, V,
                    HAS_INITIAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    head = tl.program_id(0)
    q_ptr, k_ptr = q_ptr + head * n * D, k_ptr + head * n * D
    v_ptr, out_ptr = v_ptr + head * n * V, out_ptr + head * n * V
    d_cols, v_cols, offsets = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V), tl.arange(0, CHUNK)
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
        _store_rows(out_ptr, rows, n, v_cols, V, out)
        state += tl.dot(tl.trans(k), v, input_precision="ieee")
    tl.store(final_ptr + state_ptrs, state, mask=state_mask)


@triton.jit
def _grad_key_value_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, grad_final_ptr, grad_k_ptr, grad_v_ptr,
                           grad_initial_ptr, n, D, V, HAS_GRAD_FINAL: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    head = tl.program_id(0)
    q_ptr, k_ptr, grad_k_ptr = q_ptr + head * n * D, k_ptr + head * n * D, grad_k_ptr + head * n * D
    v_ptr, grad_out_ptr, grad_v_ptr = v_ptr + head * n * V, grad_out_ptr + head * n * V, grad_v_ptr + head * n * V
    d_cols, v_cols, offsets = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V), tl.arange(0, CHUNK)
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
        _store_rows(grad_k_ptr, rows, n, d_cols, D, grad_k)
        _store_rows(grad_v_ptr, rows, n, v_cols, V, grad_v)
        grad_state += tl.dot(tl.trans(q), grad_out, input_precision="ieee")
    tl.store(grad_initial_ptr + state_ptrs, grad_state, mask=state_mask)


def block_size(size: int) -> int:
    """A kernel block covering `size`: a power of two >= 16. For the chunk, the results do not depend
    on it, only the speed."""
    return max(MIN_BLOCK, triton.next_power_of_2(size))


class _ChunkedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query_features, key_features, values, state, chunk):
        *lead, n, D = query_features.shape
        V = values.shape[-1]
        q, k, v = (t.reshape(-1, n, t.shape[-1]).contiguous() for t in (query_features, key_features, values))
        heads = q.shape[0]
        initial = None if state is None else state.reshape(heads, D, V).contiguous()
        out = torch.empty_like(v)
        final = q.new_empty(heads, D, V)
        blocks = {"CHUNK": chunk, "BLOCK_D": block_size(D), "BLOCK_V": block_size(V)}
        _forward_kernel[(heads,)](q, k, v, initial if initial is not None else final, out, final, n, D, V,
                                  HAS_INITIAL=initial is not None, **blocks)
        ctx.save_for_backward(q, k, v, initial)
        ctx.shapes, ctx.blocks = (tuple(lead), n, D, V), blocks
        return out.reshape(*lead, n, V), final.reshape(*lead, D, V)

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, initial = ctx.saved_tensors
        lead, n, D, V = ctx.shapes
        heads = q.shape[0]
        grad_out = (torch.zeros_like(v) if grad_out is None else grad_out.reshape(heads, n, V).contiguous())
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_initial = q.new_empty(heads, D, V)
        # dQ is the forward pass of (dO, V, K) from the transposed initial state: the same kernel with D
        # and V swapped (its final state is not needed).
        transposed = q.new_empty(heads, V, D)
        if initial is not None:
            transposed.copy_(initial.transpose(-1, -2))
        _forward_kernel[(heads,)](grad_out, v, k, transposed, grad_q, transposed, n, V, D,
                                  HAS_INITIAL=initial is not None, CHUNK=ctx.blocks["CHUNK"],
                                  BLOCK_D=ctx.blocks["BLOCK_V"], BLOCK_V=ctx.blocks["BLOCK_D"])
        has_grad_final = grad_final is not None
        grad_final = grad_final.reshape(heads, D, V).contiguous() if has_grad_final else grad_initial
        _grad_key_value_kernel[(heads,)](q, k, v, grad_out, grad_final, grad_k, grad_v, grad_initial, n, D, V,
                                         HAS_GRAD_FINAL=has_grad_final, **ctx.blocks)
        grad_state = grad_initial.reshape(*lead, D, V) if initial is not None else None
        return (grad_q.reshape(*lead, n, D), grad_k.reshape(*lead, n, D), grad_v.reshape(*lead, n, V), grad_state,
                None)


def chunked_causal_products(query_features: torch.Tensor, key_features: torch.Tensor, values: torch.Tensor,
                            state: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, final state): O_t = sum_{j<=t} (phi(q_t) . phi(k_j)) v_j + phi(q_t) S_0 for fp32 features
    [..., n, D], values [..., n, V] and an optional initial state S_0 [..., D, V]; `chunk` a power of
    two >= 16. Differentiable in every input."""
    return _ChunkedLinearAttention.apply(query_features, key_features, values, state, chunk)
