"""`macformer train` end to end: Ray Train + DeepSpeed on 2 CPU workers (gloo), tracked in MLflow."""

import os
import signal
import threading
import time

import mlflow
import pytest
import torch
from conftest import free_port, ray_node_ports, start_service, stop_service, wait_for_url

from launcher.cli import main
from launcher.config import ConfigError, TrainConfig
from launcher.train import train
from macformer import MacformerForCausalLM
from pipelines import lra
from pipelines.listops import ListOpsSpec
from pipelines.prepare import PrepareConfig, prepare

pytestmark = pytest.mark.slow

MODEL = {"attention": "rmfa", "kernel": "exp", "num_features": 48, "d_model": 32, "num_layers": 2,
         "num_heads": 2, "d_ff": 64}


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory, local_ray):
    output = tmp_path_factory.mktemp("lm") / "stdlib"
    prepare(PrepareConfig(inputs=("stdlib",), output=str(output), seq_len=64, vocab_size=400,
                          tokenizer_sample_mb=0.3, stdlib_limit=12), log=lambda message: None)
    return output


@pytest.fixture(scope="module")
def listops_data(tmp_path_factory):
    output = tmp_path_factory.mktemp("listops") / "listops"
    spec = ListOpsSpec(min_length=10, max_length=60, max_depth=4)
    lra.write_task(lra.listops_task(256, 32, 32, seed=0, spec=spec), output, {"test": True}, log=lambda m: None)
    return output


def _config(tmp_path, data, **settings) -> TrainConfig:
    base = {"data": str(data), "model": dict(MODEL), "num_workers": 2, "micro_batch_size": 4, "max_steps": 12,
            "learning_rate": 3e-3, "warmup_steps": 2, "precision": "bf16", "zero_stage": 2, "eval_every": 6,
            "eval_batches": 2, "checkpoint_every": 6, "storage_path": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test", "run_name": "run"}
    return TrainConfig(**{**base, **settings})


def _history(config: TrainConfig, metric: str) -> dict[int, float]:
    """Last logged value per step (a restarted run logs the steps after its checkpoint again)."""
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.experiment).experiment_id])
    values = {}
    for point in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.timestamp):
        values[point.step] = point.value
    return values


def _run(config: TrainConfig):
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.experiment).experiment_id])
    return client, run


def test_lm_trains_with_zero2_bf16_and_is_tracked(tmp_path, lm_data, capsys) -> None:
    config = _config(tmp_path, lm_data)
    metrics = train(config)
    losses = _history(config, "train_loss")
    assert sorted(losses) == list(range(1, 13))
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3]) - 0.3
    client, run = _run(config)
    params = run.data.params
    assert (params["variant"], params["kernel"], params["num_features"]) == ("rmfa-exp", "exp", "48")
    assert (params["zero_stage"], params["precision"], params["world_size"]) == ("2", "bf16", "2")
    assert params["dataset_fingerprint"] and run.data.tags["git_commit"]
    assert 0 < run.data.metrics["attention_approx_error"] < 1
    # Attention health: per layer and averaged, enough to tell from MLflow alone that attention is flat.
    for layer in (0, 1):
        assert 0 < run.data.metrics[f"attention/layer{layer}/temperature"] < float(params["ppsbn_max_temperature"])
        assert 0 < run.data.metrics[f"attention/layer{layer}/entropy"] <= 1
        assert 0 <= run.data.metrics[f"attention/layer{layer}/stabilised_rows"] <= 1
        assert f"attention/layer{layer}/temperature_head1" in run.data.metrics
        assert run.data.metrics[f"attention/layer{layer}/max_abs_qk"] > 0
    for name in ("eval_loss", "eval_perplexity", "tokens_per_s", "samples_per_s", "step_time_s", "learning_rate",
                 "peak_memory_mb"):
        assert name in run.data.metrics, name
    assert metrics["step"] == 12 and set(_history(config, "eval_loss")) == {6, 12}
    model_dir = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "export"))
    model = MacformerForCausalLM.from_pretrained(model_dir).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 32))
    assert model(tokens, labels=tokens).loss.isfinite()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", model_dir, "--data", str(lm_data), "--batches", "2", "--batch-size", "2"]) == 0
    assert "eval_perplexity" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", f"experiment:{config.experiment}", "--tokenizer",
                 str(lm_data / "tokenizer.model"), "--prompt", "def ", "--max-new-tokens", "8",
                 "--tracking-uri", config.tracking_uri]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/attention.png",
                                                                                  "plots/loss.png"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {
        "config/train.json", "config/model.json", "config/deepspeed.json"}


def test_listops_classification_learns(tmp_path, listops_data) -> None:
    config = _config(tmp_path, listops_data, task="classification", train_split="train", eval_split="valid",
                     max_steps=16, eval_every=8, checkpoint_every=16, micro_batch_size=8, zero_stage=1)
    train(config)
    losses = list(_history(config, "train_loss").values())
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    accuracy = _history(config, "eval_accuracy")
    assert set(accuracy) == {8, 16} and all(0 <= a <= 1 for a in accuracy.values())


