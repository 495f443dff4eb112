import pytest
import torch


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


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session: 2 CPUs on 127.0.0.1, no auth token; stopped at the end."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
