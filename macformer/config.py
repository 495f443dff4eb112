"""MacformerConfig: the one model configuration object, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from macformer.errors import MacformerError, is_positive_int
from macformer.features.maclaurin import aligned_pair_relative_std
from macformer.features.spectral import COMPONENTS, LEARNED_WEIGHTS, WEIGHTS, default_oprf_rho, gerf_parameters
from macformer.kernels import KERNELS, get_kernel
from macformer.ppsbn import TEMPERATURE_LR_SCALE, rmfa_temperature_bound, series_temperature_bound
from macformer.registry import ATTENTIONS, AttentionSpec

POOLINGS = ("mean", "cls")
EMBEDDING_INIT_STD = 1.0
# What every config saved before embedding_init_std existed used.
LEGACY_EMBEDDING_INIT_STD = 0.02


def _fail(name: str, value: Any, expected: str) -> None:
    raise MacformerError(f"MacformerConfig.{name}: expected {expected}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not is_positive_int(value):
        _fail(name, value, "a positive integer")


@dataclass(frozen=True)
class MacformerConfig:
    """Model configuration. Every field is checked at construction; errors name the field and the fix.

    attention: "softmax" (SDPA), "rmfa" (random Maclaurin features of `kernel`), "random_features"
    (Spectraformer's `component` x `weights` pair estimating softmax attention), "rfa" (the pair
    trigrf x gaussian on l2-normalised q, k, optional recency gate), "favor" (posrf x orthogonal) or
    "kernel" (exact quadratic kernelized attention with `kernel`, the ground truth for rmfa).
    component / weights: see macformer.features.spectral (default: the attention's pair; rfa and
    favor accept other `weights`). gerf_a, gerf_sign: component "gerf"'s free parameters; oprf_rho:
    OPRF's expected |q + k|^2 / head_dim (None: 2t / head_dim under ppSBN with its initial temperature t,
    else 2 / sqrt(head_dim) for unit-variance q, k scaled by head_dim^-1/4).
    feature_redraw_interval: redraw random features every this many training forward passes
    (None: never; 1: every call); learned weights (fastfood_learned) are never redrawn.
    kernel: a name in macformer.kernels.KERNELS or a list of non-negative Maclaurin coefficients.
    num_features: D, features per head. p: degree distribution of RMFA (> 1).
    constant_feature / linear_features: RMFA computes the degree-0 term (and the degree-1 term, with
    head_dim of its D features) exactly and samples only higher degrees: at equal D, about 9x lower
    error than sampling every degree under ppSBN (benchmarks/RESULTS.md).
    ppsbn: pre/post scaling normalisation (needed by kernels with a finite radius of convergence).
    None (default) resolves to the attention's published form: on for rmfa and kernel (Macformer's),
    off for softmax, rfa, favor and random_features (whose papers do not use it; its bounded temperature
    also keeps their attention flat early in training: benchmarks/RESULTS.md, quality at equal steps).
    ppsbn_max_temperature, ppsbn_initial_temperature: bound on |q . k| after preSBN and its starting
    value. Default (macformer.ppsbn): for rmfa the largest t at which the random-feature noise of the
    aligned pair (x = y) stays within 20% of its value f(t) at this D (exp: 1.37 at D = 128, head_dim
    32), and inside
    the finite-variance region 3 p t^2 < 1 for radius-1 kernels; 2 (or 0.95 of a finite radius) for
    exact kernels and the softmax estimators; start at half the bound. ppsbn_temperature_lr_scale:
    learning-rate multiplier of the temperature (applied by PreTrainedMacformer.optimizer_groups).
    The resolved values are stored, so a saved config names what it used.
    causal: causal attention (language modelling); chunk_size: tokens per chunk of causal feature attention.
    embedding_init_std: standard deviation of the token and position embeddings at initialisation
    (linear layers start at 0.02). None (default) resolves to 1 (PyTorch's nn.Embedding default), or to
    d_model^-1/2 for a causal LM whose output layer shares the token embeddings (tie_embeddings), so
    that its logits start at unit scale (at 1 they would start at sqrt(d_model): softmax's byte-level
    LM perplexity after 300 steps was 15.8 / 17.8). GPT-2's 0.02, used before, is too small for a small
    model: its embeddings are soon drowned in the residual stream by what the blocks add, and where
    attention is near-uniform (ppSBN's bounded temperature) that addition is the same for every token,
    so the tokens' hidden states collapse onto one direction and the encoder's gradients vanish. RMFA
    stayed at the majority class on ListOps for 2000 steps on one seed, and its LM perplexity was 3.2%
    behind softmax's instead of 1.9% (benchmarks/RESULTS.md, issue #13).
    """

    vocab_size: int = 256
    num_classes: int | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    d_ff: int = 128
    dropout: float = 0.0
    embedding_init_std: float | None = None
    max_seq_len: int = 2048
    attention: str = "rmfa"
    kernel: str | tuple[float, ...] = "exp"
    num_features: int = 128
    p: float = 2.0
    constant_feature: bool = True
    linear_features: bool = True
    max_degree: int | None = None
    feature_redraw_interval: int | None = None
    ppsbn: bool | None = None
    ppsbn_learnable_temperature: bool = True
    ppsbn_max_temperature: float | None = None
    ppsbn_initial_temperature: float | None = None
    ppsbn_temperature_lr_scale: float = TEMPERATURE_LR_SCALE
    rfa_gate: bool = False
    rfa_learned_sigma: bool = False
    component: str | None = None
    weights: str | None = None
    gerf_a: float = 0.0
    gerf_sign: int = 1
    oprf_rho: float | None = None
    causal: bool = False
    chunk_size: int = 64
    pooling: str = "mean"
    dual_encoder: bool = False
    tie_embeddings: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.kernel, list):
            object.__setattr__(self, "kernel", tuple(self.kernel))
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len",
                     "num_features", "chunk_size"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.num_heads:
            _fail("d_model", self.d_model, f"a multiple of num_heads={self.num_heads}")
        if self.num_classes is not None:
            _positive_int("num_classes", self.num_classes)
            if self.num_classes < 2:
                _fail("num_classes", self.num_classes, "at least 2 classes")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            _fail("dropout", self.dropout, "a probability in [0, 1)")
        if self.embedding_init_std is None:
            tied = self.causal and self.tie_embeddings
            object.__setattr__(self, "embedding_init_std", self.d_model**-0.5 if tied else EMBEDDING_INIT_STD)
        std = self.embedding_init_std
        if isinstance(std, bool) or not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
            _fail("embedding_init_std", std, "a positive number")
        if self.attention not in ATTENTIONS:
            _fail("attention", self.attention, f"one of {', '.join(ATTENTIONS)}")
        spec = self.spec
        if self.ppsbn is None:
            object.__setattr__(self, "ppsbn", spec.ppsbn_default)
        if not isinstance(self.ppsbn, bool):
            _fail("ppsbn", self.ppsbn, "True, False or None (the attention's default)")
        if isinstance(self.kernel, str) and self.kernel not in KERNELS:
            _fail("kernel", self.kernel, f"one of {', '.join(KERNELS)} or a coefficient list")
        kernel = get_kernel(self.kernel)  # validates coefficient lists
        if not (isinstance(self.p, (int, float)) and math.isfinite(self.p) and self.p > 1):
            _fail("p", self.p, "a finite number > 1")
        if self.max_degree is not None and (not isinstance(self.max_degree, int) or self.max_degree < 1):
            _fail("max_degree", self.max_degree, "a positive integer or None")
        if self.feature_redraw_interval is not None:
            _positive_int("feature_redraw_interval", self.feature_redraw_interval)
        if spec.maclaurin and self.linear_features:
            if not self.constant_feature:
                _fail("linear_features", self.linear_features, "False unless constant_feature=True")
            if self.num_features <= self.head_dim + 1:
                _fail("num_features", self.num_features, f"more than head_dim + 1 = {self.head_dim + 1} with "
                      "linear_features=True (or set linear_features=False)")
        for name in ("rfa_gate", "rfa_learned_sigma"):  # fields of one attention, off elsewhere
            if getattr(self, name) and name not in spec.fields:
                owners = [n for n, s in ATTENTIONS.items() if name in s.fields]
                _fail(name, getattr(self, name), f"False unless attention is {' or '.join(owners)}")
        if self.rfa_gate and not self.causal:
            _fail("rfa_gate", self.rfa_gate, "False unless causal=True (a recency gate)")
        self._resolve_temperature(kernel)
        self._check_spectral_pair()
        if self.pooling not in POOLINGS:
            _fail("pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        if self.dual_encoder and self.num_classes is None:
            _fail("dual_encoder", self.dual_encoder, "False unless num_classes is set (retrieval classifier)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "an integer")

    def _resolve_temperature(self, kernel) -> None:
        uses_kernel = self.spec.uses_kernel
        radius = kernel.radius if uses_kernel else math.inf
        if uses_kernel and math.isfinite(radius) and not self.ppsbn:
            _fail("ppsbn", self.ppsbn, f"True: the {kernel.name} kernel converges only for |q.k| < "
                  f"{radius}, which ppSBN guarantees")
        if not (isinstance(self.ppsbn_temperature_lr_scale, (int, float)) and self.ppsbn_temperature_lr_scale > 0):
            _fail("ppsbn_temperature_lr_scale", self.ppsbn_temperature_lr_scale, "a positive number")
        if not self.ppsbn:
            return
        bound = self.ppsbn_max_temperature
        if bound is None:
            bound = self._rmfa_bound(kernel) if self.spec.maclaurin else series_temperature_bound(radius)
            object.__setattr__(self, "ppsbn_max_temperature", bound)
        if not (isinstance(bound, (int, float)) and 0 < bound < radius):
            _fail("ppsbn_max_temperature", bound, f"a positive number below the kernel's radius {radius}")
        if self.ppsbn_initial_temperature is None:
            object.__setattr__(self, "ppsbn_initial_temperature", bound / 2)
        initial = self.ppsbn_initial_temperature
        if not (isinstance(initial, (int, float)) and 0 < initial < bound):
            _fail("ppsbn_initial_temperature", initial, f"a number in (0, ppsbn_max_temperature={bound})")

    def _rmfa_bound(self, kernel) -> float:
        exact_degrees = int(self.constant_feature) + int(self.linear_features)
        num_random = self.num_features - int(self.constant_feature) - self.head_dim * int(self.linear_features)
        max_degree = self.max_degree if kernel.max_degree is None else min(self.max_degree or kernel.max_degree,
                                                                           kernel.max_degree)
        if max_degree is not None and max_degree < exact_degrees:  # nothing sampled: no noise
            return series_temperature_bound(kernel.radius)
        return rmfa_temperature_bound(
            lambda t: aligned_pair_relative_std(kernel, t, num_random, self.p, exact_degrees, max_degree),
            kernel.radius, self.p)

    def _check_spectral_pair(self) -> None:
        """Default and check (component, weights) of Spectraformer features; resolve oprf_rho, OPRF's
        expected |q + k|^2 / head_dim: 2t / head_dim under ppSBN with initial temperature t."""
        spec = self.spec
        if spec.spectral_pair is None:
            spectral = [name for name, s in ATTENTIONS.items() if s.spectral_pair]
            for name in ("component", "weights", "oprf_rho"):
                if getattr(self, name) is not None:
                    _fail(name, getattr(self, name), f"None unless attention is {', '.join(spectral)}")
            return
        component, weights = spec.spectral_pair
        if self.component is None:
            object.__setattr__(self, "component", component)
        if self.weights is None:
            object.__setattr__(self, "weights", weights)
        if self.component not in COMPONENTS:
            _fail("component", self.component, f"one of {', '.join(COMPONENTS)}")
        if spec.fixed_component and self.component != component:
            _fail("component", self.component, f"{component!r} for attention={self.attention!r} "
                  "(use attention='random_features' for other pairs)")
        if self.component == "oprf" and self.oprf_rho is None:
            rho = 2 * self.ppsbn_initial_temperature / self.head_dim if self.ppsbn else default_oprf_rho(self.head_dim)
            object.__setattr__(self, "oprf_rho", rho)
        if self.weights not in WEIGHTS:
            _fail("weights", self.weights, f"one of {', '.join(WEIGHTS)}")
        try:
            sign, _ = gerf_parameters(self.component, self.head_dim, self.gerf_a, self.gerf_sign, self.oprf_rho)
        except ValueError as error:
            raise MacformerError(f"MacformerConfig: {error}") from None
        if sign < 0 and self.num_features % 2:
            _fail("num_features", self.num_features, f"an even number for component {self.component!r} (cos/sin pairs)")
        rows = self.num_features // 2 if sign < 0 else self.num_features
        if self.weights == "moment_matched" and rows <= self.head_dim:
            _fail("num_features", self.num_features, f"more than {self.head_dim} weight rows for moment-matched "
                  "weights (identity covariance needs more rows than head_dim)")
        if self.weights in LEARNED_WEIGHTS and self.feature_redraw_interval is not None:
            _fail("feature_redraw_interval", self.feature_redraw_interval,
                  f"None with weights={self.weights!r} (learned weights are trained, not redrawn)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def spec(self) -> AttentionSpec:
        return ATTENTIONS[self.attention]

    def variant(self) -> str:
        """A short name of the attention mechanism: 'rmfa-exp', 'random_features-oprf-qmc', 'softmax'."""
        if self.spec.uses_kernel:
            return f"{self.attention}-{self.kernel if isinstance(self.kernel, str) else 'custom'}"
        if self.spec.spectral_pair:
            return f"{self.attention}-{self.component}-{self.weights}"
        return self.attention

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.kernel, tuple):
            data["kernel"] = list(self.kernel)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MacformerConfig:
        """Build from a mapping; unknown keys are an error (typos must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MacformerError(
                f"MacformerConfig: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> MacformerConfig:
        """A config read back from a saved model. Configs saved before the temperature scheme (no
        ppsbn_initial_temperature key) left the bound unresolved and meant: 2.0 for infinite-radius
        kernels, 0.99 radius / sqrt(p) otherwise, starting at min(head_dim^-1/2, bound / 2), with no
        learning-rate multiplier; they are resolved so, and their models reproduce their outputs.
        Configs without embedding_init_std were initialised at 0.02 (retraining one starts the same)."""
        data = {"embedding_init_std": LEGACY_EMBEDDING_INIT_STD, **data}
        if "ppsbn_initial_temperature" in data:
            return cls.from_dict(data)
        config = cls.from_dict({**data, "ppsbn_temperature_lr_scale": 1.0})
        if not config.ppsbn:
            return config
        bound = data.get("ppsbn_max_temperature")
        if bound is None:
            radius = get_kernel(config.kernel).radius if config.spec.uses_kernel else math.inf
            bound = 0.99 * radius / math.sqrt(config.p) if math.isfinite(radius) else 2.0
        return dataclasses.replace(config, ppsbn_max_temperature=bound,
                                   ppsbn_initial_temperature=min(config.head_dim**-0.5, bound / 2))
