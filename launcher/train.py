"""`macformer train`: a Ray Train TorchTrainer whose workers run `launcher.worker.train_worker`."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, TrainConfig
from launcher.tracking import JOB_ID_ENV, end_tracked_run, ensure_experiment, git_commit, probe_tracking_server
from macformer.errors import MacformerError
from macformer.host_memory import process_environment
from pipelines import storage
from pipelines.ray_runtime import ray_session
from pipelines.reader import ShardReader
from pipelines.shards import load_manifest, verify_shard, vocab_size


def check_ready(config: TrainConfig) -> TrainConfig:
    """Fail on the driver, in one line, before any worker starts: data, model, splits, tracking URI.
    Returns the config with its model resolved from the dataset's manifest."""
    manifest = load_manifest(config.data)
    config = config.resolved(manifest)  # validates the model settings against the dataset
    tokens = vocab_size(manifest)
    if config.model.vocab_size < tokens:  # the data boundary's id check: the model never sees an id it lacks
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is below the dataset's {tokens} token ids; "
                          "remove model.vocab_size (it defaults to the dataset's) or raise it")
    for entry in manifest["shards"]:  # a missing or corrupt shard fails here, not in a worker
        if {config.train_split, config.eval_split} & {None, entry.get("split")}:
            verify_shard(config.data, entry)
    for role, split in (("training", config.train_split), ("evaluation", config.eval_split)):
        # Every rank needs at least one full micro-batch of its share, the smallest being the last rank's.
        share = len(ShardReader(config.data, config.num_workers - 1, config.num_workers, split=split, verify=False,
                                manifest=manifest))
        if share < config.micro_batch_size:
            raise ConfigError(f"the {role} data ({split or 'all'}) gives each of {config.num_workers} workers "
                              f"{share} samples, fewer than micro_batch_size={config.micro_batch_size}; use more "
                              "data, fewer workers or a smaller micro_batch_size")
    uri = config.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        probe_tracking_server(uri)
    ensure_experiment(uri, config.experiment)
    return config


def check_run_directory(config: TrainConfig, resume: bool, sweep: str | None = None) -> None:
    """A run directory is continued only on request: a new run never silently resumes an old one
    (sweep trials never resume: the fix is another sweep name), and only if its checkpoints hold
    nothing this trainer never saves."""
    filesystem, root = storage.resolve(config.storage_path)
    exists = storage.exists(filesystem, storage.join(root, config.run_name))
    if exists and sweep is not None:
        raise ConfigError(f"sweep {sweep!r}: run {config.run_name!r} already exists in {config.storage_path}; "
                          "give the sweep another name (name: in the grid file) or another storage_path")
    if exists and not resume:
        raise ConfigError(f"run {config.run_name!r} already exists in {config.storage_path}; pass --resume to "
                          "continue it or choose another run_name")
    if resume and not exists:
        raise ConfigError(f"nothing to resume: no run {config.run_name!r} in {config.storage_path}; check run_name "
                          "and storage_path")
    if resume:
        from launcher.checkpoint import check_run_checkpoints

        check_run_checkpoints(filesystem, storage.join(root, config.run_name))


def check_resources(config: TrainConfig) -> None:
    """Ray Train would wait forever for workers the cluster cannot place."""
    import ray

    resource, need = ("GPU", config.num_workers) if config.use_gpu else ("CPU", config.num_workers)
    have = ray.cluster_resources().get(resource, 0)
    if have < need:
        raise ConfigError(f"num_workers={config.num_workers} needs {need} {resource}s, the cluster has {have:g}; "
                          "lower num_workers or add nodes")


def fit(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """One TorchTrainer run in the current Ray cluster (config already checked, paths absolute). On an
    interrupt or a failure its MLflow run is ended KILLED or FAILED; bad input a worker met is
    raised as its one-line ConfigError."""
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    from launcher.loopback import LoopbackTorchConfig
    from launcher.worker import train_worker

    config = config.resolved()  # a sweep trial arrives as settings
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train": config, "manifest": load_manifest(config.data), "git_commit": git_commit(),
            # `macformer submit` names the job; otherwise the id of this Ray driver.
            "ray_job_id": os.environ.get(JOB_ID_ENV) or ray.get_runtime_context().get_job_id(),
        },
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        torch_config=LoopbackTorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
            # One line per step: Ray Train's print-to-logger patch would show each print twice (beside
            # Ray's own stdout forwarding), and its per-report INFO lines run to ~300 characters. Workers
            # start with freed host memory reused in every thread (macformer/host_memory.py).
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **process_environment()}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return dict(_fit_in_thread(trainer).metrics or {})
    except KeyboardInterrupt:
        run_id = end_tracked_run(config.resolved_tracking_uri(), config.experiment, config.run_directory(), "KILLED")
        print(f"training stopped: MLflow run {run_id or '(not started)'} marked KILLED; continue it from its last "
              f"checkpoint with the same command plus --resume (run_name={config.run_name}, storage_path="
              f"{config.storage_path})", file=sys.stderr, flush=True)
        raise
    except TrainingFailedError as error:
        end_tracked_run(config.resolved_tracking_uri(), config.experiment, config.run_directory(), "FAILED")
        if not resume:
            _remove_if_no_checkpoint(config)
        failures = getattr(error, "worker_failures", {})
        cause = next((failures[rank] for rank in sorted(failures) if isinstance(failures[rank], MacformerError)),
                     None)
        if cause is not None:  # bad input met by a worker: the one line it names, not its traceback
            raise ConfigError(f"training failed on worker {sorted(failures)[0]}: {cause}") from None
        raise


def _fit_in_thread(trainer):
    """trainer.fit() off the main thread, so that Ctrl-C reaches this process as KeyboardInterrupt (in
    the main thread Ray Train installs its own SIGINT handler, which exits with status 1 and leaves
    the MLflow run RUNNING); the caller ends the run and shuts Ray down, which stops the workers."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the main thread as is
            outcome["error"] = error

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _remove_if_no_checkpoint(config: TrainConfig) -> None:
    """A new run that failed before its first checkpoint leaves nothing to resume: its directory
    goes, so that the same run_name can be used again."""
    import pyarrow.fs as pafs

    filesystem, root = storage.resolve(config.storage_path)
    path = storage.join(root, config.run_name)
    if not storage.exists(filesystem, path):
        return
    entries = filesystem.get_file_info(pafs.FileSelector(path))
    if not any(Path(entry.path).name.startswith("checkpoint_") for entry in entries):
        filesystem.delete_dir(path)


def train(config: TrainConfig, ray_address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Run training, or with resume=True continue the run of the same run_name and storage_path
    from its latest checkpoint; returns the last metrics."""
    if resume and config.run_name is None:
        raise ConfigError("--resume continues a named run: pass run_name=NAME (training prints it when it starts "
                          "and when it stops)")
    config = check_ready(config.with_absolute_paths())
    check_run_directory(config, resume)
    with ray_session(ray_address, log_to_driver=True, dashboard=True):
        check_resources(config)
        return fit(config, resume)
