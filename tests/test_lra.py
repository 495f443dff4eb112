"""ListOps generation and evaluation, and the LRA file readers, on files the tests write."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.cli import main
from pipelines import listops, lra
from pipelines.errors import PipelineError
from pipelines.reader import ShardReader

SMALL = listops.ListOpsSpec(min_length=20, max_length=200, max_depth=6)


def _depth_and_arity(tokens):
    depth = max_depth = 0
    arity, max_arity = [], 0
    for token in tokens:
        if token in listops.OPERATORS:
            if arity:
                arity[-1] += 1
            depth += 1
            max_depth = max(max_depth, depth)
            arity.append(0)
        elif token == listops.CLOSE:
            depth -= 1
            max_arity = max(max_arity, arity.pop())
        else:
            arity[-1] += 1
    return max_depth, max_arity


def test_listops_follows_the_lra_specification() -> None:
    samples = list(listops.generate(300, seed=0, spec=SMALL))
    assert samples == list(listops.generate(300, seed=0, spec=SMALL))  # deterministic by seed
    assert samples != list(listops.generate(300, seed=1, spec=SMALL))
    assert len({" ".join(t) for t, _ in samples}) == 300  # duplicates removed
    assert {label for _, label in samples} == set(range(10))
    for tokens, label in samples:
        assert 20 <= len(tokens) <= 200
        assert listops.evaluate(tokens) == label
        depth, arity = _depth_and_arity(tokens)
        assert depth <= 6 and 2 <= arity <= 10
        assert set(tokens) <= set(listops.VOCAB[1:])


def test_default_listops_lengths() -> None:
    lengths = [len(t) for t, _ in listops.generate(20, seed=0)]
    assert min(lengths) >= 500 and max(lengths) <= 2000


@pytest.mark.parametrize(("text", "value"), [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[SM 5 6 7 ]", 8), ("[MED 1 5 3 ]", 3), ("[MED 1 2 3 4 ]", 2),
    ("[MIN [MAX 1 2 ] [SM 9 9 ] ]", 2),
])
def test_evaluator_on_hand_checked_expressions(text: str, value: int) -> None:
    assert listops.evaluate(text.split()) == value


@pytest.mark.parametrize("text", ["[MAX 1 2", "1 2", "[MAX ]", "[MAX 1 ] ]", "[FOO 1 ]"])
def test_evaluator_rejects_malformed_expressions(text: str) -> None:
    with pytest.raises(ValueError, match="ListOps"):
        listops.evaluate(text.split())


def test_listops_dataset_round_trips_through_shards(tmp_path, capsys) -> None:
    args = ["lra", "listops", "--output", str(tmp_path / "lo"), "--train", "40", "--valid", "10", "--test", "10",
            "--min-length", "20", "--max-length", "200", "--max-depth", "6", "--format", "arrow"]
    assert main(args) == 0
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    inverse = dict(enumerate(listops.VOCAB))
    seen = set()
    for split, count in (("train", 40), ("valid", 10), ("test", 10)):
        rows = list(ShardReader(tmp_path / "lo", split=split).samples(0))
        assert len(rows) == count
        for row in rows:
            tokens = [inverse[int(i)] for i in row["input_ids"]]
            assert listops.evaluate(tokens) == row["label"]
            seen.add(" ".join(tokens))
    assert len(seen) == 60  # no sample shared between splits
    with pytest.raises(PipelineError, match="no split 'dev'"):
        ShardReader(tmp_path / "lo", split="dev")


def test_text_reader(tmp_path) -> None:
    for split in ("train", "test"):
        for polarity, text in (("pos", "great film é"), ("neg", "dull")):
            (tmp_path / split / polarity).mkdir(parents=True)
            (tmp_path / split / polarity / "0_1.txt").write_text(text, encoding="utf-8")
    manifest = lra.write_task(lra.text_task(tmp_path, max_length=8), tmp_path / "out", {"max_length": 8})
    assert manifest["splits"] == {"test": 2, "train": 2} and manifest["vocab_size"] == 257
    rows = list(ShardReader(tmp_path / "out", split="train", shuffle=False).samples(0))
    assert [r["label"] for r in rows] == [1, 0]
    assert rows[0]["input_ids"].tolist() == [b + 1 for b in "great film é".encode()[:8]]


def test_retrieval_reader(tmp_path) -> None:
    for name in lra.RETRIEVAL_FILES.values():
        (tmp_path / name).write_text("1.0\ta\tb\tfirst doc\tsecond\n0\tc\td\tx\ty\n")
    lra.write_task(lra.retrieval_task(tmp_path, 100), tmp_path / "out", {})
    rows = list(ShardReader(tmp_path / "out", split="valid", shuffle=False).samples(0))
    assert [r["label"] for r in rows] == [1, 0]
    assert bytes((rows[0]["pair_input_ids"] - 1).astype(np.uint8)) == b"second"
    (tmp_path / lra.RETRIEVAL_FILES["test"]).write_text("1\tonly three\tfields\n")
    with pytest.raises(PipelineError, match="expected label, id1, id2, text1, text2"):
        lra.write_task(lra.retrieval_task(tmp_path, 100), tmp_path / "bad", {})
    assert not (tmp_path / "bad").exists()


def test_image_reader_converts_to_grayscale(tmp_path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    for name in ("data_batch_1", "test_batch"):
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": [3, 1, 4]}, handle)
    lra.write_task(lra.image_task(tmp_path), tmp_path / "out", {})
    rows = list(ShardReader(tmp_path / "out", split="train", shuffle=False).samples(0))
    red, green, blue = data[0, :1024], data[0, 1024:2048], data[0, 2048:]
    expected = np.rint(0.2989 * red + 0.5870 * green + 0.1140 * blue).astype(int) + 1
    assert rows[0]["input_ids"].tolist() == expected.tolist() and [r["label"] for r in rows] == [3, 1, 4]
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(PipelineError, match="not a CIFAR-10 python batch"):
        lra.write_task(lra.image_task(tmp_path), tmp_path / "bad", {})


class _RunsCode:
    """What a malicious pickle carries: unpickling it calls a function of the attacker's choice."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_image_reader_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / name).write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": [0]}))
    with pytest.raises(PipelineError, match=r"refers to posix\.system.*refusing to load it"):
        lra.write_task(lra.image_task(tmp_path), tmp_path / "out", {})
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_pathfinder_reader(tmp_path) -> None:
    (tmp_path / "imgs" / "0").mkdir(parents=True)
    (tmp_path / "metadata").mkdir()
    lines = []
    for i in range(10):
        pixels = np.full((4, 4), i * 20, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / "0" / f"sample_{i}.png")
        lines.append(f"imgs/0 sample_{i}.png 0 {i % 2} 4 4")
    (tmp_path / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
    manifest = lra.write_task(lra.pathfinder_task(tmp_path), tmp_path / "out", {})
    assert manifest["splits"] == {"test": 1, "train": 8, "valid": 1} and manifest["max_length"] == 16
    (row,) = ShardReader(tmp_path / "out", split="test").samples(0)
    assert row["input_ids"].tolist() == [9 * 20 + 1] * 16 and row["label"] == 1


def test_lra_bad_input(tmp_path, capsys) -> None:
    assert main(["lra", "text", "--output", str(tmp_path / "o")]) == 2
    assert "pass --input DIR" in capsys.readouterr().err
    assert main(["lra", "image", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no CIFAR-10 training batches" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="missing"):
        lra.retrieval_task(Path(tmp_path), 10)


@pytest.mark.parametrize(("settings", "message"), [
    ({"min_length": 500, "max_length": 256}, "min_length=500 exceeds max_length=256"),
    ({"max_depth": 0}, "max_depth must be a positive integer"),
    ({"max_args": 1}, "max_args must be at least 2"),
])
def test_impossible_listops_specs_are_refused_up_front(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        listops.ListOpsSpec(**settings)
