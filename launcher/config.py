"""TrainConfig: one validated configuration for `macformer train`, from YAML plus key=value overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from macformer.config import MacformerConfig
from macformer.errors import MacformerError, check_positive_int
from pipelines.errors import PipelineError
from pipelines.shards import load_manifest
from pipelines.storage import is_uri

TASKS = ("causal_lm", "classification")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "onecycle")
DEFAULT_WARMUP_STEPS = 10  # constant and cosine schedules; onecycle has its own rise


class ConfigError(PipelineError):
    pass


def yaml_value(value: Any) -> str:
    """One value as YAML text for a key=value setting (inside a list, so no document-end marker)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict[str, Any]": (dict,)}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Settings come from YAML: check each against its annotation ("int", "str | None", ...)."""
    optional = annotation.endswith(" | None")
    if value is None and optional:
        return
    expected = _TYPES[annotation.removesuffix(" | None")]
    if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
        kind = annotation.removesuffix(" | None") + (" or null" if optional else "")
        raise ConfigError(f"setting {name}: expected {kind}, got {value!r} ({type(value).__name__})")


def default_run_name(model: MacformerConfig) -> str:
    """What trains and when: rmfa-exp-D128-ppsbn-20261201-101710, softmax-20261201-101710."""
    parts = [model.variant()]
    if model.spec.features is not None:
        parts.append(f"D{model.num_features}")
    if model.ppsbn:
        parts.append("ppsbn")
    return "-".join([*parts, time.strftime("%Y%m%d-%H%M%S")])


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. `model` holds the MacformerConfig settings as written (a
    mapping); `resolved()` turns it into the MacformerConfig, completing vocab_size,
    num_classes, max_seq_len and causal from the dataset's manifest, and names the run after what it
    trains unless run_name is given: the driver does it once and the workers receive the result."""

    data: str
    task: str = "causal_lm"
    model: dict[str, Any] | MacformerConfig = field(default_factory=dict)
    num_workers: int = 2
    use_gpu: bool = False
    micro_batch_size: int = 4
    gradient_accumulation: int = 1
    max_steps: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int | None = None
    gradient_clipping: float = 1.0
    precision: str = "fp32"
    zero_stage: int = 0
    deepspeed_config: str | None = None
    activation_checkpointing: bool = False
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 0
    seed: int = 0
    experiment: str = "macformer"
    run_name: str | None = None
    storage_path: str = "runs"
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    train_split: str | None = None
    eval_split: str | None = None

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type.startswith("float") and isinstance(value, str):  # YAML reads 1e-3 as a string
                with contextlib.suppress(ValueError):
                    object.__setattr__(self, item.name, float(value))
            if not (item.name == "model" and isinstance(self.model, MacformerConfig)):
                _check_type(item.name, getattr(self, item.name), item.type.split(" | MacformerConfig")[0])
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        for name in ("num_workers", "micro_batch_size", "gradient_accumulation", "max_steps", "eval_every",
                     "eval_batches", "checkpoint_every", "keep_checkpoints"):
            check_positive_int(name, getattr(self, name), ConfigError)
        if self.schedule == "onecycle" and self.warmup_steps is not None:
            raise ConfigError("schedule onecycle warms up over its own first 30% of max_steps; remove warmup_steps "
                              "(or use schedule cosine or constant, which take it)")
        if self.schedule != "onecycle" and self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", DEFAULT_WARMUP_STEPS)
        if self.max_failures < 0 or (self.warmup_steps or 0) < 0:
            raise ConfigError("max_failures and warmup_steps must be >= 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ConfigError("precision fp16 needs GPUs (DeepSpeed refuses it on CPU); use bf16 or fp32")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"deepspeed_config {self.deepspeed_config} not found; give a JSON file path")

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
        """YAML file (optional) + `key=value` overrides (`model.num_features=64`); values parse as YAML."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config {path} not found; pass --config configs/<experiment>.yaml")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"config {path} is not valid YAML ({str(error).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config {path} must be a mapping of settings")
        for override in overrides:
            key, sep, raw = override.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {override!r} is not key=value (e.g. model.num_features=64)")
            target = data
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"override {override!r}: {parent} is not a section")
            target[leaf] = yaml.safe_load(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        if "data" not in data:
            raise ConfigError("no data directory: set data: (a `macformer prepare` or `macformer lra` output)")
        return cls(**data)

    def with_absolute_paths(self) -> TrainConfig:
        """Local paths made absolute: Ray workers run in another working directory."""
        def absolute(path: str | None) -> str | None:
            return path if path is None or is_uri(path) else str(Path(path).resolve())

        return dataclasses.replace(self, data=absolute(self.data), deepspeed_config=absolute(self.deepspeed_config),
                                   storage_path=absolute(self.storage_path),
                                   tracking_uri=self.resolved_tracking_uri())

    def to_dict(self) -> dict[str, Any]:
        model = self.model.to_dict() if isinstance(self.model, MacformerConfig) else dict(self.model)
        return {**dataclasses.asdict(dataclasses.replace(self, model={})), "model": model}

    def run_directory(self) -> str:
        """Where Ray Train keeps this run's checkpoints."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    def resolved_tracking_uri(self) -> str:
        from launcher.tracking import default_tracking_uri

        return default_tracking_uri(self.tracking_uri)

    def resolved(self, manifest: dict[str, Any] | None = None) -> TrainConfig:
        """This config with `model` as a MacformerConfig completed from the dataset manifest (read
        here unless given) and a run_name (default: what trains and when, e.g.
        rmfa-exp-D128-ppsbn-20261201-101710); unchanged if resolved already."""
        if isinstance(self.model, MacformerConfig):
            return self if self.run_name else dataclasses.replace(self, run_name=default_run_name(self.model))
        manifest = load_manifest(self.data) if manifest is None else manifest
        settings = dict(self.model)
        if self.task == "causal_lm":
            if manifest["kind"] != "causal_lm":
                raise ConfigError(f"{self.data} is a {manifest['kind']} dataset; use task: classification")
            settings.setdefault("vocab_size", manifest["tokenizer"]["vocab_size"])
            settings.setdefault("max_seq_len", manifest["seq_len"] + 1)
            settings.setdefault("causal", True)
        else:
            if manifest["kind"] != "classification":
                raise ConfigError(f"{self.data} is a {manifest['kind']} dataset; use task: causal_lm")
            settings.setdefault("vocab_size", manifest["vocab_size"])
            settings.setdefault("num_classes", manifest["num_classes"])
            settings.setdefault("max_seq_len", manifest["max_length"])
            settings.setdefault("dual_encoder", manifest.get("task") == "retrieval")
        settings.setdefault("seed", self.seed)
        try:
            model = MacformerConfig.from_dict(settings)
        except MacformerError as error:
            raise ConfigError(f"model: {error}") from None
        return dataclasses.replace(self, model=model, run_name=self.run_name or default_run_name(model))
