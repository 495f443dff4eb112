"""Connect to a Ray cluster, or start a local one bound to 127.0.0.1, for the length of a job."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.errors import PipelineError

# A private local Ray stays on 127.0.0.1 only with this set (else Ray ignores the node address below
# and listens on every interface); Ray reads it at import. Never in a submitted job's driver on a
# cluster ($RAY_ADDRESS set): there it would make the driver reachable on loopback only.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


PROBE_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 0.5


def _without(source: str) -> str:
    return "drop --ray-address" if source == "--ray-address" else f"unset {source}"


def check_reachable(address: str, source: str = "--ray-address") -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"Ray address {address!r} is not 'auto' or host:port; fix {source}")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise PipelineError(f"cannot reach Ray at {address} ({error.strerror or error}); start it with "
                            f"`ray start --head`, or {_without(source)} to run locally") from None


# Ray's processes name their session directory on their command line (gcs_server's --log_dir, ...).
SESSION_DIR = re.compile(r"(/[^\s=]*/session_[\w-]+)")


def _track_descendants(root, tracked: dict, session_dirs: set[str], watchdog_pid: int) -> None:
    import psutil

    for child in root.children(recursive=True):
        if child.pid != watchdog_pid and child.pid not in tracked:
            tracked[child.pid] = child
            with contextlib.suppress(psutil.Error):
                session_dirs.update(SESSION_DIR.findall(" ".join(child.cmdline())))


def _session_processes(session_dirs: set[str], watchdog_pid: int) -> dict:
    """Processes holding a file of one of the sessions open: every Ray process logs into its session."""
    import psutil

    found = {}
    prefixes = tuple(directory + "/" for directory in session_dirs)
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != watchdog_pid and any(f.path.startswith(prefixes) for f in process.open_files()):
                found[process.pid] = process
    return found


def _watch(driver_pid: int) -> None:
    """The watchdog's loop: track the driver's descendants while it lives; when it dies (even by
    SIGKILL, which runs no cleanup) terminate those still running, then exit."""
    import psutil

    tracked: dict[int, psutil.Process] = {}
    session_dirs: set[str] = set()
    me = os.getpid()
    while True:
        try:
            _track_descendants(psutil.Process(driver_pid), tracked, session_dirs, me)
        except psutil.NoSuchProcess:
            break
        time.sleep(WATCH_INTERVAL_S)
    # Ray's daemons die with the driver, but processes they started after the last look (raylet's
    # agents) are orphaned by then: they are found by the session files they hold open.
    if session_dirs:
        for pid, process in _session_processes(session_dirs, me).items():
            tracked.setdefault(pid, process)
    alive = [p for p in tracked.values() if p.is_running()]  # is_running also rules out a reused pid
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=5)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _start_watchdog() -> subprocess.Popen:
    """A process that stops this driver's private Ray if the driver dies without shutting it down."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.ray_runtime", str(os.getpid())],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, log_to_driver: bool = False,
                dashboard: bool = False) -> Iterator[None]:
    """Use the running Ray if initialised; else join `address` ("auto" or host:port / ray://...) or
    $RAY_ADDRESS (set for the driver of a submitted Ray job); else start a private Ray on 127.0.0.1,
    never joining a cluster that happens to run on this machine, shut down afterwards and stopped
    by a watchdog if this process dies first. `log_to_driver` shows the workers' output here;
    `dashboard` (on 127.0.0.1) serves Ray's state API to a local cluster."""
    import ray

    if ray.is_initialized():
        yield
        return
    source = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, source)
    watchdog = None
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # A private cluster on loopback: no token for local clients to manage.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            watchdog = _start_watchdog()
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                     include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as error:
        if watchdog is not None:
            watchdog.kill()
        where = address or "a local cluster"
        raise PipelineError(f"cannot connect to Ray at {where} ({str(error).splitlines()[0]}); start a cluster "
                            f"with `ray start --head` or {_without(source)} to run locally") from None
    try:
        yield
    finally:
        ray.shutdown()
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
