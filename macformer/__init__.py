"""Macformer: random-feature (linear-time) attention for long-sequence Transformers. Pure PyTorch.

    from macformer import MacformerConfig, MacformerForCausalLM
    model = MacformerForCausalLM(MacformerConfig(attention="rmfa", kernel="exp", num_features=128, causal=True))
"""

from macformer.config import MacformerConfig
from macformer.models import (
    MacformerForCausalLM,
    MacformerForSequenceClassification,
    MacformerModel,
    ModelOutput,
)

__all__ = [
    "MacformerConfig",
    "MacformerForCausalLM",
    "MacformerForSequenceClassification",
    "MacformerModel",
    "ModelOutput",
]
__version__ = "0.1.0"
