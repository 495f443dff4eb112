"""Input checks, masks and the denominator stabiliser shared by the fast and naive attention paths.

out_i = num_i / den_i with den_i = phi(q_i) . z_i, z_i the (masked, causal, gated) sum of key
features. For positive kernels den_i estimates a positive sum, but signed features (random
Maclaurin, Fourier) can drive one estimate to zero or below. The denominator is floored at
eps * |phi(q_i)| * |z_i|: by Cauchy-Schwarz |den_i| <= |phi(q_i)| |z_i|, so the floor acts only when
the estimated cosine between phi(q_i) and z_i falls under eps, never on a well-behaved row. It scales
with the features (any constant factor of a map cancels), so no absolute threshold biases short
causal prefixes, and it is finite: rows with no visible keys give 0, never NaN or Inf.
"""

from __future__ import annotations

import torch

from macformer.errors import MacformerError

DENOMINATOR_EPS = 1e-2


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise MacformerError(
            f"q, k, v must be [batch, heads, seq, head_dim]; got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise MacformerError(
            f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} "
            "(need equal batch/heads, k and v equal length, q and k equal head_dim)"
        )


def key_keep(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    """[batch, 1, 1, seq_k] float mask, 1 for real keys (key_padding_mask is True at padding)."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise MacformerError(
            f"key_padding_mask must be [batch, seq_k] = {(k.shape[0], k.shape[2])} with True at "
            f"padding, got {tuple(key_padding_mask.shape)}"
        )
    return (~key_padding_mask.bool()).to(k.dtype)[:, None, None, :]


def log_gate_of(gate: torch.Tensor | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """log g as [batch, heads, seq], with g = 1 at padding: padding neither adds to nor decays the state."""
    if gate is None:
        return None
    log_gate = gate.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    if key_padding_mask is not None:
        log_gate = log_gate.masked_fill(key_padding_mask.bool()[:, None, :], 0.0)
    return log_gate


def denominator_floor(query_features: torch.Tensor, key_feature_sums: torch.Tensor,
                      eps: float = DENOMINATOR_EPS) -> torch.Tensor:
    """eps * |phi(q_i)| * |z_i| per row [..., n] (no gradient): the stabiliser's floor."""
    with torch.no_grad():  # the floor is a guard, not part of the model: no gradient through it
        scale = query_features.norm(dim=-1) * key_feature_sums.norm(dim=-1)
        return (eps * scale).clamp_min(torch.finfo(query_features.dtype).tiny)


def stabilised_ratio(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    query_features: torch.Tensor,
    key_feature_sums: torch.Tensor,
    eps: float = DENOMINATOR_EPS,
) -> torch.Tensor:
    """numerator [..., n, dv] / floored denominator [..., n].

    query_features: [..., n, D]; key_feature_sums: z_i as [..., n, D], or [..., 1, D] when shared.
    """
    floor = denominator_floor(query_features, key_feature_sums, eps).to(denominator.dtype)
    return numerator / torch.maximum(denominator, floor).unsqueeze(-1)
