"""`macformer prepare` end to end on a slice of the stdlib corpus with a local Ray (2 CPUs)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN, init_session_ray

from launcher.cli import main
from pipelines.errors import PipelineError
from pipelines.prepare import PrepareConfig, prepare
from pipelines.reader import ShardReader
from pipelines.shards import verify_shard
from pipelines.sources import stdlib_files
from pipelines.tokenizer import processor_from_bytes

pytestmark = pytest.mark.slow

FILES = 25
SEQ_LEN = 256


def _documents(paths) -> list[str]:
    return [Path(p).read_bytes().decode("utf-8", errors="replace") for p in paths]


def _stream(processor, texts) -> np.ndarray:
    """The token stream computed independently: every non-empty document, then EOS."""
    ids = []
    for text in texts:
        if text:
            ids.extend(processor.encode(text))
            ids.append(processor.eos_id())
    return np.array(ids, dtype=np.int32)


@pytest.fixture(scope="module")
def stdlib_dataset(tmp_path_factory, local_ray):
    output = tmp_path_factory.mktemp("prepared") / "stdlib"
    config = PrepareConfig(inputs=("stdlib",), output=str(output), seq_len=SEQ_LEN, vocab_size=800,
                           tokenizer_sample_mb=0.5, stdlib_limit=FILES, shard_size_mb=0.2)
    return output, prepare(config), config


def test_manifest_counts_match_an_independent_tokenization(stdlib_dataset) -> None:
    output, manifest, _ = stdlib_dataset
    processor = processor_from_bytes((output / "tokenizer.model").read_bytes())
    stream = _stream(processor, _documents(stdlib_files(FILES)))
    assert manifest["total_tokens"] == len(stream)
    assert manifest["documents"] == FILES
    assert manifest["packed_tokens"] + manifest["dropped_tokens"] == len(stream)
    assert len(manifest["shards"]) > 1 and manifest["rows"] == sum(s["rows"] for s in manifest["shards"])
    assert manifest["tokenizer"]["sha256"] and manifest["command"] == "" and manifest["config"]["seq_len"] == SEQ_LEN

    windows = [s["input_ids"] for s in ShardReader(output, shuffle=False).samples(0)]
    assert all(len(w) == SEQ_LEN + 1 for w in windows) and len(windows) == manifest["rows"]
    rebuilt = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
    np.testing.assert_array_equal(rebuilt, stream[: manifest["packed_tokens"]])
    for entry in manifest["shards"]:
        verify_shard(output, entry)


def test_rerun_is_a_no_op_and_a_changed_config_is_refused(stdlib_dataset) -> None:
    output, manifest, config = stdlib_dataset
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    messages = []
    assert prepare(config, log=messages.append) == manifest
    assert "up to date" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before
    changed = PrepareConfig(**{**config.__dict__, "seq_len": 128})
    with pytest.raises(PipelineError, match="--overwrite"):
        prepare(changed)


def test_ranks_and_resume_on_the_prepared_dataset(stdlib_dataset) -> None:
    output, _, _ = stdlib_dataset
    key = lambda sample: sample["input_ids"].tobytes()
    ranks = [[key(s) for s in ShardReader(output, rank, 2, seed=7).samples(epoch=1)] for rank in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    everything = [key(s) for s in ShardReader(output, shuffle=False).samples(0)]
    assert sorted(ranks[0] + ranks[1]) == sorted(everything)
    reader = ShardReader(output, 1, 2, seed=7)
    reader.set_epoch(1)
    iterator = iter(reader)
    head = [key(next(iterator)) for _ in range(5)]
    resumed = ShardReader(output, 1, 2, seed=7)
    resumed.load_state_dict(reader.state_dict())
    assert head + [key(s) for s in resumed] == ranks[1]


def test_corrupt_shard_byte_fails_the_reader_clearly(stdlib_dataset, tmp_path) -> None:
    output, manifest, _ = stdlib_dataset
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    shard = copy / manifest["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=rf"{shard.name} is corrupt"):
        list(ShardReader(copy, shuffle=False).samples(0))


def test_jsonl_parquet_and_csv_inputs(stdlib_dataset, tmp_path) -> None:
    output, _, _ = stdlib_dataset
    texts = _documents(stdlib_files(6))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
    for name, delimiter in (("docs.csv", ","), ("docs.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter=delimiter)
            writer.writerow(["body"])
            writer.writerows([[t] for t in texts])
    processor = processor_from_bytes((output / "tokenizer.model").read_bytes())
    expected = len(_stream(processor, texts))
    for name in ("docs.jsonl", "docs.parquet", "docs.csv", "docs.tsv"):
        manifest = prepare(PrepareConfig(inputs=(str(tmp_path / name),), output=str(tmp_path / f"out-{name}"),
                                         seq_len=64, tokenizer=str(output / "tokenizer.model"), vocab_size=None,
                                         text_column="body", shard_format="arrow"))
        assert manifest["total_tokens"] == expected and manifest["documents"] == len(texts), name


def _cli_error(capsys, *args: str) -> str:
    assert main(["prepare", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_gives_one_line_and_leaves_nothing(stdlib_dataset, tmp_path, capsys) -> None:
    output, _, _ = stdlib_dataset
    out = str(tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    (tmp_path / "file").write_text("x")
    tokenizer = str(output / "tokenizer.model")
    cases = {
        "does not exist": ["--input", str(tmp_path / "nope.txt"), "--output", out],
        "matches no file": ["--input", str(tmp_path / "*.md"), "--output", out],
        "corpus is empty": ["--input", str(tmp_path / "empty.txt"), "--output", out],
        "no column 'text'": ["--input", str(tmp_path / "t.parquet"), "--output", out, "--tokenizer", tokenizer],
        "lower --vocab-size": ["--input", str(tmp_path / "t.parquet"), "--text-column", "body", "--output", out,
                               "--vocab-size", "5000"],
        "cannot write under": ["--input", "stdlib", "--stdlib-limit", "2", "--output", str(tmp_path / "file" / "o")],
        "fewer than one window": ["--input", str(tmp_path / "t.parquet"), "--text-column", "body", "--output", out,
                                  "--tokenizer", tokenizer],
        "not a valid sentencepiece": ["--input", "stdlib", "--output", out, "--tokenizer", str(tmp_path / "file")],
    }
    for expected, args in cases.items():
        assert expected in _cli_error(capsys, *args), expected
        assert not Path(out).exists() and not list(tmp_path.glob(".out.tmp-*")), expected


def test_unreachable_ray_address_fails_fast(tmp_path, capsys) -> None:
    import ray

    ray.shutdown()  # a fresh process would not have Ray running; neither must this call
    try:
        message = _cli_error(capsys, "--input", "stdlib", "--stdlib-limit", "2", "--output", str(tmp_path / "o"),
                             "--ray-address", "127.0.0.1:1")
    finally:
        init_session_ray()
    assert "cannot reach Ray at 127.0.0.1:1" in message and not (tmp_path / "o").exists()


def test_valid_fraction_holds_out_whole_documents(stdlib_dataset, tmp_path) -> None:
    output, _, _ = stdlib_dataset
    manifest = prepare(PrepareConfig(inputs=("stdlib",), output=str(tmp_path / "split"), seq_len=64,
                                     tokenizer=str(output / "tokenizer.model"), vocab_size=None,
                                     stdlib_limit=FILES, valid_fraction=0.25))
    assert {s["split"] for s in manifest["shards"]} == {"train", "valid"}
    processor = processor_from_bytes((output / "tokenizer.model").read_bytes())
    texts = _documents(stdlib_files(FILES))
    # Every 4th document (indices 3, 7, ...) is held out: each split's windows rebuild its own stream.
    for split, chosen in (("valid", texts[3::4]), ("train", [t for i, t in enumerate(texts) if i % 4 != 3])):
        windows = [s["input_ids"] for s in ShardReader(tmp_path / "split", shuffle=False, split=split).samples(0)]
        rebuilt = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
        stream = _stream(processor, chosen)
        np.testing.assert_array_equal(rebuilt, stream[: len(rebuilt)])
    assert manifest["total_tokens"] == len(_stream(processor, texts))


def _prepare_process(output: Path, *args: str) -> subprocess.Popen:
    """`macformer prepare` as a user runs it: its own process, so it starts its own private Ray."""
    return subprocess.Popen([str(BIN / "macformer"), "prepare", "--input", "stdlib", "--stdlib-limit", "6",
                             "--output", str(output), "--seq-len", "64", "--vocab-size", "400",
                             "--tokenizer-sample-mb", "0.2", *args],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_prepare_leaves_no_ray_running_and_the_next_cleans_its_staging(tmp_path) -> None:
    import psutil

    output = tmp_path / "data"
    process = _prepare_process(output)
    driver = psutil.Process(process.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until its Ray runs and the staging directory exists
        children = driver.children(recursive=True)
        if any("raylet" in " ".join(c.cmdline()) for c in children) and list(tmp_path.glob(".data.tmp-*")):
            break
        time.sleep(0.2)
    time.sleep(1)
    ray_processes = driver.children(recursive=True)
    assert len(ray_processes) >= 3
    os.kill(process.pid, signal.SIGKILL)  # no cleanup code of the driver runs
    process.wait()
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not [p.cmdline()[:2] for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert list(tmp_path.glob(".data.tmp-*"))  # the dead driver's staging directory is left ...

    rerun = _prepare_process(output)
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # ... and removed by the next run


def test_without_ray_address_prepare_starts_its_own_ray_beside_a_running_cluster(tmp_path, ray_head) -> None:
    process = _prepare_process(tmp_path / "data")
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log[-2000:]
    assert "Started a local Ray instance" in log and "Connecting to existing Ray cluster" not in log
