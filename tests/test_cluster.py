"""The multi-node path in one machine: a Ray head and a second Ray node (two raylets) on 127.0.0.1,
an MLflow tracking server as its own process (SQLite backend, proxied artifact store), and a
2-worker DeepSpeed job submitted by `macformer submit` through the Jobs API that must run on both nodes, reading its
dataset and writing its checkpoints through URIs (file://, the object-store code path), and learning ListOps
classification with ZeRO-1 (ZeRO-2 with bf16 on the causal LM is tested in test_train.py)."""

import os
import shutil
import tempfile

import mlflow
import pytest
import yaml
from conftest import BIN, free_port, start_service, stop_service, wait_for_url

from launcher.cli import main
from pipelines import lra
from pipelines.listops import ListOpsSpec

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(monkeypatch):
    """The Jobs API address of a head and a second node, one CPU each (two workers need both nodes).

    Ray's own multi-node test harness (ray.cluster_utils.Cluster) starts the raylets: `ray start
    --address` refuses to join a node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and that setting
    makes every Ray service listen on all interfaces instead of 127.0.0.1.
    """
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_nodes

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ.get('PATH', '')}")  # the job's driver finds this venv
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # Ray's socket paths must fit 107 bytes
    dashboard = free_port()

    def own_ports() -> dict[str, int]:  # the session's other local Ray holds the default agent ports
        return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
                "runtime_env_agent_port": free_port()}

    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "node_ip_address": "127.0.0.1", "gcs_server_port": free_port(), "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "temp_dir": temp_dir, "num_cpus": 1,
        "object_store_memory": 300 * 2**20, **own_ports()})
    # A job's supervisor finds its cluster through <temp_dir>/ray_current_cluster, which `ray start`
    # writes and Cluster does not; without it Ray falls back to any GCS process on the machine, and
    # the job's driver joined the session's other local Ray (whose GCS lacks the job's package).
    ray._private.utils.write_ray_address(cluster.gcs_address, temp_dir)
    try:
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=300 * 2**20, **own_ports())
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_url(f"{address}/api/version", "the Ray dashboard")
        assert [n.state for n in list_nodes(address=address)] == ["ALIVE", "ALIVE"]
        yield address
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = start_service(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                            "--artifacts-destination", str(tmp_path / "mlartifacts"), "--host", "127.0.0.1",
                            "--port", str(port), "--workers", "1"])
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(f"{uri}/health", "the MLflow server")
        yield uri
    finally:
        stop_service(server)


def test_two_node_job_tracked_by_an_mlflow_server(tmp_path, two_node_cluster, mlflow_server, capsys) -> None:
    data = tmp_path / "listops"
    spec = ListOpsSpec(min_length=10, max_length=60, max_depth=4)
    lra.write_task(lra.listops_task(256, 32, 0, seed=0, spec=spec), data, {"test": True}, log=lambda m: None)
    config = {
        "data": data.as_uri(), "task": "classification", "train_split": "train", "eval_split": "valid",
        "model": {"attention": "rmfa", "num_features": 48, "d_model": 32, "num_layers": 2, "num_heads": 2,
                  "d_ff": 64},
        "num_workers": 2, "micro_batch_size": 8, "max_steps": 16, "learning_rate": 3e-3, "warmup_steps": 2,
        "precision": "bf16", "zero_stage": 1, "eval_every": 8, "eval_batches": 2, "checkpoint_every": 16,
        "storage_path": (tmp_path / "runs").as_uri(),
        "tracking_uri": mlflow_server, "experiment": "two-nodes", "run_name": "spread",
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["submit", "--address", two_node_cluster, "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "submitted Ray job" in out and "SUCCEEDED" in out

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["ray_job_id"].startswith("macformer-spread-")
    assert run.data.tags["ray_nodes"] == "2"  # the two workers ran on different raylets
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # it learns
    accuracy = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_accuracy")}
    assert set(accuracy) == {8, 16} and all(0 <= a <= 1 for a in accuracy.values())
    # Artifacts went through the server to its artifact store, not to a path on the workers.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config"}
    assert any((tmp_path / "mlartifacts").rglob("train.json"))
    assert any((tmp_path / "runs" / "spread").rglob("*checkpoint*"))
