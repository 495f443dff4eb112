"""Connect to a Ray cluster, or start a local one bound to 127.0.0.1, for the length of a job."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.errors import PipelineError

# Without this, Ray ignores the node address below on some platforms and listens on every interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


PROBE_TIMEOUT_S = 5.0


def check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"Ray address {address!r} is not 'auto' or host:port; fix --ray-address")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise PipelineError(f"cannot reach Ray at {address} ({error.strerror or error}); start it with "
                            "`ray start --head` or drop --ray-address to run locally") from None


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, log_to_driver: bool = False,
                dashboard: bool = False) -> Iterator[None]:
    """Use the running Ray if initialised; else join `address` ("auto" or host:port / ray://...);
    else start a local Ray on 127.0.0.1 that is shut down afterwards. `log_to_driver` shows the
    workers' output here; `dashboard` (on 127.0.0.1) serves Ray's state API to a local cluster."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for the driver of a submitted Ray job
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # A private cluster on loopback: no token for local clients to manage.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=dashboard,
                     dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local cluster"
        raise PipelineError(f"cannot connect to Ray at {where} ({str(error).splitlines()[0]}); start a cluster "
                            "with `ray start --head` or drop --ray-address to run locally") from None
    try:
        yield
    finally:
        ray.shutdown()
