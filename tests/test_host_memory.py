import json
import os
import platform
import subprocess
import sys

import pytest

from macformer.host_memory import process_environment

needs_glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="glibc's malloc")

# Page faults of one call of `x * 2` (a fresh result of x's size), or their median over 20 calls, run in a
# process of its own: the settings are process-wide and the test process may have them already.
MEDIAN_FAULTS = """
import json, resource, statistics, threading, torch
from macformer.host_memory import large_allocations_mapped_fresh, reuse_freed_host_memory

def faults(x):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2
    del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def median_faults(x):
    return statistics.median(faults(x) for _ in range(20))
"""


def _plain_environment() -> dict[str, str]:
    """This process's environment without the settings that change how allocations get their pages."""
    return {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE") and not k.startswith("MALLOC_")}


def _run(script: str, environment: dict[str, str] | None = None) -> dict:
    completed = subprocess.run([sys.executable, "-c", MEDIAN_FAULTS + script], capture_output=True, text=True,
                               check=True, env=environment or _plain_environment())
    return json.loads(completed.stdout)


@needs_glibc
def test_freed_memory_serves_the_next_large_tensor_without_page_faults_unless_measuring_peak_memory():
    result = _run("""
x = torch.ones(16 * 2**20)  # 64 MiB
default = median_faults(x)
applied = reuse_freed_host_memory()
reused = median_faults(x)
with large_allocations_mapped_fresh():
    fresh = faults(x)
print(json.dumps({"default": default, "applied": applied, "reused": reused, "fresh": fresh,
                  "reused_after": median_faults(x), "again": reuse_freed_host_memory()}))
""")
    pages = 64 * 2**20 // 4096
    assert result["default"] > 0.9 * pages, result  # glibc's default: every large tensor from fresh pages
    assert result["applied"] and result["again"], result  # applied, and idempotent
    assert result["reused"] < 0.01 * pages and result["reused_after"] < 0.01 * pages, result
    # For a peak-memory measurement: the memory freed before the block is not resident, so the first
    # tensor inside it faults in all its pages (later ones may reuse its chunk when the heap is
    # fragmented: malloc prefers a free chunk to a fresh mapping).
    assert result["fresh"] > 0.9 * pages, result


@needs_glibc
def test_a_worker_environment_reuses_freed_memory_in_every_thread(monkeypatch):
    """128 MiB results computed in a thread of its own, as Ray Train runs the training loop: glibc serves
    a thread from its own arena, whose heaps hold at most 64 MiB, so they come from fresh pages whatever
    mallopt says; a process started with process_environment() has one arena for all threads."""
    in_a_thread = """
result = {}
thread = threading.Thread(target=lambda: result.update(median=median_faults(torch.ones(32 * 2**20))))
thread.start()
thread.join()
print(json.dumps(result))
"""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    default = _plain_environment()
    pages = 128 * 2**20 // 4096
    assert _run(in_a_thread, default)["median"] > 0.9 * pages
    assert _run(in_a_thread, {**default, **process_environment()})["median"] < 0.01 * pages


def test_a_worker_environment_keeps_the_callers_tunables_last(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    tunables = process_environment()["GLIBC_TUNABLES"]
    assert tunables.startswith("glibc.malloc.arena_max=1:") and tunables.endswith(":glibc.malloc.arena_max=4")
