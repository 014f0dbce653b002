#!/usr/bin/env bash
# Build the CPU image with no network inside the build: the wheels are gathered here, on the host,
# into docker/wheels/ (git-ignored), and the build runs with --network=none and pip's index off.
#
#   docker/build-cpu.sh [TAG] [docker build args...]     # TAG defaults to lora-dist:cpu
#   docker/build-cpu.sh lora-dist:cpu --build-arg BASE=lora-dist-base:bookworm
#   docker/build-cpu.sh --wheels-only                     # only fill docker/wheels/
#
# The host's pip does the downloading, with its own index, proxy and CA settings; torch's CPU wheel
# comes from TORCH_WHEEL (a file) if set, else from pip's find-links and indexes (for PyPI, add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). The Python that runs pip here (PYTHON)
# must have the image's version: 3.11 for the default bookworm bases.
set -euo pipefail

cd "$(dirname "$0")/.."
wheels=docker/wheels
py=${PYTHON:-python3}

mkdir -p "$wheels"
if [[ -n ${TORCH_WHEEL:-} ]]; then cp -u "$TORCH_WHEEL" "$wheels/"; fi
# The project's runtime dependencies (and the [serve] extra's) resolved with the image's pins, plus the build backend.
# The [serve] extra too: the image runs `lora-dist serve`.
deps=$("$py" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(" ".join(p["dependencies"] + p["optional-dependencies"]["serve"]))')
# shellcheck disable=SC2086  # $deps is a list of requirement specifiers
"$py" -m pip download --quiet --dest "$wheels" --only-binary=:all: --find-links "$wheels" \
  -c docker/requirements.txt torch==2.13.0+cpu setuptools $deps
[[ ${1:-} != --wheels-only ]] || exit 0

tag=${1:-lora-dist:cpu}
shift || true
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} "${DOCKER:-docker}" build --network=none --build-arg PIP_NO_INDEX=1 \
  -f docker/Dockerfile.cpu -t "$tag" "$@" .
