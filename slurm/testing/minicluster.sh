#!/usr/bin/env bash
# A throwaway two-node Slurm cluster on this one host, for tests and for trying the templates.
#
#   slurm/testing/minicluster.sh start DIR   # writes DIR/slurm.conf, starts slurmctld + slurmd n1, n2
#   export SLURM_CONF=DIR/slurm.conf         # in every shell that talks to it
#   sbatch --chdir="$PWD" slurm/single_node.sbatch configs/smoke.yaml
#   slurm/testing/minicluster.sh stop DIR    # stops the three daemons by the PIDs it recorded
#
# Needs Debian's slurm-wlm (Slurm 22.05) and root. No munge (auth/none, cred/none), no systemd, no
# cgroups (proctrack/linuxproc, task/none). Both nodes have NodeAddr=127.0.0.1 and their own slurmd
# port. Each node advertises fake GPUs (Gres=gpu:2 with no device files), so the templates' --gpus
# requests schedule unchanged while torch itself sees no CUDA and trains on the CPU with gloo.
# Everything the cluster writes stays in DIR. Never use this for anything but testing: auth/none
# lets any local user act as any other.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
export SLURM_CONF=$dir/slurm.conf

# Slurm's requeue delay is the credential lifetime (default 120 s). Tests want it short.
CRED_EXPIRE=${MINICLUSTER_CRED_EXPIRE:-5}
# What each simulated node claims: enough for the templates' #SBATCH defaults to fit unchanged.
CPUS_PER_NODE=${MINICLUSTER_CPUS:-16}
MEMORY_MB=${MINICLUSTER_MEMORY_MB:-65536}
GPUS_PER_NODE=${MINICLUSTER_GPUS:-2}

free_ports() {  # three free TCP ports on 127.0.0.1: slurmctld, slurmd n1, slurmd n2
  python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_conf() {
  local ctld_port=$1 n1_port=$2 n2_port=$3
  mkdir -p "$dir"/{state,log} "$dir"/spool/{n1,n2}
  cat > "$dir/slurm.conf" <<EOF
# Written by slurm/testing/minicluster.sh: a two-node test cluster on one host.
ClusterName=minicluster
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=$CRED_EXPIRE
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# Requeued jobs become eligible after cred_expire; look for them every second, not every minute.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=3600
KillWait=10
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeAddr=127.0.0.1 Port=$n1_port CPUs=$CPUS_PER_NODE RealMemory=$MEMORY_MB Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$n2_port CPUs=$CPUS_PER_NODE RealMemory=$MEMORY_MB Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=gpu Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  # Slurm drops GPUs without device files, so each fake GPU is an empty file. task/none binds nothing,
  # so jobs only see SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES.
  local i files=()
  for ((i = 0; i < GPUS_PER_NODE; i++)); do
    # A character device (a copy of /dev/null) where mknod is allowed; Slurm logs an error otherwise.
    mknod "$dir/fakegpu$i" c 1 3 2> /dev/null || touch "$dir/fakegpu$i"
    files+=("$dir/fakegpu$i")
  done
  local IFS=,
  echo "Name=gpu File=${files[*]}" > "$dir/gres.conf"
}

start_daemon() {  # name, command...: runs it in the foreground of its own session, records its PID
  local name=$1; shift
  setsid "$@" > "$dir/log/$name.stdout" 2>&1 < /dev/null &
  echo $! > "$dir/$name.launch.pid"
}

wait_nodes_idle() {
  local deadline=$((SECONDS + 30))
  while (( SECONDS < deadline )); do
    if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c -E ' (idle|mix|alloc)$') == 2 ]]; then
      return 0
    fi
    sleep 0.3
  done
  echo "minicluster: nodes did not become idle in 30 s; see $dir/log/" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$dir"/log/*.log >&2 || true
  return 1
}

start() {
  command -v slurmctld > /dev/null || { echo "minicluster: slurmctld not installed (apt-get install slurm-wlm)" >&2; exit 3; }
  [[ ! -e $dir/slurmctld.launch.pid ]] || { echo "minicluster: $dir already holds a cluster; stop it first" >&2; exit 1; }
  local ports
  read -r -a ports < <(free_ports)
  write_conf "${ports[@]}"
  start_daemon slurmctld slurmctld -D -i -f "$dir/slurm.conf"
  start_daemon slurmd-n1 slurmd -D -N n1 -f "$dir/slurm.conf"
  start_daemon slurmd-n2 slurmd -D -N n2 -f "$dir/slurm.conf"
  if ! wait_nodes_idle; then stop; exit 1; fi
  echo "export SLURM_CONF=$dir/slurm.conf"
}

stop() {
  local name pid pids=()
  for name in slurmd-n1 slurmd-n2 slurmctld; do
    [[ -f $dir/$name.launch.pid ]] || continue
    pid=$(< "$dir/$name.launch.pid")
    # Only signal the PID if it is still the daemon we started (PIDs get reused).
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$dir/slurm.conf"; then
      kill -TERM "$pid" 2> /dev/null && pids+=("$pid")
    fi
    rm -f "$dir/$name.launch.pid"
  done
  for _ in $(seq 100); do
    kill -0 "${pids[@]}" 2> /dev/null || break  # true while any of them lives
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) sinfo -N -l && squeue ;;
  *) usage ;;
esac
