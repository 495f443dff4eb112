"""Transformer layers: multi-head attention of any configured type, and the pre-norm block."""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from macformer.attention import (
    causal_feature_attention,
    feature_attention,
    kernel_attention_weights,
    naive_feature_attention,
    stabilised_rows,
)
from macformer.config import MacformerConfig
from macformer.features import SpectralFeatures
from macformer.ppsbn import PostSBN, PreSBN

# Draws behind fresh_draw_error (health): a median of a few, robust to one unlucky draw.
FRESH_DRAWS = 3


@dataclass
class LayerCache:
    """Decoding memory of one attention layer: the O(D d) state S' of a feature attention, or the
    growing keys and values of softmax / exact kernel attention.

    Keys and values are written into buffers with room for `capacity` tokens (generate() sizes them
    for the prompt and every new token); appending past the room reallocates with twice as much, so a
    token costs an amortised O(1) copy. Concatenating instead copied the whole cache at every token:
    at 8k context that was more than half of a softmax decoding step."""

    state: torch.Tensor | None = None
    capacity: int = 0
    length: int = 0
    _key_buffer: torch.Tensor | None = field(default=None, repr=False)
    _value_buffer: torch.Tensor | None = field(default=None, repr=False)

    @property
    def keys(self) -> torch.Tensor | None:
        """[batch, heads, length, head_dim], a view of the buffer."""
        return None if self._key_buffer is None else self._key_buffer[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buffer is None else self._value_buffer[:, :, : self.length]

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (allocated room included): what decoding keeps in memory."""
        return [t for t in (self.state, self._key_buffer, self._value_buffer) if t is not None]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new tokens' keys and values ([batch, heads, new, head_dim]); returns all of them so far."""
        end = self.length + keys.shape[2]
        if self._key_buffer is None or end > self._key_buffer.shape[2]:
            room = max(end, self.capacity, 2 * (0 if self._key_buffer is None else self._key_buffer.shape[2]))
            self._key_buffer = self._grown(self._key_buffer, keys, room)
            self._value_buffer = self._grown(self._value_buffer, values, room)
        self._key_buffer[:, :, self.length:end] = keys
        self._value_buffer[:, :, self.length:end] = values
        self.length = end
        return self.keys, self.values

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor, room: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:2], room, new.shape[-1])
        if old is not None:
            buffer[:, :, : self.length] = old[:, :, : self.length]
        return buffer


