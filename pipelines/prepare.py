"""`macformer prepare`: corpus -> sentencepiece -> Ray Data tokenization -> packed causal-LM windows
in checksummed shards + manifest.json, written atomically."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import pipelines
from pipelines.errors import PipelineError
from pipelines.output import fingerprint, is_up_to_date, publish, staged_directory
from pipelines.packing import WindowPacker
from pipelines.ray_runtime import ray_session
from pipelines.shards import SHARD_FORMATS, ShardWriter, load_manifest, write_manifest
from pipelines.sources import InputFile, check_text_column, drop_binary_files, open_dataset, resolve_inputs
from pipelines.tokenizer import (
    MODEL_TYPES,
    load_tokenizer_bytes,
    processor_from_bytes,
    sha256_bytes,
    train_tokenizer,
)

TOKENIZER_FILE = "tokenizer.model"


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    output: str
    seq_len: int = 4096
    vocab_size: int | None = 8000
    tokenizer: str | None = None
    tokenizer_type: str = "bpe"
    tokenizer_sample_mb: float = 8.0
    shard_format: str = "parquet"
    shard_size_mb: float = 64.0
    text_column: str = "text"
    num_workers: int = 2
    batch_size: int = 64
    ray_address: str | None = None
    stdlib_limit: int | None = None
    valid_fraction: float = 0.0
    overwrite: bool = False
    command: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise PipelineError(f"--seq-len must be positive, got {self.seq_len}")
        if self.tokenizer is None and (self.vocab_size is None or self.vocab_size <= 0):
            raise PipelineError("give --vocab-size N (train a tokenizer) or --tokenizer MODEL (load one)")
        if self.tokenizer_type not in MODEL_TYPES:
            raise PipelineError(
                f"--tokenizer-type must be one of {', '.join(MODEL_TYPES)}, got {self.tokenizer_type!r}"
            )
        if self.shard_format not in SHARD_FORMATS:
            raise PipelineError(f"--format must be one of {', '.join(SHARD_FORMATS)}, got {self.shard_format!r}")
        for name in ("shard_size_mb", "tokenizer_sample_mb"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.valid_fraction < 1:
            raise PipelineError(f"--valid-fraction must lie in [0, 1), got {self.valid_fraction}")
        if self.num_workers < 1 or self.batch_size < 1:
            raise PipelineError("--num-workers and --batch-size must be at least 1")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the output: everything but where it goes and how it is computed."""
        ignored = {"output", "num_workers", "batch_size", "ray_address", "overwrite", "command"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


def _fingerprint(config: PrepareConfig, files: list[InputFile], tokenizer_hash: str | None) -> str:
    payload = {
        "config": config.fingerprint_fields(),
        "inputs": [(f.path, f.size, f.mtime) for f in files],
        "tokenizer": tokenizer_hash,
        "pipeline_version": pipelines.__version__,
    }
    return fingerprint(payload)


class DocumentTokenizer:
    """Ray Data actor: loads the tokenizer once, encodes a batch of documents, appends EOS."""

    def __init__(self, model: bytes) -> None:
        self.processor = processor_from_bytes(model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t for t in batch.column("text").to_pylist() if t]
        # One thread: the actor pool is the parallelism (sentencepiece would start one per core).
        encoded = self.processor.encode(texts, out_type=int, num_threads=1) if texts else []
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        for ids, end, length in zip(encoded, ends, lengths, strict=True):
            flat[end - length:end - 1] = ids
        flat[ends - 1] = self.processor.eos_id()
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        return pa.table({"input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))})


def _sample_texts(files: list[InputFile], config: PrepareConfig):
    """Documents for tokenizer training, read through the same Ray Data source as the corpus."""
    dataset = open_dataset(files, config.text_column)
    budget = config.tokenizer_sample_mb * (1 << 20)
    used = 0
    for row in dataset.iter_rows():
        text = row["text"] or ""
        used += len(text)
        yield text
        if used >= budget:
            return


def prepare(config: PrepareConfig, log=print) -> dict[str, Any]:
    """Run the pipeline; returns the manifest. A finished identical output is left as it is."""
    start = time.perf_counter()
    output = Path(config.output).resolve()
    files, binary = drop_binary_files(resolve_inputs(list(config.inputs), config.stdlib_limit))
    if binary:
        log(f"skipped {len(binary)} input file(s) that are not UTF-8 text (binary data or another encoding; "
            f"e.g. {binary[0].path})")
    check_text_column(files, config.text_column)
    given_tokenizer = load_tokenizer_bytes(config.tokenizer) if config.tokenizer else None
    digest = _fingerprint(config, files, sha256_bytes(given_tokenizer) if given_tokenizer else None)
    if is_up_to_date(output, digest, config.overwrite):
        log(f"{output} is up to date (same inputs and config); nothing to do")
        return load_manifest(output)
    with staged_directory(output) as staging, ray_session(config.ray_address):
        manifest = _run(config, files, given_tokenizer, staging, log)
        manifest.update(fingerprint=digest, command=config.command, config=config.fingerprint_fields(),
                        pipeline_version=pipelines.__version__)
        write_manifest(staging, manifest)
        if not publish(staging, output, digest, config.overwrite):
            log(f"{output} was prepared meanwhile by another run with the same inputs and settings; kept it")
    manifest = load_manifest(output)
    elapsed = time.perf_counter() - start
    log(f"prepared {output}: {manifest['documents']} documents, {manifest['total_tokens']} tokens, "
        f"{manifest['rows']} windows of {config.seq_len + 1} in {len(manifest['shards'])} shards, "
        f"{manifest['total_tokens'] / elapsed:,.0f} tokens/s ({elapsed:.1f} s)")
    return manifest


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    """list<int32> column from numpy rows without a Python-level copy per element."""
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays).astype(np.int32)))


