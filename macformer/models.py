"""Macformer models: the Transformer trunk, an LRA-style sequence classifier and a causal LM.

Model code only: no distribution, no tracking. Save/load is safetensors + a JSON config, and a
reloaded model reproduces outputs exactly (the random features are buffers in the state dict).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_model, save_model
from torch import nn

from macformer.config import MacformerConfig
from macformer.errors import MacformerError
from macformer.layers import LayerCache, MacformerBlock

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def _padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """attention_mask (1 = token, 0 = padding, as in HF) -> key_padding_mask (True = padding)."""
    return None if attention_mask is None else attention_mask == 0


class PreTrainedMacformer(nn.Module):
    """Construction from a validated config, weight init, optimizer parameter groups, and
    safetensors save/load."""

    def __init__(self, config: MacformerConfig) -> None:
        super().__init__()
        if not isinstance(config, MacformerConfig):
            raise MacformerError(f"expected a MacformerConfig, got {type(config).__name__}")
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.embedding_init_std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def optimizer_groups(self, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for a torch optimizer: every parameter at `learning_rate` with
        `weight_decay`, except ppSBN's temperature logits, which train at
        config.ppsbn_temperature_lr_scale times the rate and without decay (decay would pull every
        temperature towards half its bound; see macformer.ppsbn)."""
        temperatures = [p for name, p in self.named_parameters() if name.endswith("temperature_logit")]
        chosen = {id(p) for p in temperatures}
        groups = [{"params": [p for p in self.parameters() if id(p) not in chosen], "lr": learning_rate,
                   "weight_decay": weight_decay}]
        if temperatures:
            groups.append({"params": temperatures, "lr": learning_rate * self.config.ppsbn_temperature_lr_scale,
                           "weight_decay": 0.0})
        return groups

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_FILE))
        payload = {"model_type": type(self).__name__, "config": self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> PreTrainedMacformer:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise MacformerError(f"{path} not found: expected a directory written by save_pretrained()")
        payload = json.loads(config_path.read_text())
        if payload.get("model_type") != cls.__name__:
            raise MacformerError(f"{directory} holds a {payload.get('model_type')}, not a {cls.__name__}")
        model = cls(MacformerConfig.from_saved(payload["config"]))
        load_model(model, str(weights_path), device=str(device))
        return model.to(device)


class MacformerModel(PreTrainedMacformer):
    """Token + learned position embeddings, `num_layers` blocks, final LayerNorm. With
    pooling="cls" (non-causal), a learned [CLS] vector is prepended at position 0."""

    def __init__(self, config: MacformerConfig) -> None:
        super().__init__(config)
        self.uses_cls = config.pooling == "cls" and not config.causal
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_seq_len + int(self.uses_cls), config.d_model)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, config.d_model)) if self.uses_cls else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(MacformerBlock(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward instead of storing them (less memory)."""
        self.gradient_checkpointing = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """input_ids [batch, seq] -> hidden states [batch, seq (+1 with CLS), d_model]."""
        if input_ids.dim() != 2:
            raise MacformerError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if position_offset + length > self.config.max_seq_len:
            raise MacformerError(
                f"sequence of {position_offset + length} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                "raise max_seq_len in the config or shorten the input"
            )
        # On CPU the check is free; on an accelerator it would stall every forward on a host sync, and
        # the data boundary checks ids instead (the trainer on the driver, generate on its prompt). A
        # compiled decoding step leaves it out too (a graph break): its tokens were sampled by the model.
        checks_ids = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
        if checks_ids and bool(((input_ids < 0) | (input_ids >= self.config.vocab_size)).any()):
            raise MacformerError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size})")
        x = self.token_embedding(input_ids)
        padding = _padding_mask(attention_mask)
        if self.cls_embedding is not None:
            x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
            if padding is not None:
                padding = F.pad(padding, (1, 0), value=False)
        positions = torch.arange(position_offset, position_offset + x.shape[1], device=x.device)
        x = self.dropout(x + self.position_embedding(positions))
        for block in self.blocks:  # once per forward pass, outside any recomputation
            if block.attention.feature_map is not None:
                block.attention.feature_map.maybe_redraw()
        for index, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and caches is None:
                x = torch.utils.checkpoint.checkpoint(block, x, padding, use_reentrant=False)
            else:
                x = block(x, padding, None if caches is None else caches[index])
        return self.norm(x)


    @torch.no_grad()
    def attention_health(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Every layer's attention diagnostics (MacformerAttention.health) on the hidden states this
        input produces, as attention/layer{i}/{name}, plus the mean over layers of each as
        attention_{name} (attention_approx_error: 0 for exact attention)."""
        per_layer: list[dict[str, float]] = []

        def measure(module: nn.Module, args: tuple) -> None:
            per_layer.append(module.health(args[0], args[1] if len(args) > 1 else None))

        hooks = [block.attention.register_forward_pre_hook(measure) for block in self.blocks]
        try:
            self(input_ids, attention_mask)
        finally:
            for hook in hooks:
                hook.remove()
        metrics = {f"attention/layer{i}/{name}": value for i, layer in enumerate(per_layer)
                   for name, value in layer.items()}
        for name in ("temperature", "entropy", "max_abs_qk", "approx_error", "fresh_draw_error", "stabilised_rows"):
            values = [layer[name] for layer in per_layer if name in layer]
            if values or name == "approx_error":
                metrics[f"attention_{name}"] = sum(values) / len(values) if values else 0.0
        return metrics


class MacformerForSequenceClassification(PreTrainedMacformer):
    """Bidirectional encoder + pooling (masked mean or CLS) + 2-layer MLP head, as in Long Range
    Arena. With dual_encoder=True (LRA Retrieval) both inputs go through the shared encoder and the
    head sees [u, v, u * v, u - v]."""

    def __init__(self, config: MacformerConfig) -> None:
        super().__init__(config)
        if config.num_classes is None:
            raise MacformerError("MacformerForSequenceClassification needs config.num_classes")
        if config.causal:
            raise MacformerError("MacformerForSequenceClassification is a bidirectional encoder: set causal=False")
        self.encoder = MacformerModel(config)
        pooled = config.d_model * (4 if config.dual_encoder else 1)
        self.head = nn.Sequential(
            nn.Linear(pooled, config.d_model), nn.GELU(), nn.Linear(config.d_model, config.num_classes)
        )
        self.head.apply(self._init_weights)

    @property
    def trunk(self) -> MacformerModel:
        """The Transformer under the head (embeddings and blocks)."""
        return self.encoder

    def _pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pair_input_ids: torch.Tensor | None = None,
        pair_attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        pooled = self._pool(input_ids, attention_mask)
        if self.config.dual_encoder:
            if pair_input_ids is None:
                raise MacformerError("dual_encoder=True needs pair_input_ids (the second document)")
            other = self._pool(pair_input_ids, pair_attention_mask)
            pooled = torch.cat([pooled, other, pooled * other, pooled - other], dim=-1)
        elif pair_input_ids is not None:
            raise MacformerError("pair_input_ids given but config.dual_encoder is False")
        logits = self.head(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ModelOutput(logits, loss)


class MacformerForCausalLM(PreTrainedMacformer):
    """Decoder-only LM. Training uses chunked causal attention; `generate()` decodes with the
    recurrent O(D d) state for feature attentions and a KV cache for softmax / kernel attention."""

    def __init__(self, config: MacformerConfig) -> None:
        super().__init__(config)
        if not config.causal:
            raise MacformerError("MacformerForCausalLM needs causal=True in its MacformerConfig")
        self.model = MacformerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.token_embedding.weight

    @property
    def trunk(self) -> MacformerModel:
        """The Transformer under the LM head (embeddings and blocks)."""
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """labels align with input_ids (shifted inside: position t predicts token t + 1);
        label -100 is ignored."""
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return ModelOutput(logits, loss)

    def decoding_step(self, compile: bool = False) -> Callable[[torch.Tensor, list[LayerCache], int], torch.Tensor]:
        """What generate() runs per new token: (tokens [batch, 1], caches, the tokens' position) ->
        next-token logits [batch, vocab], the caches updated in place. On CPU most of a step's time is
        the dispatch of a few dozen small ops per layer; compile=True runs it through torch.compile
        instead (one compiled function for every model; the first step compiles, ~20 s on CPU, and the
        second once more with the position made dynamic; benchmarks/RESULTS.md, "Decoding")."""
        step = _compiled_next_token_logits() if compile else _next_token_logits
        return functools.partial(step, self)

    def new_caches(self, capacity: int = 0) -> list[LayerCache]:
        """Empty decoding caches, one per layer; `capacity`: tokens a KV cache makes room for at once."""
        return [LayerCache(capacity=capacity) for _ in range(self.config.num_layers)]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Continue each prompt by up to `max_new_tokens` tokens (temperature 0: greedy). Sequences
        that emit `eos_token_id` are padded with it afterwards. Returns [batch, prompt + new].
        compile: decode through torch.compile (`decoding_step`): worth it for long generations."""
        if max_new_tokens < 0 or temperature < 0:
            raise MacformerError("generate() needs max_new_tokens >= 0 and temperature >= 0")
        was_training = self.training
        self.eval()  # frozen features and no dropout while the caches are built
        try:
            next_logits = self.decoding_step(compile)
            caches = self.new_caches(capacity=input_ids.shape[1] + max_new_tokens)
            logits = self.lm_head(self.model(input_ids, caches=caches))[:, -1]
            tokens, finished = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            position = input_ids.shape[1]
            for step in range(max_new_tokens):
                next_token = self._sample(logits.float(), temperature, top_k, generator)
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(finished, eos_token_id)
                    finished |= next_token == eos_token_id
                tokens.append(next_token[:, None])
                if step + 1 == max_new_tokens or bool(finished.all()):
                    break
                logits = next_logits(next_token[:, None], caches, position)
                position += 1
            return torch.cat(tokens, dim=1)
        finally:
            self.train(was_training)

    @staticmethod
    def _sample(
        logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _next_token_logits(model: MacformerForCausalLM, tokens: torch.Tensor, caches: list[LayerCache],
                       position: int) -> torch.Tensor:
    return model.lm_head(model.model(tokens, caches=caches, position_offset=position))[:, -1]


@functools.cache
def _compiled_next_token_logits() -> Callable[..., torch.Tensor]:
    return torch.compile(_next_token_logits)
