"""torch.distributed set up by Ray Train, listening on 127.0.0.1 only when the whole cluster is one
machine on loopback (a private local Ray). Ray Train's own setup lets rank 0's TCPStore listen on
every interface, which exposes the rendezvous of a local run to the network."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray
import torch.distributed as dist
from ray.train._internal.utils import get_address_and_port
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

LOOPBACK = "127.0.0.1"
_served: list[Any] = []  # rank 0 keeps its listening socket and store alive for the process group


def _serve_store_on_loopback() -> int:
    """On rank 0: a TCPStore server on a socket bound to 127.0.0.1; init_process_group (which creates
    its store multi-tenant) reuses it instead of listening on every interface. Returns the port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, is_master=True, multi_tenant=True, master_listen_fd=listener.fileno(),
                          wait_for_workers=False)
    _served.extend([listener, store])
    return port


def _set_master(port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        address, _ = worker_group.execute_single(0, get_address_and_port)
        if address != LOOPBACK:  # a real cluster: other nodes must reach rank 0
            super().on_start(worker_group, backend_config)
            return
        port = worker_group.execute_single(0, _serve_store_on_loopback)
        worker_group.execute(_set_master, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend_config.backend or "gloo", world_rank=rank,
            world_size=len(worker_group), init_method="env://", timeout_s=backend_config.timeout_s,
        ) for rank in range(len(worker_group))])


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group listens on loopback only on a single loopback machine."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
