#!/usr/bin/env bash
# Check of the CUDA image as far as it goes without a GPU: it builds (docker/build_image.sh: on the
# CUDA base images where they can be had, otherwise on a local Debian base with the CPU torch wheel,
# which it says; there it shares the CPU image's layers but the last), runs as the unprivileged user
# with DeepSpeed set to CUDA, and its `macformer` command starts. From the
# repository root:
#   docker/check_cuda_image.sh
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${MACFORMER_CUDA_IMAGE:-macformer:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)-cuda}
step() { echo "== $*"; STEP="$*"; }
trap 'status=$?; [ "$status" -ne 0 ] && echo "check_cuda_image: FAILED at: ${STEP:-start}" >&2; exit "$status"' EXIT

step "docker daemon"
docker info >/dev/null

step "build $IMAGE"
docker/build_image.sh cuda "$IMAGE" >/dev/null

step "macformer --help in the image"
docker run --rm "$IMAGE" macformer --help | grep -q "^usage: macformer"
docker run --rm "$IMAGE" macformer train --help | grep -q -- "--config"

step "runs as uid 1000, DeepSpeed set to CUDA"
[ "$(docker run --rm "$IMAGE" id -u)" = 1000 ]
[ "$(docker run --rm "$IMAGE" sh -c 'echo "$DS_ACCELERATOR"')" = cuda ]
echo "check_cuda_image: OK"
