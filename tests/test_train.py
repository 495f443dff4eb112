"""`macformer train` end to end: Ray Train + DeepSpeed on 2 CPU workers (gloo), tracked in MLflow."""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import (
    BIN,
    ListenerSampler,
    RunsCode,
    free_port,
    is_loopback,
    listening_addresses,
    ray_node_ports,
    stop_service,
)

from launcher.cli import main
from launcher.config import ConfigError, TrainConfig
from launcher.train import train
from macformer import MacformerForCausalLM
from pipelines.errors import PipelineError
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
    with ListenerSampler() as listeners:
        metrics = train(config)
    # A local run listens on loopback only (Ray, the torch.distributed store, gloo).
    assert len(listeners.seen) > 3 and not listeners.exposed(), listeners.exposed()
    losses = _history(config, "train_loss")
    assert sorted(losses) == list(range(1, 13))
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3]) - 0.3
    client, run = _run(config)
    params = run.data.params
    assert (params["variant"], params["kernel"], params["num_features"]) == ("rmfa-exp", "exp", "48")
    assert (params["D"], params["seq_len"]) == ("48", "64")  # the user's seq_len, not the 65-token window
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's system metrics
    assert (params["zero_stage"], params["precision"], params["world_size"]) == ("2", "bf16", "2")
    assert params["dataset_fingerprint"] and run.data.tags["git_commit"]
    assert 0 < run.data.metrics["attention_approx_error"] < 1 and 0 < run.data.metrics["attention_fresh_draw_error"] < 1
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
    # Dropout and feature redraws draw random numbers every step: identical steps after the restart
    # need the RNG states and the redraw counters restored, not only weights and data positions.
    model = {**MODEL, "dropout": 0.1, "feature_redraw_interval": 3}
    settings = {"max_steps": 8, "checkpoint_every": 2, "eval_every": 100, "schedule": "constant", "model": model}
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
        _config(tmp_path, lm_data, model={"attention": "linear"}).resolved()
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        _config(tmp_path, lm_data, precision="fp16")
    with pytest.raises(ConfigError, match="is a causal_lm dataset; use task: causal_lm"):
        _config(tmp_path, lm_data, task="classification").resolved()
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


def test_sweep_makes_child_runs_and_compare_prints_them(tmp_path, lm_data, capsys) -> None:
    import yaml

    # One worker per trial, both trials at once (distributed training itself is tested above).
    base = _config(tmp_path, lm_data, max_steps=3, eval_every=3, checkpoint_every=3, experiment="sweep",
                   num_workers=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(
        {"name": "two", "base": str(tmp_path / "base.yaml"), "grid": {"model.num_features": [40, 80]},
         "max_concurrent_trials": 2}))
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


def _train_process(config_path, *args: str) -> subprocess.Popen:
    """`macformer train` in its own process group, as a user's terminal runs it."""
    return subprocess.Popen([str(BIN / "macformer"), "train", "--config", str(config_path), *args],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_interrupt_marks_the_run_killed_and_resume_logs_every_step_once(tmp_path, lm_data, capsys) -> None:
    import yaml

    config = _config(tmp_path, lm_data, max_steps=30, checkpoint_every=2, eval_every=100, schedule="constant")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    process = _train_process(path)
    snapshot = tmp_path / "runs" / "run" / "checkpoint_manager_snapshot.json"  # Ray Train has a checkpoint
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(Exception):  # the experiment or run may not exist yet
            if snapshot.exists() and max(_history(config, "train_loss"), default=0) >= 3:
                break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    own = "\n".join(line for line in stderr.splitlines() if "pid=" not in line)  # not Ray's forwarded logs
    assert "marked KILLED" in own and "--resume" in own and "Traceback" not in own
    client, run = _run(config)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    logged = max(_history(config, "train_loss"))
    assert 3 <= logged < 30

    train(config, resume=True)
    client, run = _run(config)
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 31))  # each step exactly once: continuous across the restart
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_step"]) <= logged

    # A checkpoint that would run code when unpickled is refused before anything in it executes.
    marker = tmp_path / "pwned"
    for states in (tmp_path / "runs" / "run").glob("checkpoint_*/engine/mp_rank_00_model_states.pt"):
        torch.save({"module": RunsCode(marker)}, states)
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "refusing to load it" in error and "posix.system" in error, error[-2000:]
    assert not marker.exists()


def test_a_corrupt_shard_is_one_line_and_leaves_no_run_behind(tmp_path, lm_data, capsys) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(lm_data, data)
    (shard,) = data.glob("*.parquet")
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(content)
    config = _config(tmp_path, data)
    for _ in range(2):  # the second try is not blocked by anything the first left
        with pytest.raises(PipelineError, match=r"is corrupt .*re-run prepare --overwrite"):
            train(config)
    assert not (tmp_path / "runs" / "run").exists()


def test_the_readme_ray_start_listens_on_loopback_only(tmp_path) -> None:
    """The README's `ray start` (with its exports), as a user pastes it, given its own ports and temp dir."""
    import psutil

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### On a Ray cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    setup = [line.split("#")[0].strip() for line in block.splitlines()
             if line.startswith(("export ", "ray get-auth-token"))]
    (start,) = [line.strip() for line in block.splitlines() if line.startswith("ray start")]
    gcs = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayreadme-", dir="/tmp")  # Ray's socket paths must fit 107 bytes
    command = " && ".join([*setup, f"exec {start} --block --port {gcs} --dashboard-port {free_port()} "
                           f"--temp-dir {temp_dir} --disable-usage-stats {' '.join(ray_node_ports())}"])
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environment.update(PATH=f"{BIN}:{environment.get('PATH', '')}", HOME=str(tmp_path))  # the token goes there
    head = subprocess.Popen(["bash", "-c", command], env=environment, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen: set[tuple[str, int]] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(port == gcs for _, port in seen):
            group = {p.pid for p in psutil.process_iter() if _in_group(p, head.pid)}
            seen |= listening_addresses(group)
            time.sleep(0.5)
        time.sleep(3)  # the agents start after the GCS
        seen |= listening_addresses({p.pid for p in psutil.process_iter() if _in_group(p, head.pid)})
        assert any(port == gcs for _, port in seen), "the Ray head did not start"
        assert all(is_loopback(address) for address, _ in seen), seen
    finally:
        stop_service(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _in_group(process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group
    except OSError:
        return False
