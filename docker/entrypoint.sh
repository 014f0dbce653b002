#!/bin/bash
# Entrypoint of the lora-dist images: warn when results would be lost, then hand over to the launcher.
#
#   docker run IMAGE train --config configs/smoke.yaml ...      -> launcher/launch.py -- train ...
#   docker run IMAGE --nproc-per-node 2 -- train --config ...   -> launcher/launch.py --nproc-per-node 2 -- ...
#   docker run IMAGE torchrun --nproc_per_node=2 -m lora_dist train ...   -> runs as given
#   docker run IMAGE serve --adapters spam=/runs/smoke --host 0.0.0.0      -> lora-dist serve, one process
set -euo pipefail

# Apptainer/Singularity run in the host's directories, so nothing is lost there.
runs=${LORA_DIST_RUNS:-/runs}
if [[ -z ${APPTAINER_CONTAINER:-${SINGULARITY_CONTAINER:-}} ]] &&
  ! awk -v dir="$runs" '$5 == dir { found = 1 } END { exit !found }' /proc/self/mountinfo; then
  echo "lora-dist: WARNING: $runs is not a mounted volume, so results and checkpoints written" \
    "there will be lost when the container is removed. Mount one: -v \"\$PWD/runs:$runs\"" >&2
fi

# torchrun advertises the container's hostname, which resolves nowhere in a container without a
# network (--network=none); its rendezvous would hang. Use the loopback address there.
if ! getent hosts "$(< /proc/sys/kernel/hostname)" > /dev/null 2>&1; then
  export PET_LOCAL_ADDR=${PET_LOCAL_ADDR:-127.0.0.1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi

# serve is one process that listens on a port: never under the launcher's one-worker-per-GPU torchrun.
if [[ ${1:-} == serve ]]; then
  exec lora-dist "$@"
fi

launcher=(python /opt/lora-dist/launcher/launch.py)
case ${1:-} in
  "" | -h | --help) exec "${launcher[@]}" --help ;;
  -*) exec "${launcher[@]}" "$@" ;;   # launcher options first, then -- and the lora-dist command
esac
if command -v "$1" > /dev/null; then
  exec "$@"                           # a program: torchrun, deepspeed, python, bash, ...
fi
exec "${launcher[@]}" -- "$@"         # a lora-dist subcommand: train, ...
