"""`macformer submit`: run `macformer train` as a Ray job (the Jobs SDK behind `ray job submit`)."""

from __future__ import annotations

import asyncio
import shlex
import time
import uuid

from launcher.config import ConfigError, TrainConfig, yaml_value
from launcher.tracking import JOB_ID_ENV
from launcher.train import check_ready

AGENT_WAIT_S = 60
# Kept out of the uploaded working directory: environments, data and outputs live on shared storage.
EXCLUDES = [".venv/", ".git/", "data/", "runs/", "mlartifacts/", "mlflow.db", "compare/", "benchmarks/out/",
            "**/__pycache__/"]


def job_entrypoint(config: TrainConfig) -> str:
    """`macformer train` with every setting of a checked config (`check_ready`, paths absolute: the
    job runs in an uploaded copy of this directory, where relative paths would point elsewhere)."""
    settings = [f"{key}={yaml_value(value)}" for key, value in config.to_dict().items() if value is not None]
    return shlex.join(["python", "-m", "launcher.cli", "train", *settings])


def submit(config: TrainConfig, address: str, follow: bool = True) -> tuple[str, str]:
    """Submit the training job; follow its logs; returns (job id, final status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = check_ready(config.with_absolute_paths())
    entrypoint = job_entrypoint(config)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot reach the Ray Jobs API at {address} ({str(error).splitlines()[0]}); "
                          "start the head with `ray start --head` or fix --address") from None
    submission_id = f"macformer-{config.run_name}-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id,
                runtime_env={"working_dir": ".", "excludes": EXCLUDES,
                             "env_vars": {JOB_ID_ENV: submission_id}},  # tags the MLflow run
            )
            break
        except RuntimeError as error:  # a head that just started has no job agent for a few seconds
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise ConfigError(f"Ray refused the job: {str(error).splitlines()[0]}") from None
            time.sleep(2)
    print(f"submitted Ray job {job_id} to {address}", flush=True)
    if follow:
        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(tail())
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
    return job_id, status.value
