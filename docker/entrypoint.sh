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
apptainer=${APPTAINER_CONTAINER:-${SINGULARITY_CONTAINER:-}}
if [[ -z $apptainer ]] &&
  ! awk -v dir="$runs" '$5 == dir { found = 1 } END { exit !found }' /proc/self/mountinfo; then
  echo "lora-dist: WARNING: $runs is not a mounted volume, so results and checkpoints written" \
    "there will be lost when the container is removed. Mount one: -v \"\$PWD/runs:$runs\"" >&2
fi
# Docker creates a missing host directory owned by root (runs/ is not in a fresh clone), which this
# image's user cannot write: say so now, in one line, not in a traceback after the model has loaded.
uid=$(id -u)
# serve only reads adapters there (compose mounts runs/ read-only for it).
if [[ -z $apptainer && -d $runs && ! -w $runs && ${1:-} != -h && ${1:-} != --help && ${1:-} != serve && -n ${1:-} ]]; then
  echo "lora-dist: error: $runs is not writable by UID $uid (it belongs to UID $(stat -c %u "$runs")); fix:" \
    "on the host, sudo chown $uid runs (the mounted directory), or run with --user \"\$(id -u):\$(id -g)\"" >&2
  exit 2
fi

# Caches in a writable place: under --user with another UID, HOME is / (or another user's home), and
# under Apptainer the image, and so the image's cache paths, are read-only.
writable() { mkdir -p "$1" 2> /dev/null && [[ -w $1 ]]; }
writable "${HOME:-/nonexistent}" || export HOME=${TMPDIR:-/tmp}/lora-dist-home-$uid
writable "$HOME" || { echo "lora-dist: error: no writable home ($HOME); set HOME or TMPDIR to a writable directory" >&2; exit 2; }
writable "${XDG_CACHE_HOME:-$HOME/.cache}" || XDG_CACHE_HOME=$HOME/.cache
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$HOME/.cache}
for pair in TORCH_EXTENSIONS_DIR:torch_extensions HF_HOME:huggingface TRITON_CACHE_DIR:triton \
  MPLCONFIGDIR:matplotlib WANDB_CACHE_DIR:wandb WANDB_CONFIG_DIR:wandb-config WANDB_DATA_DIR:wandb-data; do
  var=${pair%%:*}
  if [[ -z ${!var:-} ]] || ! writable "${!var}"; then
    export "$var=$XDG_CACHE_HOME/${pair#*:}"
    writable "${!var}" || true
  fi
done
# W&B's offline files go with the results when it can write there, else with the caches.
if [[ -z ${WANDB_DIR:-} ]] || ! writable "$WANDB_DIR"; then
  export WANDB_DIR=$XDG_CACHE_HOME/wandb-runs
  writable "$WANDB_DIR" || true
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
