"""Linear-time attention with a feature map: non-causal, chunkwise-parallel causal, recurrent step.

All three share one representation: values are augmented with a column of ones, v' = [v, 1], so the
running sum S' = sum_j w_j phi(k_j) v'_j^T holds S in its first d_v columns and z = sum_j w_j phi(k_j)
in its last; phi(q) S' gives numerator and denominator in one product. Features and sums are computed
in fp32 with autocast off, whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from macformer.attention.common import DENOMINATOR_EPS, check_qkv, key_keep, log_gate_of, stabilised_ratio
from macformer.errors import MacformerError, check_positive_int
from macformer.features.base import FeatureMap
from macformer.triton_support import triton_usable as _use_triton

DEFAULT_CHUNK_SIZE = 64
# Tokens per block when attention runs without autograd (inference, evaluation, prompt prefill): the
# features of one block at a time, never of the whole sequence, so peak memory does not grow with n
# (8 heads, n = 16384, D = 128: causal 211 / 127 / 85 / 56 MiB at blocks of 4096 / 2048 / 1024 / 512
# tokens, at the same speed within the machine's noise).
NO_GRAD_BLOCK = 512


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _finish(numerator_and_denominator: torch.Tensor, query_features: torch.Tensor, key_sums: torch.Tensor,
            eps: float) -> torch.Tensor:
    numerator, denominator = numerator_and_denominator[..., :-1], numerator_and_denominator[..., -1]
    return stabilised_ratio(numerator, denominator, query_features, key_sums, eps)


def _key_state(key_features: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """S' = phi(K)^T [V, 1]: [..., D, dv + 1]."""
    return key_features.transpose(-1, -2) @ _with_ones(v)


def _read_state(query_features: torch.Tensor, state: torch.Tensor, eps: float) -> torch.Tensor:
    """phi(Q) S / phi(Q) z for one state S' shared by every query."""
    return _finish(query_features @ state, query_features, state[..., -1].unsqueeze(-2), eps)


def noncausal_linear_attention(
    query_features: torch.Tensor, key_features: torch.Tensor, v: torch.Tensor, *, eps: float = DENOMINATOR_EPS
) -> torch.Tensor:
    """out = phi(Q) S / phi(Q) z with S = phi(K)^T V: O(n D d_v) time, O(D d_v) state per head.
    Padding keys must already have zero feature rows."""
    return _read_state(query_features, _key_state(key_features, v), eps)


