"""`macformer train`: a Ray Train TorchTrainer whose workers run `launcher.worker.train_worker`."""

from __future__ import annotations

import os
from typing import Any

from launcher.config import ConfigError, TrainConfig
from launcher.tracking import JOB_ID_ENV, ensure_experiment, git_commit
from pipelines import storage
from pipelines.ray_runtime import ray_session
from pipelines.reader import ShardReader


def check_ready(config: TrainConfig) -> None:
    """Fail on the driver, in one line, before any worker starts: data, model, splits, tracking URI."""
    config.model_config()  # validates the manifest and the model settings
    for role, split in (("training", config.train_split), ("evaluation", config.eval_split)):
        # Every rank needs at least one full micro-batch of its share, the smallest being the last rank's.
        share = len(ShardReader(config.data, config.num_workers - 1, config.num_workers, split=split, verify=False))
        if share < config.micro_batch_size:
            raise ConfigError(f"the {role} data ({split or 'all'}) gives each of {config.num_workers} workers "
                              f"{share} samples, fewer than micro_batch_size={config.micro_batch_size}; use more "
                              "data, fewer workers or a smaller micro_batch_size")
    uri = config.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except OSError as error:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({error}); start it or fix "
                              "--tracking-uri") from None
    ensure_experiment(uri, config.experiment)


def check_run_directory(config: TrainConfig, resume: bool) -> None:
    """A run directory is continued only on request: a new run never silently resumes an old one."""
    filesystem, root = storage.resolve(config.storage_path)
    exists = storage.exists(filesystem, storage.join(root, config.run_name))
    if exists and not resume:
        raise ConfigError(f"run {config.run_name!r} already exists in {config.storage_path}; pass --resume to "
                          "continue it or choose another run_name")
    if resume and not exists:
        raise ConfigError(f"nothing to resume: no run {config.run_name!r} in {config.storage_path}; check run_name "
                          "and storage_path")


def check_resources(config: TrainConfig) -> None:
    """Ray Train would wait forever for workers the cluster cannot place."""
    import ray

    resource, need = ("GPU", config.num_workers) if config.use_gpu else ("CPU", config.num_workers)
    have = ray.cluster_resources().get(resource, 0)
    if have < need:
        raise ConfigError(f"num_workers={config.num_workers} needs {need} {resource}s, the cluster has {have:g}; "
                          "lower num_workers or add nodes")


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


def train(config: TrainConfig, ray_address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Run training, or with resume=True continue the run of the same run_name and storage_path
    from its latest checkpoint; returns the last metrics."""
    config = config.with_absolute_paths()
    check_ready(config)
    check_run_directory(config, resume)
    with ray_session(ray_address, log_to_driver=True, dashboard=True):
        check_resources(config)
        return fit(config)
