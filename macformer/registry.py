"""The attention registry: one entry per attention mechanism, holding everything MacformerConfig and
MacformerAttention need to know about it. Adding an attention is one entry here plus its module
(README, "Adding an attention")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from macformer.attention import kernel_attention, softmax_attention
from macformer.features import FeatureMap, RandomMaclaurinFeatures, SpectralFeatures

if TYPE_CHECKING:
    from macformer.config import MacformerConfig

# (q, k, v, config, key_padding_mask) -> attention output: the quadratic attentions' computation.
ExactAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "MacformerConfig", torch.Tensor | None],
                          torch.Tensor]
# (config, seed, oprf_rho) -> the layer's random feature map.
FeatureMapBuilder = Callable[["MacformerConfig", int, float | None], FeatureMap]


def maclaurin_features(config: MacformerConfig, seed: int, oprf_rho: float | None) -> FeatureMap:
    return RandomMaclaurinFeatures(
        config.head_dim, config.num_features, kernel=config.kernel, p=config.p,
        constant_feature=config.constant_feature, linear_features=config.linear_features,
        max_degree=config.max_degree, seed=seed, redraw_interval=config.feature_redraw_interval,
    )


def spectral_features(config: MacformerConfig, seed: int, oprf_rho: float | None) -> FeatureMap:
    return SpectralFeatures(
        config.head_dim, config.num_features, component=config.component, weights=config.weights,
        learned_sigma=config.rfa_learned_sigma, num_heads=config.num_heads, gerf_a=config.gerf_a,
        gerf_sign=config.gerf_sign, oprf_rho=oprf_rho, seed=seed, redraw_interval=config.feature_redraw_interval,
    )


def _softmax(q, k, v, config: MacformerConfig, key_padding_mask):
    return softmax_attention(q, k, v, config.causal, key_padding_mask, scale=1.0)  # q, k carry the scale


def _kernel(q, k, v, config: MacformerConfig, key_padding_mask):
    return kernel_attention(q, k, v, config.kernel, config.causal, key_padding_mask)


@dataclass(frozen=True)
class AttentionSpec:
    """What an attention is. Exactly one of `features` (linear-time, random features) and `exact`
    (quadratic) is set.

    uses_kernel: the config's `kernel` is what it computes or estimates (its exact reference and
    ppSBN bound follow the kernel); otherwise the reference is exp of the scaled q . k (softmax).
    ppsbn_default: its published form wraps it in ppSBN. spectral_pair: the default (component,
    weights) of its Spectraformer features; fixed_component: other components are refused.
    normalise_qk: without ppSBN q and k are l2-normalised (else scaled by head_dim^-1/4 each).
    maclaurin: RMFA's degree settings and estimator-set temperature bound apply. fields: config
    fields only this attention accepts (set elsewhere they are an error)."""

    description: str
    features: FeatureMapBuilder | None = None
    exact: ExactAttention | None = None
    uses_kernel: bool = False
    ppsbn_default: bool = False
    spectral_pair: tuple[str, str] | None = None
    fixed_component: bool = True
    normalise_qk: bool = False
    maclaurin: bool = False
    fields: tuple[str, ...] = ()


ATTENTIONS: dict[str, AttentionSpec] = {
    "softmax": AttentionSpec("PyTorch SDPA", exact=_softmax),
    "rmfa": AttentionSpec("random Maclaurin features of `kernel` (the Macformer paper)", features=maclaurin_features,
                          uses_kernel=True, ppsbn_default=True, maclaurin=True),
    "rfa": AttentionSpec("random Fourier features (trigrf x gaussian) on l2-normalised q, k (Peng et al.)",
                         features=spectral_features, spectral_pair=("trigrf", "gaussian"), normalise_qk=True,
                         fields=("rfa_gate", "rfa_learned_sigma")),
    "favor": AttentionSpec("FAVOR+ positive orthogonal features (posrf x orthogonal)", features=spectral_features,
                           spectral_pair=("posrf", "orthogonal")),
    "random_features": AttentionSpec("Spectraformer's `component` x `weights` pair", features=spectral_features,
                                     spectral_pair=("posrf", "orthogonal"), fixed_component=False),
    "kernel": AttentionSpec("exact kernelized attention with `kernel` (RMFA's ground truth)", exact=_kernel,
                            uses_kernel=True, ppsbn_default=True),
}
