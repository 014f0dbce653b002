#!/usr/bin/env bash
# A private Docker daemon for tests: its own data, sockets and PID, all under DIR, no bridge network.
#
#   docker/testing/engine.sh start DIR    # prints: export DOCKER_HOST=unix://DIR/docker.sock
#   docker/testing/engine.sh stop DIR     # stops it by the PID it recorded
#
# Needs Debian's docker.io (dockerd, containerd, runc) and root. It leaves the host's own Docker
# alone and creates no network interfaces (--bridge=none), so containers run with --network=none
# and builds with --network=none.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
sock=$dir/docker.sock

start() {
  command -v dockerd > /dev/null || { echo "engine: dockerd not installed (apt-get install docker.io)" >&2; exit 3; }
  [[ ! -e $dir/dockerd.launch.pid ]] || { echo "engine: $dir already holds a daemon; stop it first" >&2; exit 1; }
  mkdir -p "$dir/data" "$dir/exec"
  # shellcheck disable=SC2086  # DOCKERD_ARGS: extra flags, split on spaces (e.g. --storage-driver=vfs)
  setsid dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
    -H "unix://$sock" --bridge=none --iptables=false --ip-masq=false ${DOCKERD_ARGS:-} \
    > "$dir/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$dir/dockerd.launch.pid"
  local deadline=$((SECONDS + 60))
  until DOCKER_HOST=unix://$sock docker version > /dev/null 2>&1; do
    if ! kill -0 "$(< "$dir/dockerd.launch.pid")" 2> /dev/null || (( SECONDS > deadline )); then
      echo "engine: dockerd did not start; last lines of $dir/dockerd.log:" >&2
      tail -n 15 "$dir/dockerd.log" >&2
      stop
      exit 1
    fi
    sleep 0.3
  done
  echo "export DOCKER_HOST=unix://$sock"
}

stop() {
  [[ -f $dir/dockerd.launch.pid ]] || return 0
  local pid
  pid=$(< "$dir/dockerd.launch.pid")
  # Only signal the PID if it is still the daemon we started (PIDs get reused).
  if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "--data-root $dir/data"; then
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2> /dev/null || true
  fi
  rm -f "$dir/dockerd.launch.pid"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
