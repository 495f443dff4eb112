"""Atomic dataset directories: built in a staging directory beside the target and renamed into
place only when complete, so a crash never leaves a directory that looks finished."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.shards import MANIFEST, load_manifest


def is_up_to_date(output: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when `output` already holds the dataset these inputs and settings produce. Refuses an
    unwritable location, a non-dataset directory, and (without overwrite) a different dataset."""
    ancestor = next(p for p in (output.parent, *output.parent.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise PipelineError(f"cannot write under {ancestor}; choose a writable --output location")
    if not output.exists():
        return False
    if not (output / MANIFEST).is_file():
        raise PipelineError(f"{output} exists and is not a prepared dataset; refusing to replace it, "
                            "choose another --output")
    if overwrite:
        return False
    if load_manifest(output).get("fingerprint") == fingerprint:
        return True
    raise PipelineError(f"{output} holds a dataset prepared from other inputs or settings; "
                        "pass --overwrite to replace it or choose another --output")


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces `output`, on failure it vanishes."""
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if output.exists():  # --overwrite: swap the new directory in, then drop the old one
            retired = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
