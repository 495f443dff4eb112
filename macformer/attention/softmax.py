"""Softmax attention through PyTorch's scaled_dot_product_attention: the baseline to beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from macformer.attention.common import check_qkv, key_keep


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with scale 1/sqrt(head_dim) by default. With fewer queries than keys
    and causal=True, the queries are the last positions (a KV cache). Rows with no visible key give 0."""
    check_qkv(q, k, v)
    n_q, n_k = q.shape[2], k.shape[2]
    keep = key_keep(key_padding_mask, k)
    if keep is None and (not causal or n_q == n_k):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and n_q > 1, scale=scale)
    mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril(diagonal=n_k - n_q)
    if keep is not None:
        mask = mask & keep.bool()
    # SDPA returns NaN for a row with every key masked; such rows are defined as 0 here.
    visible = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~visible, scale=scale)
    return out * visible.to(out.dtype)