def _run(config: PrepareConfig, files: list[InputFile], tokenizer_model: bytes | None, staging: Path,
         log) -> dict[str, Any]:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # deterministic window order
    if tokenizer_model is None:
        log(f"training a {config.tokenizer_type} tokenizer (vocab {config.vocab_size}) on "
            f"<= {config.tokenizer_sample_mb} MB of the corpus")
        tokenizer_model = train_tokenizer(_sample_texts(files, config), config.vocab_size,
                                          config.tokenizer_type, int(config.tokenizer_sample_mb * (1 << 20)))
    (staging / TOKENIZER_FILE).write_bytes(tokenizer_model)
    processor = processor_from_bytes(tokenizer_model)

    tokens = open_dataset(files, config.text_column).map_batches(
        DocumentTokenizer, fn_constructor_kwargs={"model": tokenizer_model}, batch_format="pyarrow",
        batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.num_workers),
        # Fractional CPUs: the read tasks need a CPU too, and a pool holding all of them deadlocks.
        num_cpus=0.5,
    )
    target_bytes = int(config.shard_size_mb * (1 << 20))
    # Held-out documents (every `period`-th, in the deterministic input order) pack into their own
    # windows, so no validation window shares text with a training window.
    period = round(1 / config.valid_fraction) if config.valid_fraction else 0
    splits = ("train", "valid") if period else (None,)
    packers = {split: WindowPacker(config.seq_len) for split in splits}
    writers = {split: ShardWriter(staging, config.shard_format, target_bytes, prefix=split or "shard")
               for split in splits}
    documents = 0
    for batch in tokens.iter_batches(batch_format="pyarrow", batch_size=None):
        column = batch.column("input_ids").combine_chunks()
        lengths = np.diff(column.offsets.to_numpy())
        held_out = (np.arange(documents, documents + len(column)) % period == period - 1) if period else None
        documents += len(column)
        for split in splits:
            if held_out is None:
                chosen, chosen_lengths = column, lengths
            else:
                chosen = column.filter(pa.array(held_out if split == "valid" else ~held_out))
                chosen_lengths = np.diff(chosen.offsets.to_numpy())
            packed = packers[split].add(chosen.flatten().to_numpy(), chosen_lengths)
            if len(packed.windows):
                writers[split].add(pa.table({"input_ids": _list_array(list(packed.windows)),
                                             "document_starts": _list_array(packed.document_starts)}))
    for writer in writers.values():
        writer.flush()
    if documents == 0:
        raise PipelineError("the corpus has no non-empty document; give inputs with text")
    total_tokens = sum(p.total_tokens for p in packers.values())
    for split, writer in writers.items():
        if not writer.entries:
            where = f"the {split} split" if split else "the corpus"
            raise PipelineError(f"{where} has {packers[split].total_tokens} tokens, fewer than one window of "
                                f"{config.seq_len + 1}; lower --seq-len or add data")
    shards = [{**entry, "split": split} if split else entry for split, w in writers.items() for entry in w.entries]
    return {
        "kind": "causal_lm",
        "seq_len": config.seq_len,
        "format": config.shard_format,
        "documents": documents,
        "total_tokens": total_tokens,
        "packed_tokens": sum(p.packed_tokens for p in packers.values()),
        "dropped_tokens": sum(p.dropped_tokens for p in packers.values()),
        "rows": sum(e["rows"] for e in shards),
        "shards": shards,
        "inputs": [f.path for f in files],
        "tokenizer": {"path": TOKENIZER_FILE, "sha256": sha256_bytes(tokenizer_model),
                      "vocab_size": processor.get_piece_size(), "eos_id": processor.eos_id(),
                      "pad_id": processor.pad_id(), "bos_id": processor.bos_id(), "unk_id": processor.unk_id()},
    }

