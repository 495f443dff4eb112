"""Atomic dataset directories: built in a staging directory beside the target and published only
when complete, so a crash never leaves a directory that looks finished.

Publication is exclusive: under a lock on the parent directory the target is re-checked, so two
writers racing for one --output never silently replace each other; a dataset that appeared meanwhile
is kept (and reported when it is the same one). --overwrite swaps the new directory in with one
atomic exchange, so the path never goes missing. Staging directories of writers that died (SIGKILL)
are removed by the next writer."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError
from pipelines.shards import MANIFEST, load_manifest

STAGING_TAG = ".tmp-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of what decides a dataset's content (inputs, settings, pipeline version): equal
    fingerprints, equal datasets."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(output: Path) -> list[Path]:
    """Delete the staging directories of `output` whose writer process no longer exists."""
    removed = []
    for candidate in output.parent.glob(f".{output.name}{STAGING_TAG}*"):
        pid = candidate.name.rpartition(STAGING_TAG)[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextmanager
def _parent_locked(output: Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory that holds `output` (released if we die)."""
    descriptor = os.open(output.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _exchange(first: Path, second: Path) -> None:
    """Atomically swap two paths (Linux renameat2). Where that is unsupported, two renames: the
    target is missing for that instant only."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_cwd = -100
        if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(second))
    retired = second.parent / f".{second.name}.old-{os.getpid()}"
    second.rename(retired)
    first.rename(second)
    retired.rename(first)


def publish(staging: Path, output: Path, fingerprint: str, overwrite: bool) -> bool:
    """Move the finished `staging` to `output`. Returns False when an identical dataset was
    published meanwhile by another writer (ours is dropped); refuses a different one without
    overwrite."""
    with _parent_locked(output):
        if not output.exists():
            staging.rename(output)
            return True
        existing = load_manifest(output).get("fingerprint") if (output / MANIFEST).is_file() else None
        if not overwrite:
            if existing == fingerprint:
                return False
            raise PipelineError(f"{output} was created by another writer while this one ran (other inputs or "
                                "settings); nothing replaced: pass --overwrite to replace it or choose another "
                                "--output")
        if existing is None:
            raise PipelineError(f"{output} is not a prepared dataset; refusing to replace it, choose another --output")
        _exchange(staging, output)  # staging now holds the old dataset, removed on exit
        return True


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `output` (named by this process id); stale ones of
    dead writers are removed first; on failure it vanishes. Publish it with `publish`."""
    remove_stale_staging(output)
    staging = output.parent / f".{output.name}{STAGING_TAG}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
