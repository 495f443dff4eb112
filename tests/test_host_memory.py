import json
import os
import platform
import subprocess
import sys

import pytest

from macformer.host_memory import process_environment

# Page faults per 64 MiB result of `x * 2`, median of 20 calls: glibc's default, with freed memory
# reused, inside large_allocations_mapped_fresh() and after it; in a process of its own (the setting is
# process-wide and the test process may have it already).
FAULTS_SCRIPT = """
import json, resource, statistics, torch
from macformer.host_memory import large_allocations_mapped_fresh, reuse_freed_host_memory

x = torch.ones(16 * 2**20)

def faults_per_result():
    counts = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x * 2
        del y
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)

default = faults_per_result()
applied = reuse_freed_host_memory()
reused = faults_per_result()
with large_allocations_mapped_fresh():
    fresh = faults_per_result()
print(json.dumps({"default": default, "applied": applied, "reused": reused, "fresh": fresh,
                  "reused_after": faults_per_result(), "again": reuse_freed_host_memory()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_serves_the_next_large_tensor_without_page_faults_unless_measuring_peak_memory():
    result = json.loads(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True,
                                       check=True).stdout)
    pages = 64 * 2**20 // 4096
    assert result["default"] > 0.9 * pages  # glibc's default: every large tensor from fresh pages
    assert result["applied"] and result["again"]  # applied, and idempotent
    assert result["reused"] < 0.01 * pages and result["reused_after"] < 0.01 * pages
    assert result["fresh"] > 0.9 * pages  # for a peak-memory measurement: the live tensors' pages only


# A thread of its own (as Ray Train runs the training loop) computing 128 MiB results: glibc serves them
# from the thread's arena, whose heaps hold at most 64 MiB, so they come from fresh pages whatever
# mallopt says; a process started with process_environment() has one arena for all threads.
THREAD_FAULTS_SCRIPT = """
import json, resource, statistics, threading, torch

def work(result):
    x = torch.ones(32 * 2**20)
    counts = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x * 2
        del y
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    result["median"] = statistics.median(counts)

result = {}
thread = threading.Thread(target=work, args=(result,))
thread.start()
thread.join()
print(json.dumps(result))
"""


def _thread_faults(environment: dict[str, str]) -> float:
    completed = subprocess.run([sys.executable, "-c", THREAD_FAULTS_SCRIPT], capture_output=True, text=True,
                               check=True, env=environment)
    return json.loads(completed.stdout)["median"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_worker_environment_reuses_freed_memory_in_every_thread(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    default = dict(os.environ)
    pages = 128 * 2**20 // 4096
    assert _thread_faults(default) > 0.9 * pages
    assert _thread_faults({**default, **process_environment()}) < 0.01 * pages


def test_a_worker_environment_keeps_the_callers_tunables_last(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    tunables = process_environment()["GLIBC_TUNABLES"]
    assert tunables.startswith("glibc.malloc.arena_max=1:") and tunables.endswith(":glibc.malloc.arena_max=4")
