"""The command line as a new user meets it: one line for bad input (exit 2), a traceback for bugs,
defaults that do what the README says, and no secret printed. No Ray: everything here fails or
finishes before a cluster would start."""

import http.server
import re
import threading
from pathlib import Path

import mlflow
import pytest

from launcher import cli
from launcher.cli import main
from launcher.config import ConfigError
from launcher.tracking import mask_credentials, probe_tracking_server
from macformer import MacformerConfig, MacformerForCausalLM, MacformerForSequenceClassification
from pipelines import lra
from pipelines.listops import ListOpsSpec
from pipelines.shards import load_manifest
from pipelines.sources import stdlib_files
from pipelines.tokenizer import train_tokenizer

SMALL = {"attention": "rmfa", "num_features": 16, "d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32}


@pytest.fixture(scope="module")
def listops(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("listops") / "listops"
    spec = ListOpsSpec(min_length=10, max_length=40, max_depth=3)
    lra.write_task(lra.listops_task(64, 16, 24, seed=0, spec=spec), output, {"cli": True}, log=lambda m: None)
    return output


def _export(directory: Path, model_class, **settings) -> Path:
    model = model_class(MacformerConfig(**{**SMALL, **settings}))
    model.save_pretrained(directory)
    return directory


def test_a_bug_keeps_its_traceback_and_bad_input_is_one_line(monkeypatch, capsys) -> None:
    def buggy(args, argv):
        raise ValueError("an internal invariant broke")  # not a MacformerError: a bug, not bad input

    monkeypatch.setitem(cli.COMMANDS, "compare", (cli.COMMANDS["compare"][0], buggy))
    with pytest.raises(ValueError, match="invariant"):
        main(["compare", "--experiment", "x"])

    def bad_input(args, argv):
        raise ConfigError("setting x is wrong; fix x")

    monkeypatch.setitem(cli.COMMANDS, "compare", (cli.COMMANDS["compare"][0], bad_input))
    assert main(["compare", "--experiment", "x"]) == 2
    assert capsys.readouterr().err == "macformer compare: error: setting x is wrong; fix x\n"


def test_compare_names_a_missing_store_or_server_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    """MLflow's client would retry an unreachable server for about four minutes and then raise, and
    create an empty SQLite store where none was: both are one line, at once, with nothing written."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["compare", "--experiment", "x", "--tracking-uri", f"http://user:secret@127.0.0.1:{port}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is unreachable" in error and "secret" not in error, error
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's set_tracking_uri exports it
    assert main(["compare", "--experiment", "x"]) == 2  # the default store, ./mlflow.db, does not exist
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no MLflow store at" in error and "run `macformer train`" in error, error
    assert list(tmp_path.iterdir()) == []


def test_eval_and_generate_refuse_mismatched_inputs_in_one_line(tmp_path, listops, capsys) -> None:
    lm = _export(tmp_path / "lm", MacformerForCausalLM, vocab_size=300, max_seq_len=64, causal=True)
    tokenizer = tmp_path / "big.model"
    texts = [Path(path).read_text(errors="replace") for path in stdlib_files(20)]
    tokenizer.write_bytes(train_tokenizer(texts, vocab_size=600))
    cases = [
        (["eval", "--checkpoint", str(lm), "--data", str(listops)], "is a classification dataset and the model"),
        (["generate", "--checkpoint", str(lm), "--tokenizer", str(tokenizer), "--prompt", "w1"],
         "has 600 token ids, the model's vocabulary 300"),
        (["eval", "--checkpoint", "runs:/deadbeef/model", "--data", str(listops), "--tracking-uri",
          f"sqlite:///{tmp_path / 'm.db'}"], "cannot fetch runs:/deadbeef/model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error


def test_generate_compile_reaches_the_model(tmp_path, monkeypatch, capsys) -> None:
    # The compiled decoding itself is tested in test_models (compiling costs ~20 s); here the flag's path.
    lm = _export(tmp_path / "lm", MacformerForCausalLM, vocab_size=400, max_seq_len=64, causal=True)
    tokenizer = tmp_path / "t.model"
    tokenizer.write_bytes(train_tokenizer([Path(path).read_text(errors="replace") for path in stdlib_files(20)],
                                          vocab_size=400))
    calls = []
    original = MacformerForCausalLM.generate

    def recording_generate(self, *args, **kwargs):
        calls.append(kwargs["compile"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MacformerForCausalLM, "generate", recording_generate)
    for flags in ([], ["--compile"]):
        assert main(["generate", "--checkpoint", str(lm), "--tokenizer", str(tokenizer), "--prompt", "def",
                     "--max-new-tokens", "1", *flags]) == 0
    assert calls == [False, True] and capsys.readouterr().out.count("\n") == 2


def test_eval_uses_the_held_out_split_and_experiment_picks_the_best_run(tmp_path, listops, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("pick", artifact_location=(tmp_path / "artifacts").as_uri())
    models = {}
    for name, accuracy in (("good", 0.9), ("newest-but-worse", 0.5)):  # created in this order: worse is newest
        run = client.create_run(experiment, run_name=name)
        client.log_param(run.info.run_id, "attention", "rmfa")
        client.log_metric(run.info.run_id, "eval_accuracy", accuracy)
        models[name] = _export(tmp_path / name, MacformerForSequenceClassification, num_classes=10,
                               vocab_size=load_manifest(listops)["vocab_size"], max_seq_len=64)
        client.log_artifacts(run.info.run_id, str(models[name]), "model")
        client.set_terminated(run.info.run_id)
    assert main(["eval", "--checkpoint", "experiment:pick", "--data", str(listops), "--tracking-uri", uri,
                 "--batch-size", "4", "--batches", "2"]) == 0
    captured = capsys.readouterr()
    assert "best of 2 finished runs is 'good'" in captured.err and "eval_accuracy 0.9" in captured.err
    assert captured.out.startswith("split test:")  # the held-out split, not the training windows


class _BasicAuthHealth(http.server.BaseHTTPRequestHandler):
    """An MLflow-like /health that needs HTTP basic auth (user:secret)."""

    def do_GET(self) -> None:
        import base64

        expected = "Basic " + base64.b64encode(b"user:secret").decode()
        self.send_response(200 if self.headers.get("Authorization") == expected else 401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_credentials_are_used_to_probe_and_never_printed(tmp_path, listops, capsys) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        probe_tracking_server(f"http://user:secret@127.0.0.1:{port}")  # up, and the URI's credentials work
        with pytest.raises(ConfigError, match=r"refused the credentials") as refused:
            probe_tracking_server(f"http://user:wrong@127.0.0.1:{port}")
        assert "wrong" not in str(refused.value) and "user:***@" in str(refused.value)
    finally:
        server.shutdown()
    assert main(["train", f"data={listops}", "task=classification", "--tracking-uri",
                 "http://user:secret@127.0.0.1:9"]) == 2
    error = capsys.readouterr().err
    assert "unreachable" in error and "secret" not in error and "user:***@127.0.0.1:9" in error
    assert mask_credentials("postgresql://mlflow:pw@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"


def test_an_existing_run_directory_names_the_fix_that_exists(tmp_path, listops) -> None:
    from launcher.config import TrainConfig
    from launcher.train import check_run_directory

    config = TrainConfig(data=str(listops), task="classification", storage_path=str(tmp_path), run_name="grid-0")
    (tmp_path / "grid-0").mkdir()
    with pytest.raises(ConfigError, match="pass --resume"):  # `macformer train` has --resume
        check_run_directory(config, resume=False)
    with pytest.raises(ConfigError, match="give the sweep another name") as refused:  # `macformer sweep` has not
        check_run_directory(config, resume=False, sweep="grid")
    assert "--resume" not in str(refused.value)
    assert "--resume" in cli.build_parser()._subparsers._group_actions[0].choices["train"].format_usage()
    assert "--resume" not in cli.build_parser()._subparsers._group_actions[0].choices["sweep"].format_usage()


def test_runs_are_named_after_what_they_train_and_onecycle_has_no_warmup(listops) -> None:
    from launcher.config import TrainConfig

    named = TrainConfig(data=str(listops), task="classification", model={"num_features": 64}).resolved()
    assert re.fullmatch(r"rmfa-exp-D64-ppsbn-\d{8}-\d{6}", named.run_name)
    softmax = TrainConfig(data=str(listops), task="classification", model={"attention": "softmax"}).resolved()
    assert re.fullmatch(r"softmax-\d{8}-\d{6}", softmax.run_name)
    assert TrainConfig(data=str(listops), task="classification", run_name="mine").resolved().run_name == "mine"
    with pytest.raises(ConfigError, match="onecycle warms up over its own first 30%"):
        TrainConfig(data=str(listops), schedule="onecycle", warmup_steps=10)
    assert TrainConfig(data=str(listops), schedule="onecycle").warmup_steps is None
    assert TrainConfig(data=str(listops)).warmup_steps == 10
