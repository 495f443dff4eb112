"""Quadratic references: exact kernelized attention, and feature attention through the explicit
n x n matrix. Tests compare the fast paths against these; they are not meant for long sequences."""

from __future__ import annotations

import math

import torch

from macformer.attention.common import (
    DENOMINATOR_EPS,
    check_qkv,
    denominator_floor,
    key_keep,
    log_gate_of,
    stabilised_ratio,
)
from macformer.errors import MacformerError
from macformer.kernels import DotProductKernel, get_kernel


def _pair_weights(
    n_q: int, n_k: int, causal: bool, keep: torch.Tensor | None, log_gate: torch.Tensor | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """Weight of key j in query i's sums: causal mask x gate decay b_j prod_{j<l<=i} g_l x padding."""
    weights = torch.ones(n_q, n_k, dtype=like.dtype, device=like.device)
    if causal:
        weights = torch.tril(weights, diagonal=n_k - n_q)
    if log_gate is not None:
        cumulative = log_gate.cumsum(-1)  # L_i = sum_{l<=i} log g_l
        exponent = cumulative[..., :, None] - cumulative[..., None, :]
        exponent = exponent.masked_fill(weights == 0, -math.inf)
        weights = exponent.exp() * (-torch.expm1(log_gate))[..., None, :]
    if keep is not None:
        weights = weights * keep
    return weights


def kernel_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    kernel: str | DotProductKernel = "exp",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact attention matrix [b, h, n_q, n_k]: f(q_i . k_j) over the visible keys, each row
    normalised to sum 1 (rows with no visible key are 0). No scaling is applied to q . k.

    Raises if some |q . k| reaches the kernel's radius of convergence (not under torch.compile, where
    the data-dependent branch would break the graph; in a model ppSBN keeps |q . k| below the radius).
    """
    kernel = get_kernel(kernel)
    scores = q @ k.transpose(-1, -2)
    checks_radius = math.isfinite(kernel.radius) and not torch.compiler.is_compiling()
    if checks_radius and bool((scores.abs() >= kernel.radius).any()):
        raise MacformerError(
            f"|q . k| reaches {scores.abs().max().item():.3g}, outside the {kernel.name} kernel's radius "
            f"of convergence {kernel.radius}; normalise q and k first (ppSBN)"
        )
    weights = _pair_weights(q.shape[2], k.shape[2], causal, key_keep(key_padding_mask, k), None, scores)
    if kernel.log_exact is not None:  # normalise in log space: f(s) / sum f = exp(log f(s) - max) / sum
        logs = kernel.log_exact(scores).masked_fill(weights == 0, -math.inf)
        shift = logs.amax(-1, keepdim=True).clamp_min(torch.finfo(logs.dtype).min)
        values = torch.exp(logs - shift) * weights
    else:
        values = kernel.fn(scores) * weights
    return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: str | DotProductKernel = "exp",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact kernelized attention out_i = sum_j f(q_i . k_j) v_j / sum_j f(q_i . k_j): the ground truth
    random features approximate. No scaling is applied to q . k (scale q and k beforehand).

    Rows with no visible key give 0. Raises if some |q . k| reaches the kernel's radius of convergence.
    """
    check_qkv(q, k, v)
    return kernel_attention_weights(q, k, kernel, causal, key_padding_mask) @ v


def _explicit_sums(
    query_features: torch.Tensor, key_features: torch.Tensor, causal: bool,
    key_padding_mask: torch.Tensor | None, gate: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked, gated [n, n] matrix phi(Q) phi(K)^T and every row's key-feature sum z_i."""
    log_gate = log_gate_of(gate, key_padding_mask)
    weights = _pair_weights(
        query_features.shape[2], key_features.shape[2], causal,
        key_keep(key_padding_mask, key_features), log_gate, query_features,
    )
    return query_features @ key_features.transpose(-1, -2) * weights, weights @ key_features


def naive_feature_attention(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    eps: float = DENOMINATOR_EPS,
) -> torch.Tensor:
    """Feature attention through the explicit [n, n] matrix phi(Q) phi(K)^T (masked, gated): the
    reference for `feature_attention`. Inputs are features [b, h, n, D] and values [b, h, n, dv]."""
    scores, key_sums = _explicit_sums(query_features, key_features, causal, key_padding_mask, gate)
    return stabilised_ratio(scores @ v, scores.sum(-1), query_features, key_sums, eps)


def stabilised_rows(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = DENOMINATOR_EPS,
) -> torch.Tensor:
    """[b, h, n] True where the denominator stabiliser replaces the estimated denominator: rows whose
    estimate falls below eps * |phi(q_i)| |z_i| > 0 (a health diagnostic; rows with phi(q_i) = 0 or
    no visible key give 0 either way and are not counted)."""
    scores, key_sums = _explicit_sums(query_features, key_features, causal, key_padding_mask, None)
    floor = denominator_floor(query_features, key_sums, eps)
    return (scores.sum(-1) < floor) & (query_features.norm(dim=-1) * key_sums.norm(dim=-1) > 0)
