"""Corpus sources: resolve inputs (files, directories, globs, object-store URIs, the built-in
`stdlib` corpus) and open them as a Ray Data dataset with one document per row in a "text" column."""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.errors import PipelineError
from pipelines.storage import is_uri

STDLIB = "stdlib"
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
# Formats read through HF `datasets` builders (one row per record).
HF_BUILDERS = {".csv": "csv", ".tsv": "tsv", ".arrow": "arrow"}
TEXT_PROBE_BYTES = 1 << 16
TEXT_SUFFIXES_SKIPPED = {".pyc", ".so", ".o", ".a", ".gz", ".zip", ".png", ".jpg"}


@dataclass(frozen=True)
class InputFile:
    path: str  # local path or URI
    size: int
    mtime: float

    @property
    def kind(self) -> str:
        suffix = Path(self.path).suffix.lower()
        if suffix in JSON_SUFFIXES:
            return "json"
        if suffix in PARQUET_SUFFIXES:
            return "parquet"
        if suffix in HF_BUILDERS:
            return HF_BUILDERS[suffix]
        return "text"


def stdlib_files(limit: int | None = None) -> list[str]:
    """The Python standard library's .py sources (site-packages excluded), sorted: a real corpus of
    long, varied documents present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    return files[:limit] if limit is not None else files


def _expand_local(spec: str) -> list[str]:
    if any(ch in spec for ch in "*?["):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise PipelineError(f"the glob {spec!r} matches no file; check the pattern (quote it for the shell)")
        return matches
    path = Path(spec)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [f for f in files if Path(f).suffix.lower() not in TEXT_SUFFIXES_SKIPPED]
        if not files:
            raise PipelineError(f"the directory {spec} holds no input file; point --input at a directory with data")
        return files
    if not path.exists():
        raise PipelineError(f"input {spec} does not exist; check the path (or use --input stdlib)")
    if not os.access(path, os.R_OK):
        raise PipelineError(f"input {spec} is not readable; fix its permissions")
    return [str(path)]


def _expand_uri(spec: str) -> list[InputFile]:
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(spec)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = [i for i in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File]
        elif info.type == pafs.FileType.File:
            infos = [info]
        else:
            raise PipelineError(f"input {spec} does not exist in its object store; check the URI")
    except PipelineError:
        raise
    except Exception as error:  # pyarrow raises several types for credentials / network problems
        reason = str(error).splitlines()[0]
        raise PipelineError(f"cannot open {spec}: {reason}; check the URI and credentials") from None
    scheme = spec.split("://", 1)[0]
    return [InputFile(f"{scheme}://{i.path}", i.size or 0, i.mtime.timestamp() if i.mtime else 0.0)
            for i in sorted(infos, key=lambda i: i.path)]


def resolve_inputs(specs: list[str], stdlib_limit: int | None = None) -> list[InputFile]:
    """Expand every --input into concrete files (sorted, deduplicated, non-empty)."""
    if not specs:
        raise PipelineError("no --input given; pass files, directories, globs, URIs or 'stdlib'")
    files: dict[str, InputFile] = {}
    for spec in specs:
        if spec == STDLIB:
            paths = stdlib_files(stdlib_limit)
        elif is_uri(spec):
            for item in _expand_uri(spec):
                files.setdefault(item.path, item)
            continue
        else:
            paths = _expand_local(spec)
        for path in paths:
            stat = os.stat(path)
            files.setdefault(path, InputFile(path, stat.st_size, stat.st_mtime))
    result = list(files.values())
    if sum(f.size for f in result) == 0:
        raise PipelineError("the corpus is empty (every input file has 0 bytes); give inputs with text")
    return result


def looks_like_text(path: str) -> bool:
    """Whether a plain-text input is UTF-8 text: its first TEXT_PROBE_BYTES have no NUL byte and at
    most 1% undecodable characters (a binary file renamed .txt fails; a stray Latin-1 byte does not)."""
    with open(path, "rb") as handle:
        head = handle.read(TEXT_PROBE_BYTES)
    if b"\0" in head:
        return False
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(head, final=len(head) < TEXT_PROBE_BYTES)  # a character cut at the end is not an error
    return text.count("\ufffd") <= 0.01 * max(1, len(text))


def drop_binary_files(files: list[InputFile]) -> tuple[list[InputFile], list[InputFile]]:
    """(text inputs kept, local plain-text inputs skipped because they hold binary data)."""
    skipped = [f for f in files if f.kind == "text" and not is_uri(f.path) and not looks_like_text(f.path)]
    if len(skipped) == len(files):
        raise PipelineError(f"none of the {len(files)} inputs is UTF-8 text (e.g. {files[0].path} holds binary "
                            "data); give text files")
    return [f for f in files if f not in skipped], skipped


def check_text_column(files: list[InputFile], column: str) -> None:
    """Fail before any work if a structured input lacks the text column."""
    for item in files:
        if item.kind == "parquet" and not is_uri(item.path):
            try:
                names = pq.read_schema(item.path).names
            except Exception as error:
                raise PipelineError(f"cannot read Parquet file {item.path}: {str(error).splitlines()[0]}; "
                                    "check the file is valid Parquet") from None
            if column not in names:
                raise PipelineError(f"{item.path} has no column {column!r} (columns: {', '.join(names)}); "
                                    "pass --text-column NAME")
        elif item.kind == "json" and not is_uri(item.path):
            with open(item.path, encoding="utf-8") as handle:
                first = handle.readline()
            try:
                record = json.loads(first) if first.strip() else {}
            except json.JSONDecodeError:
                raise PipelineError(f"{item.path} is not JSON Lines (first line does not parse); "
                                    "fix the file or rename it to .txt") from None
            if first.strip() and column not in record:
                raise PipelineError(f"{item.path} records have no field {column!r} (fields: {', '.join(record)}); "
                                    "pass --text-field NAME")


def _bytes_to_text(batch):  # pyarrow.Table -> pyarrow.Table with one "text" column
    import pyarrow as pa

    texts = [b.decode("utf-8", errors="replace") for b in batch.column("bytes").to_pylist()]
    return pa.table({"text": pa.array(texts, pa.large_string())})


def open_dataset(files: list[InputFile], text_column: str = "text"):
    """One Ray Data dataset over all inputs, one document per row in a "text" column, in input order."""
    import ray.data

    by_kind: dict[str, list[str]] = {}
    for item in files:
        by_kind.setdefault(item.kind, []).append(item.path)
    parts = []
    for kind, paths in by_kind.items():
        if kind == "text":
            part = ray.data.read_binary_files(paths).map_batches(_bytes_to_text, batch_format="pyarrow")
        elif kind == "json":
            part = ray.data.read_json(paths, lines=True)
        elif kind == "parquet":
            part = ray.data.read_parquet(paths, columns=[text_column])
        else:
            import datasets

            options = {"delimiter": "\t"} if kind == "tsv" else {}
            hf = datasets.load_dataset("csv" if kind == "tsv" else kind, data_files=paths, split="train", **options)
            if text_column not in hf.column_names:
                raise PipelineError(f"{paths[0]} has no column {text_column!r} (columns: "
                                    f"{', '.join(hf.column_names)}); pass --text-column NAME")
            # from_arrow: from_huggingface looks the dataset up on the Hub first, which stalls offline.
            part = ray.data.from_arrow(hf.select_columns([text_column]).with_format("arrow")[:])
        if kind != "text":
            part = part.select_columns([text_column])
            if text_column != "text":
                part = part.rename_columns({text_column: "text"})
        parts.append(part)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
