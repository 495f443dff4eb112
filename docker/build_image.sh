#!/usr/bin/env bash
# Build one of the project's images on this machine, also where no registry of images can be reached:
# a base image that cannot be found or pulled is replaced by a local Debian bookworm base made with
# debootstrap (needs root and Debian's mirror), the torch wheel and CA bundle in docker/context/ are
# passed to the build (TORCH_WHEEL, EXTRA_CA_CERT), and the CUDA image, whose CUDA bases cannot be had
# then, is built on the local base with that (CPU) wheel: enough to check that it builds and runs.
# cpu and cuda are docker/Dockerfile with different build arguments; on the same bases they share
# every layer but the last few.
# The build stage is kept tagged (<tag>-builder, for the layer cache); older build stages and the
# image the tag named before are removed (unless a container still uses it).
# From the repository root:
#   docker/build_image.sh cpu|cuda|postgres [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:?usage: docker/build_image.sh cpu|cuda|postgres [TAG]}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
LOCAL_BASE=macformer-local/debian-python:bookworm
TORCH_WHEEL=${TORCH_WHEEL:-$(cd docker/context && ls torch-*.whl 2>/dev/null | head -n 1 || true)}

available() { docker image inspect "$1" >/dev/null 2>&1 || docker pull "$1" >/dev/null 2>&1; }
local_base() {
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        echo "building $LOCAL_BASE with debootstrap" >&2
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >/dev/null
        tar -C "$rootfs" -c . | docker import - "$LOCAL_BASE" >/dev/null
    fi
    echo "$LOCAL_BASE"
}

args=()
case "$kind" in
    cpu)
        tag=${2:-macformer:$version-cpu}; dockerfile=docker/Dockerfile
        base=${BASE_IMAGE:-python:3.11-slim-bookworm}
        available "$base" || base=$(local_base)
        args+=(--build-arg "BUILD_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base" --build-arg ACCELERATOR=cpu)
        [ -n "$TORCH_WHEEL" ] && args+=(--build-arg "TORCH_WHEEL=$TORCH_WHEEL")
        [ -f docker/context/ca-bundle.crt ] && args+=(--build-arg EXTRA_CA_CERT=ca-bundle.crt)
        ;;
    cuda)
        tag=${2:-macformer:$version-cuda}; dockerfile=docker/Dockerfile
        build=${BUILD_IMAGE:-nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04}
        runtime=${RUNTIME_IMAGE:-nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04}
        args+=(--build-arg ACCELERATOR=cuda)
        if available "$build" && available "$runtime"; then
            args+=(--build-arg "BUILD_IMAGE=$build" --build-arg "RUNTIME_IMAGE=$runtime"
                   --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}")
        else
            [ -n "$TORCH_WHEEL" ] || { echo "no CUDA base image and no torch wheel in docker/context/" >&2; exit 1; }
            base=$(local_base)
            echo "CUDA base images unavailable: building $dockerfile on $base with $TORCH_WHEEL" >&2
            args+=(--build-arg "BUILD_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base" --build-arg "TORCH_WHEEL=$TORCH_WHEEL")
        fi
        [ -f docker/context/ca-bundle.crt ] && args+=(--build-arg EXTRA_CA_CERT=ca-bundle.crt)
        ;;
    postgres)
        tag=${2:-macformer-local/postgres:15}; dockerfile=docker/Dockerfile.postgres
        base=${BASE_IMAGE:-debian:bookworm-slim}
        available "$base" || base=$(local_base)
        args+=(--build-arg "BASE_IMAGE=$base")
        ;;
    *) echo "unknown image kind '$kind': use cpu, cuda or postgres" >&2; exit 2 ;;
esac

build() { docker build --quiet --force-rm --network host -f "$dockerfile" "${args[@]}" "$@" . >/dev/null; }
if grep -q "AS builder" "$dockerfile"; then
    build --target builder -t "$tag-builder"
    # Earlier build stages, no longer tagged: each holds a full environment.
    docker image prune -f --filter label=org.macformer.stage=builder >/dev/null
fi
previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
build -t "$tag"
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$tag")" ]; then
    docker image rm "$previous" >/dev/null 2>&1 || true
fi
echo "$tag"
