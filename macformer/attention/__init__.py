"""Attention: the linear-time feature path, with the exact quadratic references beside it.

- `feature_attention`: random-feature attention, O(n D d) (non-causal, chunked causal, gated).
- `causal_feature_attention`: causal feature attention that carries its O(D d) state (prefill, decoding).
- `causal_linear_attention` / `recurrent_step`: the chunked and recurrent causal forms on features.
- `kernel_attention`: exact kernelized attention, the ground truth that features approximate
  (`kernel_attention_weights`: its normalised n x n matrix).
- `naive_feature_attention`: feature attention through the explicit n x n matrix (test reference);
  `stabilised_rows`: where its denominator stabiliser acts (a diagnostic).
- `softmax_attention`: PyTorch SDPA.
"""

from macformer.attention.common import DENOMINATOR_EPS
from macformer.attention.linear import (
    DEFAULT_CHUNK_SIZE,
    causal_feature_attention,
    causal_linear_attention,
    feature_attention,
    noncausal_linear_attention,
    recurrent_step,
)
from macformer.attention.naive import (
    kernel_attention,
    kernel_attention_weights,
    naive_feature_attention,
    stabilised_rows,
)
from macformer.attention.softmax import softmax_attention

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DENOMINATOR_EPS",
    "causal_feature_attention",
    "causal_linear_attention",
    "feature_attention",
    "kernel_attention",
    "kernel_attention_weights",
    "naive_feature_attention",
    "noncausal_linear_attention",
    "recurrent_step",
    "softmax_attention",
    "stabilised_rows",
]
