"""The shipped train configs and sweep files load, validate, and run the experiments they describe."""

from pathlib import Path

import pytest

from launcher.config import TrainConfig
from launcher.sweep import Sweep
from macformer import MacformerConfig

REPO = Path(__file__).resolve().parents[1]


def model_of(trial: TrainConfig) -> MacformerConfig:
    """The trial's model as training builds it, with the fields its dataset manifest would fill in."""
    settings = {"vocab_size": 256, **trial.model}
    if trial.task == "classification":
        settings.setdefault("num_classes", 10)
    else:
        settings.setdefault("causal", True)
    return MacformerConfig.from_dict(settings)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_train_configs_validate(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # configs name their DeepSpeed JSON relative to the repository root
    model_of(TrainConfig.load(path))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_trials_are_valid_and_distinct(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    sweep = Sweep.load(path)
    models = [model_of(trial) for trial in sweep.trials]
    assert len(set(models)) == len(models), "two trials train the same model"
    assert len({trial.run_name for trial in sweep.trials}) == len(models)


def test_quality_sweeps_measure_every_attention_with_and_without_ppsbn(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    for name in ("quality_lm.yaml", "quality_listops.yaml"):
        models = [model_of(t) for t in Sweep.load(REPO / "configs" / "sweeps" / name).trials]
        measured = {(m.attention, m.ppsbn) for m in models}
        assert {("softmax", False), ("softmax", True), ("rmfa", False), ("rmfa", True), ("rfa", False),
                ("favor", False), ("favor", True)} <= measured
        assert {m.kernel for m in models if m.attention == "rmfa"} == {"exp", "inverse", "log", "sqrt"}


def test_spectraformer_sweep_covers_the_grid(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    sweep = Sweep.load(REPO / "configs" / "sweeps" / "spectraformer_listops.yaml")
    pairs = {(m.component, m.weights, m.ppsbn) for m in map(model_of, sweep.trials)}
    assert pairs == {(c, w, p) for c in ("trigrf", "posrf", "oprf")
                     for w in ("gaussian", "orthogonal", "sorf", "qmc", "moment_matched", "fastfood_learned")
                     for p in (False, True)}