class MacformerAttention(nn.Module):
    """Multi-head attention. q and k are first brought to the scale the kernel is evaluated at
    (preSBN; else l2-normalised where the attention's registry entry says so, d^-1/4 each otherwise,
    which makes softmax standard scaled dot-product attention), then attended with the configured
    mechanism (macformer.registry)."""

    def __init__(self, config: MacformerConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.spec = config.spec
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.pre_sbn = self.post_sbn = None
        if config.ppsbn:
            self.pre_sbn = PreSBN(
                config.num_heads, config.ppsbn_max_temperature, config.ppsbn_initial_temperature,
                learnable=config.ppsbn_learnable_temperature,
            )
            self.post_sbn = PostSBN(config.d_model)
        self.feature_map = None
        if self.spec.features is not None:
            self.feature_map = self.spec.features(config, config.seed * 10_007 + layer_index, config.oprf_rho)
        self.gate = nn.Linear(config.d_model, config.num_heads) if config.rfa_gate else None

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_sbn is not None:
            return self.pre_sbn(x)
        if self.spec.normalise_qk:
            return F.normalize(x, dim=-1)
        return x * self.config.head_dim**-0.25

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x.shape
        config = self.config
        q, k, v = self.qkv(x).view(batch, length, 3, config.num_heads, config.head_dim).permute(2, 0, 3, 1, 4)
        return self._scale(q), self._scale(k), v

    def _exact_reference(self, q: torch.Tensor, k: torch.Tensor) -> tuple[str | tuple[float, ...], torch.Tensor,
                                                                             torch.Tensor]:
        """(kernel, q, k) of the exact attention this layer computes or estimates: its kernel for rmfa
        and kernel attention; exp for softmax (q, k are already scaled) and for the spectral maps,
        which estimate exp(sigma^2 q . k)."""
        if self.spec.uses_kernel:
            return self.config.kernel, q, k
        if isinstance(self.feature_map, SpectralFeatures):
            sigma = self.feature_map.bandwidth().float()
            return "exp", q * sigma, k * sigma
        return "exp", q, k

    @torch.no_grad()
    def health(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> dict[str, float]:
        """How sharp this layer's attention is and how well its features estimate it, on input x
        (quadratic in length: for an evaluation batch). Keys:
        temperature (mean over heads) and temperature_head{h} under ppSBN; entropy: mean entropy of
        the exact attention rows divided by log(visible keys), 1 = uniform, 0 = one key; max_abs_qk:
        largest |q . k| between real tokens; for feature attention, approx_error (relative Frobenius
        error of the output against the exact attention), stabilised_rows (fraction of rows whose
        denominator the stabiliser replaced) and, for maps with random draws, fresh_draw_error: the
        same error with the map's next draws on the same inputs (the median of FRESH_DRAWS: one draw's
        error is heavy-tailed when keys cluster). Training adapts q and k to the one
        draw it sees, and can find directions where that draw's estimate is far off (an RMFA ListOps
        run at t ~ 0.6: approx_error 20-37 with a quarter of the rows stabilised, fresh draws 0.9-1.1x
        the exact denominators, none stabilised); approx_error well above fresh_draw_error says the
        model exploits its draw, which redrawing (feature_redraw_interval) prevents."""
        config = self.config
        q, k, v = (t.float() for t in self._project(x))
        real = None if key_padding_mask is None else (~key_padding_mask.bool())[:, None, :].float()
        scores = (q @ k.transpose(-1, -2)).abs()
        if real is not None:
            scores = scores * real[..., :, None] * real[..., None, :]
        metrics = {"max_abs_qk": float(scores.amax())}
        if self.pre_sbn is not None:
            temperatures = self.pre_sbn.temperature().flatten().tolist()
            metrics["temperature"] = sum(temperatures) / len(temperatures)
            metrics.update({f"temperature_head{h}": t for h, t in enumerate(temperatures)})
        kernel, exact_q, exact_k = self._exact_reference(q, k)
        weights = kernel_attention_weights(exact_q, exact_k, kernel, config.causal, key_padding_mask)
        visible = (weights > 0).sum(-1)
        row_entropy = -(weights * weights.clamp_min(torch.finfo(weights.dtype).tiny).log()).sum(-1)
        counted = visible > 1
        if real is not None:
            counted = counted & real.bool()
        normalised = row_entropy[counted] / visible[counted].float().log()
        metrics["entropy"] = float(normalised.mean()) if normalised.numel() else 0.0
        if self.feature_map is not None:  # through the explicit matrix, which the fast paths equal
            query_features, key_features = self.feature_map(q, is_query=True), self.feature_map(k)
            approx = naive_feature_attention(query_features, key_features, v, config.causal, key_padding_mask)
            exact = weights @ v
            tiny = torch.finfo(exact.dtype).tiny
            metrics["approx_error"] = float((approx - exact).norm() / exact.norm().clamp_min(tiny))
            if self.feature_map.redrawable:
                fresh, errors = copy.deepcopy(self.feature_map), []
                for _ in range(FRESH_DRAWS):
                    fresh.redraw()
                    approx = naive_feature_attention(fresh(q, is_query=True), fresh(k), v, config.causal,
                                                     key_padding_mask)
                    errors.append(float((approx - exact).norm() / exact.norm().clamp_min(tiny)))
                metrics["fresh_draw_error"] = statistics.median(errors)
            stabilised = stabilised_rows(query_features, key_features, config.causal, key_padding_mask)
            if real is not None:
                stabilised = stabilised[real.bool().expand_as(stabilised)]
            metrics["stabilised_rows"] = float(stabilised.float().mean())
        return metrics

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """x: [batch, seq, d_model]; key_padding_mask: [batch, seq], True at padding. With a cache
        (causal decoding), x holds the new tokens and the cache is updated in place."""
        batch, length, _ = x.shape
        config = self.config
        q, k, v = self._project(x)
        gate = torch.sigmoid(self.gate(x)).transpose(1, 2) if self.gate is not None else None
        if self.feature_map is not None:
            if cache is None:
                out = feature_attention(q, k, v, self.feature_map, causal=config.causal,
                                        key_padding_mask=key_padding_mask, gate=gate, chunk_size=config.chunk_size)
            else:
                out, cache.state = causal_feature_attention(q, k, v, self.feature_map, state=cache.state,
                                                            key_padding_mask=key_padding_mask, gate=gate,
                                                            chunk_size=config.chunk_size)
        else:
            if cache is not None:
                k, v = cache.append(k, v)
            out = self.spec.exact(q, k, v, config, key_padding_mask)
        out = out.transpose(1, 2).reshape(batch, length, config.d_model)
        if self.post_sbn is not None:
            out = self.post_sbn(out)
        return self.out(out)


class MacformerBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MacformerConfig, layer_index: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = MacformerAttention(config, layer_index)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff), nn.GELU(), nn.Linear(config.d_ff, config.d_model)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), key_padding_mask, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))
