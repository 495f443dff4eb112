"""Long Range Arena task data in the shard + manifest format: generated ListOps, and readers for the
LRA files a user may already have (IMDB text, AAN retrieval pairs, CIFAR-10 images, Pathfinder).

Every task is written as one dataset directory: shards named by split, each row with `input_ids`
(and `pair_input_ids` for retrieval) and `label`, and manifest.json with the splits, the vocabulary
size, the padding id (0) and the number of classes. Byte and pixel values v become ids v + 1.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import pipelines
from pipelines import listops
from pipelines.errors import PipelineError
from pipelines.output import fingerprint, is_up_to_date, publish, staged_directory
from pipelines.shards import ShardWriter, load_manifest, write_manifest

Row = dict[str, Any]
BYTE_VOCAB = 257  # 0 pads, bytes and pixels are value + 1
ROWS_PER_WRITE = 1024


def byte_ids(text: str | bytes, max_length: int) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return [b + 1 for b in data[:max_length]]


@dataclass(frozen=True)
class TaskData:
    """A task's splits (lazily produced rows) and what a model needs to know about them."""

    name: str
    splits: dict[str, Callable[[], Iterator[Row]]]
    vocab_size: int
    num_classes: int
    max_length: int
    inputs: tuple[Path, ...] = ()


def _files(directory: Path, pattern: str, what: str) -> list[Path]:
    files = sorted(directory.glob(pattern))
    if not files:
        raise PipelineError(f"no {what} under {directory} (expected {pattern}); point --input at the LRA files")
    return files


# ListOps -----------------------------------------------------------------------------------------

def listops_task(train: int, valid: int, test: int, seed: int, spec: listops.ListOpsSpec) -> TaskData:
    """Distinct ListOps samples, split in generation order (duplicates removed across splits)."""
    counts = {"train": train, "valid": valid, "test": test}
    if any(n < 0 for n in counts.values()) or sum(counts.values()) == 0:
        raise PipelineError("ListOps split sizes must be non-negative and not all zero")
    state: dict[str, Any] = {}

    def split(name: str) -> Callable[[], Iterator[Row]]:
        def rows() -> Iterator[Row]:
            if "samples" not in state:  # one stream for all splits, so no sample repeats across them
                state["samples"] = listops.generate(sum(counts.values()), seed, spec)
            for _ in range(counts[name]):
                tokens, label = next(state["samples"])
                yield {"input_ids": listops.encode(tokens), "label": label}
        return rows

    return TaskData("listops", {name: split(name) for name in counts if counts[name]},
                    len(listops.VOCAB), listops.NUM_CLASSES, spec.max_length)


# Text (IMDB, byte level) --------------------------------------------------------------------------

def text_task(directory: Path, max_length: int) -> TaskData:
    """aclImdb layout: {train,test}/{pos,neg}/*.txt; label 1 for pos."""
    splits, inputs = {}, []
    for split in ("train", "test"):
        files = [(f, 1) for f in _files(directory / split / "pos", "*.txt", f"{split} positive reviews")]
        files += [(f, 0) for f in _files(directory / split / "neg", "*.txt", f"{split} negative reviews")]
        inputs += [f for f, _ in files]
        splits[split] = (lambda files=files: ({"input_ids": byte_ids(f.read_bytes(), max_length), "label": y}
                                              for f, y in files))
    return TaskData("text", splits, BYTE_VOCAB, 2, max_length, tuple(inputs))


# Retrieval (AAN pairs, byte level) ----------------------------------------------------------------

RETRIEVAL_FILES = {"train": "new_aan_pairs.train.tsv", "valid": "new_aan_pairs.eval.tsv",
                   "test": "new_aan_pairs.test.tsv"}


def _retrieval_rows(path: Path, max_length: int) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 5:
                raise PipelineError(f"{path}:{number} has {len(fields)} tab-separated fields, expected "
                                    "label, id1, id2, text1, text2")
            try:
                label = int(float(fields[0]))
            except ValueError:
                raise PipelineError(f"{path}:{number} label {fields[0]!r} is not a number") from None
            yield {"input_ids": byte_ids(fields[3], max_length), "pair_input_ids": byte_ids(fields[4], max_length),
                   "label": label}


