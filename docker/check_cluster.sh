#!/usr/bin/env bash
# End-to-end check of the compose cluster on this machine: build the CPU image (and, where no
# registry of images is reachable, a local Debian base with debootstrap), bring up Ray head, two Ray
# workers and MLflow, submit the data preparation and a short training from the host with
# `ray job submit`, and check from the host that both jobs SUCCEEDED, the MLflow run is FINISHED
# with params, metrics and its model artifact, the two training workers ran in different
# containers and only 127.0.0.1 ports are published (free ones, so that it runs beside other Ray or
# MLflow services on this machine). Containers, networks and volumes are removed
# on exit, whatever failed. Images come from docker/build_image.sh (PostgreSQL from Debian's packages
# where the official image cannot be pulled). Needs a running Docker daemon, docker-compose (v1) or
# `docker compose`, and the project's .venv (for the host's `ray` CLI and the MLflow client). From the
# repository root:
#   docker/check_cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=macformer-check
IMAGE=${MACFORMER_IMAGE:-macformer:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)-cpu}
RAY=.venv/bin/ray
step() { echo "== $*"; STEP="$*"; }
trap 'status=$?; [ "$status" -ne 0 ] && echo "check_cluster: FAILED at: ${STEP:-start}" >&2; down; exit "$status"' EXIT

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yaml "$@"; }
down() { compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true; }
POSTGRES_PASSWORD=$(.venv/bin/python -c "import secrets; print(secrets.token_hex(16))")
read -r RAY_DASHBOARD_PORT MLFLOW_PORT < <(.venv/bin/python -c "
import socket
probes = [socket.socket() for _ in range(2)]
for probe in probes:
    probe.bind(('127.0.0.1', 0))
print(*(probe.getsockname()[1] for probe in probes))")
# One CPU on every node: the two training workers cannot share a container.
export POSTGRES_PASSWORD RAY_AUTH_MODE=disabled MACFORMER_IMAGE="$IMAGE" RAY_DASHBOARD_PORT MLFLOW_PORT \
    RAY_HEAD_CPUS=1 RAY_WORKER_CPUS=1
JOBS_API=http://127.0.0.1:$RAY_DASHBOARD_PORT

step "docker daemon"
docker info >/dev/null

step "build $IMAGE"
docker/build_image.sh cpu "$IMAGE" >/dev/null

step "PostgreSQL image"
if ! docker image inspect postgres:16.4-bookworm >/dev/null 2>&1 && ! docker pull postgres:16.4-bookworm >/dev/null 2>&1; then
    POSTGRES_IMAGE=$(docker/build_image.sh postgres)
    export POSTGRES_IMAGE
fi

step "cluster up (Ray head and two workers, one CPU each; MLflow on PostgreSQL)"
down
compose up -d >/dev/null  # returns once the head is healthy (the workers wait for it)
for _ in $(seq 120); do "$RAY" job list --address "$JOBS_API" >/dev/null 2>&1 && break; sleep 1; done
"$RAY" job list --address "$JOBS_API" >/dev/null

step "prepare job"
"$RAY" job submit --address "$JOBS_API" -- macformer prepare --input stdlib \
    --output /shared/data/stdlib --seq-len 1024 --valid-fraction 0.05 --stdlib-limit 200 >/dev/null

step "training job"
log=$(mktemp)
"$RAY" job submit --address "$JOBS_API" -- macformer train --config configs/demo.yaml \
    data=/shared/data/stdlib storage_path=/shared/runs max_steps=10 eval_every=10 checkpoint_every=10 \
    run_name=container-check >"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }

step "MLflow run FINISHED with params, metrics and model, its workers in two containers"
.venv/bin/python - <<'PY'
import os

from mlflow.tracking import MlflowClient

client = MlflowClient(f"http://127.0.0.1:{os.environ['MLFLOW_PORT']}")
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        if r.info.run_name == "container-check"]
assert len(runs) == 1, f"expected one run named container-check, found {len(runs)}"
run = runs[0]
artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
assert run.info.status == "FINISHED", run.info.status
assert run.data.params and "train_loss" in run.data.metrics, "params or train_loss missing"
assert "model" in artifacts, f"no model artifact: {sorted(artifacts)}"
# The trainer tags the Ray nodes its workers ran on: one node per container here.
assert run.data.tags["ray_nodes"] == "2", f"training workers ran on {run.data.tags['ray_nodes']} container(s)"
PY

step "only 127.0.0.1 ports published"
published=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Ports}}' | tr ',' '\n' |
            grep -- '->' || true)
if echo "$published" | grep -v '127.0.0.1:' | grep -q .; then echo "published beyond loopback: $published" >&2; exit 1; fi

step "teardown"
down
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"; docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || { echo "left behind: $left" >&2; exit 1; }
echo "check_cluster: OK"
