"""Packing, shards, manifest and the shard reader, without Ray."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.errors import PipelineError
from pipelines.packing import WindowPacker
from pipelines.reader import ShardReader
from pipelines.shards import ShardWriter, load_manifest, write_manifest
from pipelines.sources import drop_binary_files, resolve_inputs, stdlib_files
from pipelines.tokenizer import processor_from_bytes, train_tokenizer


def test_packer_cuts_the_stream_into_overlapping_windows() -> None:
    rng = np.random.default_rng(0)
    documents = [rng.integers(4, 100, size=n).astype(np.int32) for n in rng.integers(1, 40, size=60)]
    stream = np.concatenate(documents)
    starts = np.cumsum([0] + [len(d) for d in documents[:-1]])
    packer, windows, boundaries = WindowPacker(seq_len=16), [], []
    for batch in (documents[:7], documents[7:8], documents[8:]):  # batch edges must not matter
        packed = packer.add(np.concatenate(batch), np.array([len(d) for d in batch]))
        windows.extend(packed.windows)
        boundaries.extend(packed.document_starts)
    assert all(len(w) == 17 for w in windows)
    assert len(windows) == (len(stream) - 1) // 16
    for i, (window, doc_starts) in enumerate(zip(windows, boundaries, strict=True)):
        np.testing.assert_array_equal(window, stream[i * 16: i * 16 + 17])
        expected = starts[(starts >= i * 16) & (starts < i * 16 + 17)] - i * 16
        np.testing.assert_array_equal(doc_starts, expected)
    assert packer.packed_tokens + packer.dropped_tokens == len(stream) == packer.total_tokens
    assert 0 <= packer.dropped_tokens < 16 + 1


def _dataset(tmp_path, rows_per_shard=(7, 5, 9, 1)):
    writer = ShardWriter(tmp_path, "parquet")
    value = 0
    for rows in rows_per_shard:
        ids = [[value + r, value + r] for r in range(rows)]
        value += rows
        writer.add(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))}))
        writer.flush()  # one shard per group
    assert [e["rows"] for e in writer.entries] == list(rows_per_shard)
    write_manifest(tmp_path, {"kind": "causal_lm", "shards": writer.entries, "rows": value})
    return value


def _ids(samples) -> list[int]:
    return [int(s["input_ids"][0]) for s in samples]


def test_ranks_are_disjoint_and_cover_every_row(tmp_path) -> None:
    total = _dataset(tmp_path)
    for world in (1, 2, 3):
        readers = [ShardReader(tmp_path, rank, world, seed=3) for rank in range(world)]
        seen = [_ids(r.samples(epoch=0)) for r in readers]
        assert sorted(i for ids in seen for i in ids) == list(range(total))
        assert [len(s) for s in seen] == [len(r) for r in readers]


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path) -> None:
    _dataset(tmp_path)
    reader = ShardReader(tmp_path, seed=1)
    first = _ids(reader.samples(0))
    assert _ids(ShardReader(tmp_path, seed=1).samples(0)) == first
    assert _ids(reader.samples(1)) != first and sorted(_ids(reader.samples(1))) == sorted(first)
    assert _ids(ShardReader(tmp_path, seed=2).samples(0)) != first
    assert _ids(ShardReader(tmp_path, shuffle=False).samples(0)) == list(range(22))


@pytest.mark.parametrize("stop", [0, 3, 6, 10])
def test_resume_gives_exactly_the_remaining_samples(tmp_path, stop) -> None:
    _dataset(tmp_path)
    reader = ShardReader(tmp_path, rank=1, world_size=2, seed=5)
    reader.set_epoch(2)
    full = _ids(reader.samples(2))
    iterator = iter(reader)
    consumed = [int(next(iterator)["input_ids"][0]) for _ in range(stop)]
    state = json.loads(json.dumps(reader.state_dict()))  # survives a checkpoint round trip
    resumed = ShardReader(tmp_path, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert consumed + _ids(resumed) == full
    with pytest.raises(PipelineError, match="same ones"):
        ShardReader(tmp_path, rank=0, world_size=2, seed=5).load_state_dict(state)


def test_reader_names_a_corrupt_or_missing_shard(tmp_path) -> None:
    _dataset(tmp_path)
    shard = tmp_path / load_manifest(tmp_path)["shards"][2]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=f"shard .*{shard.name} is corrupt"):
        list(ShardReader(tmp_path, shuffle=False).samples(0))
    shard.unlink()
    with pytest.raises(PipelineError, match=f"shard .*{shard.name} .* is missing"):
        list(ShardReader(tmp_path, shuffle=False).samples(0))


def test_manifest_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(PipelineError, match="not a prepared dataset"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(PipelineError, match="corrupt"):
        load_manifest(tmp_path)


def test_large_tables_are_split_to_the_target_shard_size(tmp_path) -> None:
    writer = ShardWriter(tmp_path, "parquet", target_bytes=4000)
    table = pa.table({"input_ids": pa.array([list(range(100))] * 95, pa.list_(pa.int32()))})  # ~400 B/row
    writer.add(table)
    writer.flush()
    assert [e["rows"] for e in writer.entries] == [9] * 10 + [5]  # 404 bytes a row: 9 fit in 4000
    assert sum(e["tokens"] for e in writer.entries) == 9500


def test_arrow_shards_read_back(tmp_path) -> None:
    writer = ShardWriter(tmp_path, "arrow")
    writer.add(pa.table({"input_ids": pa.array([[1, 2, 3]], pa.list_(pa.int32())), "label": pa.array([4])}))
    writer.flush()
    write_manifest(tmp_path, {"kind": "classification", "shards": writer.entries})
    (sample,) = ShardReader(tmp_path).samples(0)
    assert sample["input_ids"].tolist() == [1, 2, 3] and sample["label"] == 4
    assert writer.entries[0]["tokens"] == 3 and writer.entries[0]["path"].endswith(".arrow")


def test_tokenizer_keeps_code_whitespace_and_round_trips() -> None:
    texts = [Path(path).read_text(encoding="utf-8") for path in stdlib_files(30)]
    processor = processor_from_bytes(train_tokenizer(texts, vocab_size=600, sample_bytes=300_000))
    for text in texts[:5]:
        assert processor.decode(processor.encode(text)) == text
    assert processor.eos_id() == 2 and processor.pad_id() == 3
    with pytest.raises(PipelineError, match="lower --vocab-size"):
        train_tokenizer(["tiny corpus"], vocab_size=5000)


def test_input_resolution_errors(tmp_path) -> None:
    with pytest.raises(PipelineError, match="matches no file"):
        resolve_inputs([str(tmp_path / "*.txt")])
    with pytest.raises(PipelineError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PipelineError, match="corpus is empty"):
        resolve_inputs([str(tmp_path / "empty.txt")])
    assert len(resolve_inputs(["stdlib"], stdlib_limit=3)) == 3


def test_files_that_are_not_utf8_text_are_counted_and_skipped(tmp_path) -> None:
    (tmp_path / "code.txt").write_text("def f():\n    return 'é'\n" * 100)
    (tmp_path / "stray_byte.txt").write_bytes(b"caf\xe9 au lait, " + b"plain text " * 200)  # one Latin-1 byte
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 50)  # binary renamed .txt
    kept, skipped = drop_binary_files(resolve_inputs([str(tmp_path)]))
    assert [Path(f.path).name for f in skipped] == ["image.txt"]
    assert sorted(Path(f.path).name for f in kept) == ["code.txt", "stray_byte.txt"]
    with pytest.raises(PipelineError, match="none of the 1 inputs is UTF-8 text"):
        drop_binary_files(resolve_inputs([str(tmp_path / "image.txt")]))
