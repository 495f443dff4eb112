"""MLflow tracking of a training run, used by rank 0 only (other ranks get a no-op tracker)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from macformer.config import MacformerConfig

# Set by `macformer submit` in the job's environment: the Ray job id the MLflow run is tagged with.
JOB_ID_ENV = "MACFORMER_RAY_JOB_ID"


def default_tracking_uri(explicit: str | None = None) -> str:
    """The given URI, else MLFLOW_TRACKING_URI, else a SQLite store in the working directory (absolute,
    so Ray workers running elsewhere write to the same one)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mask_credentials(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host` wherever it occurs in `text`."""
    return re.sub(r"(\w[\w+.-]*://[^/\s:@]*):[^@\s/]*@", r"\1:***@", text)


def probe_tracking_server(uri: str) -> None:
    """Fail in one line unless the MLflow server at an http(s) URI answers its /health endpoint,
    authenticating as MLflow's client would (credentials in the URI, or MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD; MLFLOW_TRACKING_INSECURE_TLS)."""
    import requests

    from launcher.config import ConfigError

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=5, verify=not insecure,
                                auth=(user, password or "") if user else None)
    except (requests.RequestException, ValueError) as error:
        reason = mask_credentials(str(error).splitlines()[0])[:200]
        raise ConfigError(f"MLflow tracking server {mask_credentials(uri)} is unreachable ({reason}); start it or "
                          "fix --tracking-uri") from None
    if response.status_code in (401, 403):
        raise ConfigError(f"MLflow tracking server {mask_credentials(uri)} refused the credentials "
                          f"(HTTP {response.status_code}); fix the user and password in the URI or in "
                          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    if response.status_code >= 400:
        raise ConfigError(f"{mask_credentials(uri)} answered HTTP {response.status_code} at /health: not an MLflow "
                          "tracking server; fix --tracking-uri")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_params(config: dict[str, Any], model: MacformerConfig, world_size: int, manifest: dict[str, Any]
               ) -> dict[str, Any]:
    """The parameters that identify a run in comparisons."""
    kernel = model.kernel if isinstance(model.kernel, str) else "custom"
    return {
        "attention": model.attention, "variant": model.variant(), "kernel": kernel,
        "component": model.component or "", "weights": model.weights or "", "D": model.num_features,
        "num_features": model.num_features,
        "p": model.p,
        "ppsbn": model.ppsbn, "ppsbn_max_temperature": model.ppsbn_max_temperature,
        "ppsbn_initial_temperature": model.ppsbn_initial_temperature,
        "ppsbn_temperature_lr_scale": model.ppsbn_temperature_lr_scale, "d_model": model.d_model,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads, "d_ff": model.d_ff,
        # what the user asked for: a causal LM's windows hold seq_len + 1 tokens (model.max_seq_len)
        "seq_len": manifest.get("seq_len", model.max_seq_len) if model.causal else model.max_seq_len,
        "world_size": world_size, "zero_stage": config["zero_stage"], "precision": config["precision"],
        "micro_batch_size": config["micro_batch_size"], "gradient_accumulation": config["gradient_accumulation"],
        "learning_rate": config["learning_rate"], "task": config["task"], "max_steps": config["max_steps"],
        "dataset": config["data"], "dataset_fingerprint": manifest.get("fingerprint", "unknown"),
    }


def ensure_experiment(uri: str, name: str) -> None:
    """Create the experiment from the driver, with artifacts beside a local SQLite store (MLflow
    would otherwise put them under the working directory of whichever Ray worker created it)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is not None:
        return
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    client.create_experiment(name, artifact_location=location)


RUN_DIRECTORY_TAG = "run_directory"


def end_tracked_run(uri: str, experiment: str, run_directory: str, status: str) -> str | None:
    """End the RUNNING MLflow run of a training run directory with `status` (KILLED, FAILED) and an
    end time; returns its id (None when rank 0 had not started one)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    quoted = run_directory.replace("'", "\\'")
    runs = client.search_runs([found.experiment_id], f"tags.{RUN_DIRECTORY_TAG} = '{quoted}' and "
                              "attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status=status)
    return runs[0].info.run_id if runs else None


class Tracker:
    """Thin use of MLflow's fluent API: one run per training run, resumed by run id after a restart."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, run_directory: str | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        # System metrics (CPU, memory, disk, network; GPU with pynvml), quietly; MLflow's interval (10 s;
        # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) applies.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        else:  # a sweep trial is a child of the sweep's parent run
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            if run_directory:  # how the driver finds the run to end it after an interrupt or failure
                tags[RUN_DIRECTORY_TAG] = run_directory
            self.run = mlflow.start_run(run_name=run_name, tags=tags or None, log_system_metrics=True)

        self.failed = False

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def _guard(self, action, *args, **kwargs) -> None:
        """Training outlives the tracking server: the first failure is reported, later calls skipped."""
        if self.failed:
            return
        try:
            action(*args, **kwargs)
        except Exception as error:  # MLflow raises many types for an unreachable or failing store
            self.failed = True
            reason = mask_credentials(str(error).splitlines()[0])[:200]
            print(f"MLflow logging stopped ({type(error).__name__}: {reason}); training continues", flush=True)

    def log_params(self, params: dict[str, Any]) -> None:
        def log() -> None:
            existing = self.mlflow.get_run(self.run_id).data.params
            self.mlflow.log_params({k: v for k, v in params.items() if k not in existing})

        self._guard(log)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard(self.mlflow.set_tags, tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._guard(self.mlflow.log_metrics, metrics, step=step)

    def log_artifacts(self, directory: Path, path: str) -> None:
        self._guard(self.mlflow.log_artifacts, str(directory), artifact_path=path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._guard(self.mlflow.log_dict, data, name)

    def log_figure(self, figure, name: str) -> None:
        self._guard(self.mlflow.log_figure, figure, name)

    def last_step(self, metric: str) -> int:
        """The highest step `metric` was logged at (0 if never)."""
        return max((step for step, _ in self.history(metric)), default=0)

    def history(self, metric: str) -> list[tuple[int, float]]:
        if self.failed:
            return []
        points = self.mlflow.MlflowClient().get_metric_history(self.run_id, metric)
        return sorted((p.step, p.value) for p in points)

    def finish(self) -> None:
        self._guard(self.mlflow.end_run)


class NoTracker:
    """What ranks other than 0 use: every call does nothing."""

    run_id = None
    failed = False

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