def _running_sums(terms: torch.Tensor, start: torch.Tensor | None, dim: int, *, reverse: bool = False,
                  inclusive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, total) along `dim`: sums[i] = start + the terms before i (after i when reverse; term i
    included when inclusive), total = start + every term; start has the shape of one slice (None: 0).
    One add per index into a preallocated output: torch's cumsum along a dimension that is not the
    last ran at a quarter of this speed ([8, 128, 128, 65] along the chunks: 13.6 vs 3.5 ms)."""
    sums = torch.empty_like(terms)
    previous = None
    for index in range(terms.shape[dim] - 1, -1, -1) if reverse else range(terms.shape[dim]):
        base = start if previous is None else sums.select(dim, previous)
        added = terms.select(dim, index) if inclusive else (None if previous is None else terms.select(dim, previous))
        target = sums.select(dim, index)
        if base is None:
            target.zero_() if added is None else target.copy_(added)
        else:
            target.copy_(base) if added is None else torch.add(base, added, out=target)
        previous = index
    last = sums.select(dim, previous)
    return sums, last if inclusive else last + terms.select(dim, previous)


class _UngatedChunks(torch.autograd.Function):
    """Per chunk c (inputs [..., chunks, C, f]): out_c = phi(Q_c) H_c + tril(phi(Q_c) phi(K_c)^T) V'_c
    with H_c = S_0 + the exclusive prefix sum of the chunk states phi(K_c)^T V'_c; returns (out, the
    final state, the denominator column of every H_c, for the stabiliser). The backward is written
    out: the prefix sum's gradient is the reverse running sum of the start states' gradients, and
    each input's two gradient terms are accumulated by one batched multiply-add instead of separate
    products and sums."""

    @staticmethod
    def forward(ctx, q_c, k_c, v_c, state, causal_mask):
        ctx.set_materialize_grads(False)
        chunk_kv = k_c.transpose(-1, -2) @ v_c  # [..., chunks, D, dv + 1]
        starts, final = _running_sums(chunk_kv, state, dim=-3)
        scores = (q_c @ k_c.transpose(-1, -2)).mul_(causal_mask)
        out = torch.matmul(scores, v_c).add_(q_c @ starts)
        ctx.save_for_backward(q_c, k_c, v_c, starts, scores, causal_mask)
        ctx.has_state = state is not None
        denominators = starts[..., -1]
        ctx.mark_non_differentiable(denominators)
        return out, final, denominators

    @staticmethod
    def backward(ctx, grad_out, grad_final, _):
        q_c, k_c, v_c, starts, scores, causal_mask = ctx.saved_tensors
        if grad_out is None and grad_final is None:  # only the denominators were used: no gradient
            return None, None, None, None, None
        # d/d(chunk state c) = d/d(final) + the sum of d/d(start c') over c' > c; d/d(state) adds them all.
        if grad_out is None:  # only the final state was used
            grad_chunk_kv = grad_final.unsqueeze(-3).expand_as(starts)
            return (torch.zeros_like(q_c), v_c @ grad_chunk_kv.transpose(-1, -2), k_c @ grad_chunk_kv,
                    grad_final if ctx.has_state else None, None)
        grad_chunk_kv, grad_total = _running_sums(q_c.transpose(-1, -2) @ grad_out, grad_final, dim=-3,
                                                    reverse=True)
        grad_scores = (grad_out @ v_c.transpose(-1, -2)).mul_(causal_mask)
        grad_q = torch.matmul(grad_scores, k_c).add_(grad_out @ starts.transpose(-1, -2))
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_c).add_(v_c @ grad_chunk_kv.transpose(-1, -2))
        grad_v = torch.matmul(scores.transpose(-1, -2), grad_out).add_(k_c @ grad_chunk_kv)
        return grad_q, grad_k, grad_v, grad_total if ctx.has_state else None, None


def _gated_chunks(
    q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, log_g: torch.Tensor, state: torch.Tensor | None,
    causal_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `_UngatedChunks` for S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T (log_g: [..., chunks, C]):
    key j reaches query t in its chunk with weight (1 - g_j) prod_{j<l<=t} g_l, and the chunk's
    start state decays by the product of the gates up to t; the start states need a sequential scan
    over chunks."""
    within = log_g.cumsum(-1)  # L_t: log of the product of gates from the chunk start to t
    exponent = (within[..., :, None] - within[..., None, :]).masked_fill(~causal_mask, -math.inf)
    pair_weights = exponent.exp() * (-torch.expm1(log_g))[..., None, :]
    to_end = (within[..., -1:] - within).exp() * (-torch.expm1(log_g))  # weight of j in the chunk's state
    chunk_kv = (k_c * to_end[..., None]).transpose(-1, -2) @ v_c
    chunk_decay = within[..., -1].exp()  # product of all gates in the chunk
    running = state if state is not None else chunk_kv.new_zeros(*chunk_kv.shape[:-3], *chunk_kv.shape[-2:])
    starts_list = []
    for index in range(chunk_kv.shape[-3]):
        starts_list.append(running)
        running = chunk_decay[..., index, None, None] * running + chunk_kv[..., index, :, :]
    starts = torch.stack(starts_list, dim=-3)
    decay = within.exp()[..., None]
    out = (q_c * decay) @ starts + ((q_c @ k_c.transpose(-1, -2)) * pair_weights) @ v_c
    with torch.no_grad():
        key_sums = decay * starts[..., -1].unsqueeze(-2) + pair_weights @ k_c
    return out, key_sums, running


