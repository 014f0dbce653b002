#!/usr/bin/env bash
# Make a Debian base image without any image registry: debootstrap a minimal bookworm with python3
# and its venv module, then `docker import` it.
#
#   docker/testing/base-image.sh WORKDIR [TAG]     # TAG defaults to lora-dist-base:bookworm
#   docker build -f docker/Dockerfile.cpu --build-arg BASE=lora-dist-base:bookworm ...
#
# Needs debootstrap, root and a reachable Debian mirror (DEBIAN_MIRROR). Takes about a minute.
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: $0 WORKDIR [TAG]" >&2; exit 2; }
work=$(mkdir -p "$1" && cd "$1" && pwd)
tag=${2:-lora-dist-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$work/rootfs

command -v debootstrap > /dev/null || { echo "base-image: debootstrap not installed" >&2; exit 3; }
rm -rf "$rootfs"
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1; then
  echo "base-image: debootstrap failed; last lines of $work/debootstrap.log:" >&2
  tail -n 15 "$work/debootstrap.log" >&2
  exit 1
fi
# Downloaded .debs and apt lists are not needed in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" > /dev/null
rm -rf "$rootfs"
echo "$tag"
