"""`macformer train`: a Ray Train TorchTrainer whose workers run `launcher.worker.train_worker`."""

from __future__ import annotations

import os
from typing import Any

from launcher.config import ConfigError, TrainConfig
from launcher.tracking import JOB_ID_ENV, ensure_experiment, git_commit
from pipelines.ray_runtime import ray_session
from pipelines.reader import ShardReader


def check_ready(config: TrainConfig) -> None:
    """Fail on the driver, in one line, before any worker starts: data, model, splits, tracking URI."""
    config.model_config()  # validates the manifest and the model settings
    for split in {config.train_split, config.eval_split}:
        ShardReader(config.data, split=split, verify=False)
    uri = config.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except OSError as error:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({error}); start it or fix "
                              "--tracking-uri") from None
    ensure_experiment(uri, config.experiment)


def fit(config: TrainConfig) -> dict[str, Any]:
    """One TorchTrainer run in the current Ray cluster (config already checked, paths absolute)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.worker import train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train": config.to_dict(), "git_commit": git_commit(),
            # `macformer submit` names the job; otherwise the id of this Ray driver.
            "ray_job_id": os.environ.get(JOB_ID_ENV) or ray.get_runtime_context().get_job_id(),
        },
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    return dict(trainer.fit().metrics or {})


def train(config: TrainConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Run (or, with the same run_name and storage_path, resume) training; returns the last metrics."""
    config = config.with_absolute_paths()
    check_ready(config)
    with ray_session(ray_address, log_to_driver=True, dashboard=True):
        return fit(config)