def causal_linear_attention(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    v: torch.Tensor,
    *,
    log_gate: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    state: torch.Tensor | None = None,
    eps: float = DENOMINATOR_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel causal feature attention; returns (output, final state S' [..., D, dv + 1]).

    Within a chunk of C tokens the output is the masked C x C product; across chunks it comes from
    the running state: out_c = phi(Q_c) H_c + tril(phi(Q_c) phi(K_c)^T) V_c, H_{c+1} = H_c + phi(K_c)^T V_c.
    Memory is O(n/C * D * d_v) for the chunk states, never the [n, D, d_v] cumulative tensor.
    With log_gate (log g_t, [..., n]) the update is S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T.
    `state` continues from an earlier call (prefill then decode). Padding keys must already have zero
    feature rows (and g = 1).
    """
    check_positive_int("chunk_size", chunk_size)
    *lead, length, _ = query_features.shape
    values = _with_ones(v)
    if log_gate is None and _use_triton(query_features):
        from macformer.attention.triton_chunked import chunked_causal_products

        out, final = chunked_causal_products(query_features, key_features, values, state, min(chunk_size, length))
        with torch.no_grad():  # z_t, for the stabiliser's floor only
            key_sums = key_features.cumsum(-2)
            if state is not None:
                key_sums += state[..., -1].unsqueeze(-2)
        return _finish(out, query_features, key_sums, eps), final
    chunk = min(chunk_size, length)
    num_chunks = math.ceil(length / chunk)
    pad = num_chunks * chunk - length

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [..., n, f] -> [..., num_chunks, chunk, f]
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(*x.shape[:-2], num_chunks, chunk, x.shape[-1])

    q_c, k_c, v_c = chunked(query_features), chunked(key_features), chunked(values)
    causal_mask = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    if log_gate is None:
        out, final, denominators = _UngatedChunks.apply(q_c, k_c, v_c, state, causal_mask.to(q_c.dtype))
        with torch.no_grad():  # z_t, for the stabiliser's floor only
            key_sums = _running_sums(k_c, denominators, dim=-2, inclusive=True)[0]
    else:  # padded tail positions get g = 1 (log 0): they neither decay nor add
        log_g = (F.pad(log_gate, (0, pad)) if pad else log_gate).reshape(*log_gate.shape[:-1], num_chunks, chunk)
        out, key_sums, final = _gated_chunks(q_c, k_c, v_c, log_g, state, causal_mask)

    def unchunked(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*lead, num_chunks * chunk, x.shape[-1])[..., :length, :]

    return _finish(unchunked(out), query_features, unchunked(key_sums), eps), final


def recurrent_step(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    v: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    eps: float = DENOMINATOR_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step with an O(D d_v) state per head: features [..., 1, D], v [..., 1, dv],
    log_gate [..., 1]. S'_t = g_t S'_{t-1} + (1 - g_t) phi(k_t) v'_t^T (g = 1, weight 1 ungated)."""
    update = _key_state(key_features, v)
    if state is None:
        state = torch.zeros_like(update)
    if log_gate is None:
        state = state + update
    else:
        gate = log_gate.exp()[..., None]
        state = gate * state + (1 - gate) * update
    return _read_state(query_features, state, eps), state


def _key_features_and_values(
    k: torch.Tensor, v: torch.Tensor, feature_map: FeatureMap, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 phi(k) and v with the rows of padding keys zeroed (keep: [batch, 1, seq_k, 1] or None)."""
    key_features, values = feature_map(k.float()), v.float()
    if keep is not None:
        key_features, values = key_features * keep, values * keep
    return key_features, values


def _keep_rows(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    keep = key_keep(key_padding_mask, k)
    return None if keep is None else keep.transpose(-1, -2).float()  # [batch, 1, seq_k, 1]


def _blocks(length: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, length)) for start in range(0, length, block)]


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_gate(gate: torch.Tensor | None, q: torch.Tensor) -> None:
    if gate is not None and gate.shape != q.shape[:3]:
        raise MacformerError(f"gate must be [batch, heads, seq] = {tuple(q.shape[:3])}, got {tuple(gate.shape)}")


def causal_feature_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    state: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = DENOMINATOR_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal feature attention that continues from `state` and returns (output, new state).

    The state S' [batch, heads, D, d_v + 1] is all a decoder keeps: O(D d_v) per head whatever the
    context length. One token with a state takes the recurrent step; longer inputs (training, prompt
    prefill) the chunkwise-parallel form. Arguments as for `feature_attention`.
    """
    check_qkv(q, k, v)
    _check_gate(gate, q)
    check_positive_int("chunk_size", chunk_size)
    if q.shape[2] != k.shape[2]:
        raise MacformerError(
            f"causal feature attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        keep = _keep_rows(key_padding_mask, k)
        log_gate = log_gate_of(gate, key_padding_mask)
        if state is not None and q.shape[2] == 1:
            key_features, values = _key_features_and_values(k, v, feature_map, keep)
            out, state = recurrent_step(feature_map(q.float(), is_query=True), key_features, values, state=state,
                                        log_gate=log_gate, eps=eps)
            return out.to(v.dtype), state
        # With autograd the whole sequence at once (the backward needs every block's features);
        # without, block by block, carrying the state (chunks stay aligned: the block is a multiple of them).
        block = q.shape[2] if _needs_autograd(q, k, v, gate) else (
            max(NO_GRAD_BLOCK // chunk_size, 1) * chunk_size)
        blocks = _blocks(q.shape[2], block)
        out = None if len(blocks) == 1 else v.new_empty(*q.shape[:-1], v.shape[-1])
        for rows in blocks:
            key_features, values = _key_features_and_values(k[:, :, rows], v[:, :, rows], feature_map,
                                                            None if keep is None else keep[:, :, rows])
            block_out, state = causal_linear_attention(
                feature_map(q[:, :, rows].float(), is_query=True), key_features, values,
                log_gate=None if log_gate is None else log_gate[..., rows], chunk_size=chunk_size, state=state,
                eps=eps)
            if out is None:
                return block_out.to(v.dtype), state
            out[:, :, rows] = block_out
    return out, state


def feature_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = DENOMINATOR_EPS,
) -> torch.Tensor:
    """Linear-time attention out_i = phi(q_i)^T S_i / phi(q_i) . z_i with a random feature map.

    q, k, v: [batch, heads, seq, head_dim]. key_padding_mask: [batch, seq_k], True at padding (as in
    torch.nn.MultiheadAttention); padding keys contribute nothing. gate: RFA's recency gate g in
    (0, 1) as [batch, heads, seq], causal only. The feature map is applied as is: scale q and k first
    (ppSBN or d^-1/4) to target softmax-like attention. Returns [batch, heads, seq, d_v] in v's dtype.
    """
    if causal:
        return causal_feature_attention(q, k, v, feature_map, key_padding_mask=key_padding_mask, gate=gate,
                                        chunk_size=chunk_size, eps=eps)[0]
    check_qkv(q, k, v)
    if gate is not None:
        raise MacformerError("the RFA gate is a recency decay and needs causal=True")
    with torch.autocast(device_type=q.device.type, enabled=False):
        keep = _keep_rows(key_padding_mask, k)
        if _needs_autograd(q, k, v):
            key_features, values = _key_features_and_values(k, v, feature_map, keep)
            return noncausal_linear_attention(feature_map(q.float(), is_query=True), key_features, values,
                                              eps=eps).to(v.dtype)
        # Without autograd: the state from the keys block by block, then the queries block by block.
        state = sum(_key_state(*_key_features_and_values(k[:, :, rows], v[:, :, rows], feature_map,
                                                         None if keep is None else keep[:, :, rows]))
                    for rows in _blocks(k.shape[2], NO_GRAD_BLOCK))
        out = v.new_empty(*q.shape[:-1], v.shape[-1])
        for rows in _blocks(q.shape[2], NO_GRAD_BLOCK):
            out[:, :, rows] = _read_state(feature_map(q[:, :, rows].float(), is_query=True), state, eps)
    return out
