"""Dataset publication: exclusive, atomic, and clean after a writer died (pipelines/output.py)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from pipelines.errors import PipelineError
from pipelines.output import publish, remove_stale_staging, staged_directory
from pipelines.shards import write_manifest


def _stage(staging, fingerprint: str, payload: str) -> None:
    write_manifest(staging, {"kind": "causal_lm", "shards": [], "fingerprint": fingerprint})
    (staging / "payload").write_text(payload)


def _fingerprint(output) -> str:
    return json.loads((output / "manifest.json").read_text())["fingerprint"]


@contextlib.contextmanager
def _two_writers(tmp_path, monkeypatch):
    """Two staging directories for one output, as two live processes (this one and its parent) hold them."""
    output = tmp_path / "data"
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(staged_directory(output))
        monkeypatch.setattr(os, "getpid", os.getppid)
        second = stack.enter_context(staged_directory(output))
        monkeypatch.undo()
        yield output, first, second


def test_a_concurrent_writer_with_other_settings_is_refused_and_nothing_is_replaced(tmp_path, monkeypatch) -> None:
    with _two_writers(tmp_path, monkeypatch) as (output, staging_a, staging_b):
        _stage(staging_a, "seq512", "a")
        _stage(staging_b, "seq256", "b")
        assert publish(staging_a, output, "seq512", overwrite=False)
        with pytest.raises(PipelineError, match=r"created by another writer.*pass --overwrite"):
            publish(staging_b, output, "seq256", overwrite=False)
    assert _fingerprint(output) == "seq512" and (output / "payload").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # both staging directories gone


def test_a_concurrent_writer_with_the_same_settings_keeps_the_published_dataset(tmp_path, monkeypatch) -> None:
    with _two_writers(tmp_path, monkeypatch) as (output, staging_a, staging_b):
        _stage(staging_a, "same", "a")
        _stage(staging_b, "same", "b")
        assert publish(staging_a, output, "same", overwrite=False)
        assert not publish(staging_b, output, "same", overwrite=False)
    assert (output / "payload").read_text() == "a"


def test_overwrite_swaps_in_place(tmp_path) -> None:
    output = tmp_path / "data"
    for fingerprint in ("old", "new"):
        with staged_directory(output) as staging:
            _stage(staging, fingerprint, fingerprint)
            publish(staging, output, fingerprint, overwrite=True)
    assert (output / "payload").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the old dataset left with the staging


def test_staging_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path) -> None:
    output = tmp_path / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".data.tmp-{dead.pid}", tmp_path / f".data.tmp-{os.getppid()}"
    for directory in (stale, live):
        (directory / "part").mkdir(parents=True)
    assert remove_stale_staging(output) == [stale]
    with staged_directory(output):
        pass
    assert not stale.exists() and live.exists()