def _kill_a_worker_after(config: TrainConfig, step: int, done: threading.Event) -> None:
    import psutil

    while not done.is_set():
        try:
            reached = max(_history(config, "train_loss"), default=0)
        except Exception:  # the run or experiment may not exist yet
            reached = 0
        if reached >= step:
            # Only this test session's workers (descendants of this process), not another Ray's on the machine.
            workers = [p for p in psutil.Process().children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                return
        time.sleep(0.2)


def test_killed_worker_resumes_from_checkpoint_with_identical_steps(tmp_path, lm_data) -> None:
    settings = {"max_steps": 8, "checkpoint_every": 2, "eval_every": 100, "schedule": "constant"}
    reference = _config(tmp_path / "a", lm_data, **settings)
    train(reference)
    interrupted = _config(tmp_path / "b", lm_data, max_failures=2, **settings)
    done = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after, args=(interrupted, 5, done), daemon=True)
    killer.start()
    try:
        train(interrupted)
    finally:
        done.set()
    _, run = _run(interrupted)
    assert int(run.data.tags["resumed_from_step"]) in (2, 4, 6)  # the restart loaded a checkpoint
    expected, resumed = _history(reference, "train_loss"), _history(interrupted, "train_loss")
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_train_bad_input(tmp_path, lm_data, capsys) -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.load(None, [f"data={lm_data}", "num_featurez=3"])
    with pytest.raises(ConfigError, match=r"model: MacformerConfig\.attention"):
        _config(tmp_path, lm_data, model={"attention": "linear"}).model_config()
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        _config(tmp_path, lm_data, precision="fp16")
    with pytest.raises(ConfigError, match="is a causal_lm dataset; use task: causal_lm"):
        _config(tmp_path, lm_data, task="classification").model_config()
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", f"data={tmp_path}"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert main(["train", f"data={lm_data}", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(["train", f"data={lm_data}", "learning_rate=fast"]) == 2
    assert "setting learning_rate: expected float, got 'fast'" in capsys.readouterr().err
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    for args, message in ((["run_name=taken"], "pass --resume"), (["run_name=new", "--resume"], "nothing to resume"),
                          (["num_workers=8"], "needs 8 CPUs"), (["micro_batch_size=4096"], "fewer than micro_batch")):
        overrides = [f"data={lm_data}", f"storage_path={tmp_path / 'runs'}", f"tracking_uri=sqlite:///{tmp_path}/m.db"]
        assert main(["train", *overrides, *args]) == 2
        assert message in capsys.readouterr().err, message


def test_tracker_survives_a_failing_store(tmp_path, capsys) -> None:
    from launcher.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "outage", "run")
    tracker.mlflow = type("Broken", (), {"log_metrics": lambda *a, **k: (_ for _ in ()).throw(OSError("gone"))})()
    for step in range(3):
        tracker.log_metrics({"loss": 1.0}, step)
    assert capsys.readouterr().out.count("MLflow logging stopped") == 1 and tracker.failed
    mlflow.end_run()


@pytest.fixture
def ray_head():
    """A separate Ray head on 127.0.0.1 with the Jobs API, stopped with its whole process group."""
    import shutil
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    head = start_service(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                          "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                          str(dashboard), "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp_dir,
                          *ray_node_ports()])
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_url(f"{address}/api/version", "the Ray head")
        yield address
    finally:
        stop_service(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_training(tmp_path, lm_data, ray_head, capsys) -> None:
    import yaml

    config = _config(tmp_path, lm_data, max_steps=4, eval_every=4, checkpoint_every=4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["submit", "--address", ray_head, "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "submitted Ray job" in out and "SUCCEEDED" in out
    _, run = _run(config)
    assert run.info.status == "FINISHED" and run.data.tags["ray_job_id"].startswith("macformer-run-")
    assert sorted(_history(config, "train_loss")) == [1, 2, 3, 4]


def test_sweep_makes_child_runs_and_compare_prints_them(tmp_path, lm_data, capsys) -> None:
    import yaml

    base = _config(tmp_path, lm_data, max_steps=3, eval_every=3, checkpoint_every=3, experiment="sweep")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(
        {"name": "two", "base": str(tmp_path / "base.yaml"), "grid": {"model.num_features": [40, 80]}}))
    assert main(["sweep", "--grid", str(tmp_path / "grid.yaml")]) == 0
    client = mlflow.MlflowClient(tracking_uri=base.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [r for r in runs if "attention" not in r.data.params]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["num_features"] for r in children) == ["40", "80"]
    capsys.readouterr()
    assert main(["compare", "--experiment", "sweep", "--tracking-uri", base.tracking_uri,
                 "--plots", str(tmp_path / "plots")]) == 0
    table = capsys.readouterr().out
    assert "| two-0 | rmfa-exp | 40 |" in table and "| two-1 | rmfa-exp | 80 |" in table
    header = table.splitlines()[0].split(" | ")
    row = table.splitlines()[2].split(" | ")
    assert float(row[header.index("temperature")]) > 0 and 0 < float(row[header.index("entropy")]) <= 1
    assert (tmp_path / "plots" / "quality_vs_features.png").stat().st_size > 0
