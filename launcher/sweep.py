"""`macformer sweep`: a grid of training runs (kernel x D x ...) through Ray Tune, each trial a
TorchTrainer run logged as a child of one MLflow parent run."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.config import ConfigError, TrainConfig, yaml_value
from launcher.tracking import ensure_experiment, git_commit
from launcher.train import check_ready, check_resources, check_run_directory, fit
from pipelines.ray_runtime import ray_session


@dataclass(frozen=True)
class Sweep:
    name: str
    trials: list[TrainConfig]
    max_concurrent_trials: int = 1

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> Sweep:
        """YAML with `base` (a train config) and `grid` (setting -> list of values: every combination)
        and/or `variants` (a list of setting -> value mappings: one trial set each, crossed with the
        grid); optional `overrides` (key=value for every trial), `name` and `max_concurrent_trials`."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep grid {path} not found; pass --grid configs/sweeps/<name>.yaml")
        spec = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(spec) - {"base", "grid", "variants", "overrides", "name", "max_concurrent_trials"})
        grid, variants = spec.get("grid", {}), spec.get("variants", [{}])
        if (unknown or not isinstance(grid, dict) or not isinstance(variants, list)
                or not all(isinstance(v, dict) for v in variants) or not (grid or spec.get("variants"))):
            raise ConfigError(f"sweep grid {path}: needs a non-empty `grid:` mapping or `variants:` list of "
                              f"mappings (unknown keys: {unknown})")
        name = spec.get("name", path.stem)
        common = list(spec.get("overrides", [])) + list(overrides)
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        trials = []
        for variant in variants:
            for combination in itertools.product(*values):
                settings = [f"{k}={yaml_value(v)}" for k, v in [*variant.items(), *zip(keys, combination, strict=True)]]
                trials.append(TrainConfig.load(spec.get("base"),
                                               [*common, *settings, f"run_name={name}-{len(trials)}"]))
        return cls(name, trials, int(spec.get("max_concurrent_trials", 1)))


def _trial(params: dict[str, Any]) -> None:
    """Tune trainable: one TorchTrainer run."""
    from ray import tune

    tune.report({k: v for k, v in fit(TrainConfig(**params["train"])).items() if isinstance(v, (int, float))})


def run_sweep(sweep: Sweep, ray_address: str | None = None) -> str:
    """Run every trial; returns the MLflow parent run id."""
    import mlflow

    trials = [check_ready(trial.with_absolute_paths()) for trial in sweep.trials]
    for trial in trials:
        check_run_directory(trial, resume=False, sweep=sweep.name)
    first = trials[0]
    ensure_experiment(first.tracking_uri, first.experiment)
    client = mlflow.MlflowClient(tracking_uri=first.tracking_uri)
    parent = client.create_run(client.get_experiment_by_name(first.experiment).experiment_id, run_name=sweep.name,
                               tags={"sweep": sweep.name, "git_commit": git_commit(), "trials": str(len(trials))})
    status = "FAILED"
    try:
        with ray_session(ray_address, log_to_driver=True, dashboard=True):
            from ray import tune

            check_resources(first)
            tuner = tune.Tuner(
                # The TorchTrainer inside reserves the CPUs/GPUs; the trial itself only needs a little memory.
                tune.with_resources(_trial, {"cpu": 0, "memory": 256 * 2**20}),
                param_space={"train": tune.grid_search(
                    [{**t.to_dict(), "parent_run_id": parent.info.run_id} for t in trials])},
                tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
                run_config=tune.RunConfig(name=f"sweep-{sweep.name}", storage_path=first.storage_path),
            )
            results = tuner.fit()
            errors = [str(r.error).splitlines()[0] for r in results if r.error]
            if errors:
                raise ConfigError(f"{len(errors)} of {len(trials)} sweep trials failed; first: {errors[0]}")
        status = "FINISHED"
    finally:
        client.set_terminated(parent.info.run_id, status=status)
    return parent.info.run_id