def retrieval_task(directory: Path, max_length: int) -> TaskData:
    paths = {split: directory / name for split, name in RETRIEVAL_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PipelineError(f"missing {', '.join(missing)}; point --input at the directory with the AAN tsv files")
    splits = {split: (lambda p=p: _retrieval_rows(p, max_length)) for split, p in paths.items()}
    return TaskData("retrieval", splits, BYTE_VOCAB, 2, max_length, tuple(paths.values()))


# Image (CIFAR-10 as grayscale pixel sequences) ------------------------------------------------------

def grayscale(rgb: np.ndarray) -> np.ndarray:
    """[n, 3072] CIFAR rows (R plane, G plane, B plane) -> [n, 1024] uint8 luma (ITU-R 601, as LRA)."""
    planes = rgb.reshape(-1, 3, 1024).astype(np.float64)
    return np.rint(0.2989 * planes[:, 0] + 0.5870 * planes[:, 1] + 0.1140 * planes[:, 2]).astype(np.uint8)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds (dicts, lists, bytes, numpy arrays) and nothing
    else: any other global a pickle names could run code, so it is refused."""

    ALLOWED = frozenset({("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                         ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no CIFAR-10 batch does; refusing to "
                                         "load it (unpickling it could run code)")
        return super().find_class(module, name)


def _cifar_rows(files: list[Path]) -> Iterator[Row]:
    for path in files:
        try:
            with open(path, "rb") as handle:
                batch = _CifarUnpickler(handle, encoding="bytes").load()
            data, labels = np.asarray(batch[b"data"]), batch[b"labels"]
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as error:
            raise PipelineError(f"{path} is not a CIFAR-10 python batch ({error}); use cifar-10-batches-py") from None
        for pixels, label in zip(grayscale(data), labels, strict=True):
            yield {"input_ids": (pixels.astype(np.int32) + 1).tolist(), "label": int(label)}


def image_task(directory: Path) -> TaskData:
    train = _files(directory, "data_batch_*", "CIFAR-10 training batches")
    test = _files(directory, "test_batch", "CIFAR-10 test batch")
    return TaskData("image", {"train": lambda: _cifar_rows(train), "test": lambda: _cifar_rows(test)},
                    BYTE_VOCAB, 10, 1024, tuple(train + test))


# Pathfinder ------------------------------------------------------------------------------------------

def _pathfinder_samples(directory: Path) -> list[tuple[Path, int]]:
    """LRA metadata files (metadata/*.npy, text despite the name): one sample per line, fields
    separated by spaces: image folder, file name, (unused), label."""
    samples = []
    for meta in _files(directory / "metadata", "*.npy", "Pathfinder metadata files"):
        for number, line in enumerate(meta.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or not fields[3].isdigit():
                raise PipelineError(f"{meta}:{number} is not 'folder file _ label ...'; is this LRA Pathfinder?")
            samples.append((directory / fields[0] / fields[1], int(fields[3])))
    return samples


def _pathfinder_rows(samples: list[tuple[Path, int]]) -> Iterator[Row]:
    from PIL import Image

    for path, label in samples:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.int32).reshape(-1)
        except OSError as error:
            raise PipelineError(f"cannot read Pathfinder image {path} ({error}); check the dataset is whole") from None
        yield {"input_ids": (pixels + 1).tolist(), "label": label}


def pathfinder_task(directory: Path) -> TaskData:
    """80/10/10 train/valid/test split in metadata order, as LRA does."""
    samples = _pathfinder_samples(directory)
    if not samples:
        raise PipelineError(f"the Pathfinder metadata under {directory} lists no sample; check --input")
    length = len(next(_pathfinder_rows(samples[:1]))["input_ids"])
    first, second = int(0.8 * len(samples)), int(0.9 * len(samples))
    parts = {"train": samples[:first], "valid": samples[first:second], "test": samples[second:]}
    return TaskData("pathfinder", {name: (lambda s=s: _pathfinder_rows(s)) for name, s in parts.items() if s},
                    BYTE_VOCAB, 2, length, tuple(sorted(directory.glob("metadata/*.npy"))))


# Writing -----------------------------------------------------------------------------------------------

def _schema(first: Row) -> pa.Schema:
    fields = [("input_ids", pa.list_(pa.int32()))]
    if "pair_input_ids" in first:
        fields.append(("pair_input_ids", pa.list_(pa.int32())))
    return pa.schema([*fields, ("label", pa.int32())])


def _write_split(rows: Iterable[Row], writer: ShardWriter) -> int:
    count, buffer, schema = 0, [], None
    for row in rows:
        schema = schema or _schema(row)
        buffer.append(row)
        if len(buffer) == ROWS_PER_WRITE:
            writer.add(pa.Table.from_pylist(buffer, schema))
            count, buffer = count + len(buffer), []
    if buffer:
        writer.add(pa.Table.from_pylist(buffer, schema))
        count += len(buffer)
    writer.flush()
    return count


def write_task(task: TaskData, output: str | Path, settings: dict[str, Any], shard_format: str = "parquet",
               shard_size_mb: float = 64.0, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Write `task` atomically to `output`; an identical existing output is left as it is."""
    output = Path(output).resolve()
    identity = {"task": task.name, "settings": settings, "format": shard_format, "shard_size_mb": shard_size_mb,
                "inputs": [(str(p), p.stat().st_size, p.stat().st_mtime) for p in task.inputs],
                "pipeline_version": pipelines.__version__}
    identity_hash = fingerprint(identity)
    if is_up_to_date(output, identity_hash, overwrite):
        log(f"{output} is up to date (same inputs and settings); nothing to do")
        return load_manifest(output)
    with staged_directory(output) as staging:
        shards, rows = [], {}
        for split, make_rows in task.splits.items():
            writer = ShardWriter(staging, shard_format, int(shard_size_mb * (1 << 20)), prefix=split)
            rows[split] = _write_split(make_rows(), writer)
            shards += [{**entry, "split": split} for entry in writer.entries]
        if not shards:
            raise PipelineError(f"the {task.name} inputs hold no sample; check --input")
        write_manifest(staging, {
            "kind": "classification", "task": task.name, "format": shard_format, "splits": rows,
            "rows": sum(rows.values()), "shards": shards, "vocab_size": task.vocab_size, "pad_id": 0,
            "num_classes": task.num_classes, "max_length": task.max_length, "settings": settings,
            "fingerprint": identity_hash, "pipeline_version": pipelines.__version__,
        })
        if not publish(staging, output, identity_hash, overwrite):
            log(f"{output} was written meanwhile by another run with the same inputs and settings; kept it")
    manifest = load_manifest(output)
    log(f"wrote {task.name} to {output}: " + ", ".join(f"{n} {s}" for s, n in manifest["splits"].items()))
    return manifest
