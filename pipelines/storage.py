"""Local paths and object-store URIs behind one interface (pyarrow filesystems).

Datasets and run directories may live on s3://, gs://, hdfs:// or file:// as well as on a local
disk; credentials come from the environment, as pyarrow reads them.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.errors import PipelineError


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        raise PipelineError(f"cannot open {text} ({str(error).splitlines()[0]}); check the URI scheme, "
                            "bucket and credentials") from None


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_file(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()
