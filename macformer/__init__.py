"""Macformer: random-feature (linear-time) attention for long-sequence Transformers. Pure PyTorch.

    from macformer import MacformerConfig, MacformerForCausalLM
    model = MacformerForCausalLM(MacformerConfig(attention="rmfa", kernel="exp", num_features=128, causal=True))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from macformer.config import MacformerConfig
    from macformer.models import MacformerForCausalLM, MacformerForSequenceClassification, MacformerModel, ModelOutput

# Loaded on first use, so that light modules (macformer.errors) import without torch.
_EXPORTS = {"MacformerConfig": "macformer.config", "MacformerForCausalLM": "macformer.models",
            "MacformerForSequenceClassification": "macformer.models", "MacformerModel": "macformer.models",
            "ModelOutput": "macformer.models"}

__all__ = [
    "MacformerConfig",
    "MacformerForCausalLM",
    "MacformerForSequenceClassification",
    "MacformerModel",
    "ModelOutput",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'macformer' has no attribute {name!r}")
