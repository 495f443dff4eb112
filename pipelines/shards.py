"""Shard files and the manifest that lists them with row counts, token counts and sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import PipelineError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_FORMATS = ("parquet", "arrow")
TOKEN_COLUMNS = ("input_ids", "pair_input_ids")


def file_sha256(path: str | Path, filesystem: pafs.FileSystem | None = None) -> str:
    digest = hashlib.sha256()
    with (filesystem or pafs.LocalFileSystem()).open_input_stream(str(path)) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_table(path: str, filesystem: pafs.FileSystem) -> pa.Table:
    if path.endswith(".parquet"):
        return pq.read_table(path, filesystem=filesystem)
    if isinstance(filesystem, pafs.LocalFileSystem):
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).read_all()
    with filesystem.open_input_file(path) as source:
        return pa.ipc.open_file(source).read_all()


class ShardWriter:
    """Buffers rows (pyarrow tables of one schema) and writes shards of about `target_bytes`."""

    def __init__(self, directory: Path, shard_format: str = "parquet", target_bytes: int = 64 << 20,
                 prefix: str = "shard") -> None:
        if shard_format not in SHARD_FORMATS:
            raise PipelineError(f"unknown shard format {shard_format!r}; use one of {', '.join(SHARD_FORMATS)}")
        self.directory, self.format, self.target_bytes, self.prefix = directory, shard_format, target_bytes, prefix
        self.entries: list[dict[str, Any]] = []
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        if self._pending_bytes >= self.target_bytes:
            self._write(final=False)

    def flush(self) -> None:
        """Write everything pending (the last shard may be smaller than the target)."""
        self._write(final=True)

    def _write(self, final: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        bytes_per_row = max(1.0, self._pending_bytes / table.num_rows)
        rows_per_shard = max(1, int(self.target_bytes / bytes_per_row))
        start = 0
        while table.num_rows - start >= rows_per_shard or (final and start < table.num_rows):
            piece = table.slice(start, rows_per_shard)
            self._write_shard(piece)
            start += piece.num_rows
        rest = table.slice(start)
        self._pending = [rest] if rest.num_rows else []
        self._pending_bytes = int(rest.num_rows * bytes_per_row)

    def _write_shard(self, table: pa.Table) -> None:
        name = f"{self.prefix}-{len(self.entries):05d}.{self.format}"
        path = self.directory / name
        if self.format == "parquet":
            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        tokens = sum(int(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0)
                     for c in TOKEN_COLUMNS if c in table.column_names)
        self.entries.append({"path": name, "rows": table.num_rows, "tokens": tokens, "bytes": path.stat().st_size,
                             "sha256": file_sha256(path)})


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a dataset directory, local or on an object store (s3://, gs://, file://)."""
    filesystem, root = storage.resolve(directory)
    path = storage.join(root, MANIFEST)
    if not storage.is_file(filesystem, path):
        raise PipelineError(f"{path} not found: {directory} is not a prepared dataset (run `macformer prepare`)")
    try:
        manifest = json.loads(storage.read_bytes(filesystem, path))
    except json.JSONDecodeError as error:
        raise PipelineError(
            f"{path} is corrupt ({error.msg} at line {error.lineno}); re-run prepare with --overwrite"
        ) from None
    missing = [k for k in ("format_version", "shards", "kind") if k not in manifest]
    if missing:
        raise PipelineError(f"{path} lacks {', '.join(missing)}; re-run prepare with --overwrite")
    if manifest["format_version"] != FORMAT_VERSION:
        raise PipelineError(f"{path} has format version {manifest['format_version']}, this code reads "
                            f"{FORMAT_VERSION}; re-run prepare")
    return manifest


def vocab_size(manifest: dict[str, Any]) -> int:
    """How many token ids a dataset's samples use (its tokenizer's, or a task's vocabulary)."""
    return manifest["tokenizer"]["vocab_size"] if manifest["kind"] == "causal_lm" else manifest["vocab_size"]


def verify_shard(directory: str | Path, entry: dict[str, Any]) -> str:
    """The shard's path inside its filesystem, after checking that it exists and its sha256 matches."""
    filesystem, root = storage.resolve(directory)
    path = storage.join(root, entry["path"])
    if not storage.is_file(filesystem, path):
        raise PipelineError(f"shard {path} listed in the manifest is missing; restore it or re-run prepare --overwrite")
    if file_sha256(path, filesystem) != entry["sha256"]:
        raise PipelineError(f"shard {path} is corrupt (sha256 differs from the manifest); "
                            "restore it or re-run prepare --overwrite")
    return path
