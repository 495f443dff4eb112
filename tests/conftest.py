import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent  # the environment's console scripts (ray, mlflow, macformer)
# Ray Train's controller polls its workers every 2 s; the tests' runs last seconds, and each would wait
# up to a poll to start and to end (~3 s a run). Ray Train passes this on from the driver's environment,
# as do the services and CLI processes the tests start (they copy it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Without a GPU, Triton's interpreter runs the CUDA kernels on the CPU (read when a kernel is defined,
# so before macformer.attention.triton_chunked is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def unit_rows(n: int, dim: int, norm: float, generator: torch.Generator | None = None) -> torch.Tensor:
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * norm).float()


def presbn_like(shape: tuple[int, ...], scale: float | None = None) -> torch.Tensor:
    """Centred, unit-norm rows scaled by d^-1/4 (what preSBN feeds the kernel by default)."""
    x = torch.randn(*shape)
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True) * (shape[-1] ** -0.25 if scale is None else scale)


def init_session_ray() -> None:
    """The tests' local Ray: 2 CPUs on 127.0.0.1, no auth token; its workers sample MLflow's system
    metrics every 0.1 s (on an idle machine a test run can end within a second, and MLflow logs no
    sample of a run that ends within its first interval)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
                                       "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}})


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session (init_session_ray), stopped at the end."""
    import ray

    init_session_ray()
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_url(url: str, what: str, seconds: int = 300) -> None:
    for _ in range(seconds):
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{what} did not come up at {url}")


def start_service(command: list[str], **env: str) -> subprocess.Popen:
    """A console script of this environment in its own process group (stop it with stop_service)."""
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                   "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **env}  # as if started from the activated venv
    return subprocess.Popen([str(BIN / command[0]), *command[1:]], env=environment, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_service(process: subprocess.Popen) -> None:
    """Kill the service's whole process group (on SIGTERM a Ray node drains for 30 s first)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def ray_node_ports() -> list[str]:
    """Own agent ports for a Ray node: another local Ray (the session's) already holds the defaults."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the given processes hold."""
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


class RunsCode:
    """A pickled object whose loading runs a shell command (what a crafted checkpoint would carry)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ListenerSampler:
    """Samples, in a background thread, the listening sockets of this process and its descendants."""

    def __init__(self, interval_s: float = 0.5) -> None:
        import threading

        self.seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                pids = {me.pid, *(child.pid for child in me.children(recursive=True))}
                self.seen |= listening_addresses(pids)
            except psutil.Error:  # a process ended while it was listed
                pass
            self._stop.wait(interval_s)

    def __enter__(self) -> "ListenerSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def exposed(self) -> set[tuple[str, int]]:
        return {(address, port) for address, port in self.seen if not is_loopback(address)}


@pytest.fixture
def ray_head():
    """A separate Ray head on 127.0.0.1 with the Jobs API, stopped with its whole process group."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    head = start_service(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                          "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                          str(dashboard), "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp_dir,
                          *ray_node_ports()])
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_url(f"{address}/api/version", "the Ray head")
        yield address
    finally:
        stop_service(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
