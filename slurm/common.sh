# Shared by the sbatch templates in this folder (sourced, not run). Each function is one step:
#
#   lora_setup CONFIG [k=v]  checks the allocation and the config at once, sets the run's variables
#                            (COMMAND: train, the default, or sweep: what lora-dist runs)
#   lora_head_address        the first node's address, from `scontrol show node` (NodeAddr)
#   lora_launch ARGS...      one launcher per node through srun; checkpoint + requeue on USR1
#
# The launcher (launcher/launch.py) runs torchrun on its node and passes SIGUSR1/SIGTERM to the
# training workers as SIGUSR1; they save a checkpoint at the next step boundary and exit 0.

lora_log() { echo "[lora-dist $(date +%H:%M:%S)] $*"; }
lora_die() { echo "[lora-dist] error: $*" >&2; exit 2; }

# Fail in the first seconds of the job, with a clear message in slurm-<jobid>.out, rather than
# minutes later inside torchrun.
lora_setup() {
  local config=${1:-}
  # From the start: an early USR1 must not kill this script (bash's default for it).
  PREEMPTED='' LORA_STEP=''
  trap '_lora_forward USR1' USR1
  trap '_lora_forward TERM' TERM
  [[ -n ${SLURM_JOB_ID:-} ]] || lora_die "run this with sbatch, not bash"
  [[ -n $config ]] || lora_die "no config given: sbatch $0 configs/NAME.yaml [key=value ...]"
  COMMAND=${COMMAND:-train}
  [[ $COMMAND == train || $COMMAND == sweep ]] || lora_die "COMMAND=$COMMAND: use train (the default) or sweep"
  [[ -f $config ]] || lora_die "config file not found: $config (relative paths are from $PWD)"
  [[ -f launcher/launch.py ]] || lora_die "launcher/launch.py not found in $PWD: submit from the repository root, or pass --chdir=REPO"
  command -v "$PYTHON" > /dev/null || lora_die "python not found ($PYTHON): edit slurm/site.sh (modules, virtualenv or container)"

  # Worker processes per node: one per allocated GPU. NPROC_PER_NODE overrides it (CPU-only nodes).
  NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
    lora_die "no GPUs in this allocation: request them with --gpus-per-node=N (or set NPROC_PER_NODE for a CPU-only run)"
  [[ ${SLURM_NTASKS_PER_NODE:-1} == 1 ]] ||
    lora_die "--ntasks-per-node must be 1: one launcher per node starts the $NPROC_PER_NODE workers"

  # Results go to runs/<job name>-<job id>/ unless the overrides name an output_dir. The job id
  # survives requeues, so a requeued run finds its checkpoints there.
  OUTPUT_DIR=runs/${SLURM_JOB_NAME:-lora-dist}-$SLURM_JOB_ID
  local arg
  for arg in "${@:2}"; do [[ $arg != output_dir=* ]] || OUTPUT_DIR=${arg#output_dir=}; done
  # W&B groups all ranks and all restarts of this job together.
  export WANDB_RUN_GROUP=$SLURM_JOB_ID
  export PYTHONUNBUFFERED=1
  # Slurm 22.05's srun does not inherit --cpus-per-task from sbatch; without this the step (launcher
  # and all its workers) would be bound to one CPU on sites with task/affinity or cgroups.
  [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  lora_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$SLURM_NNODES node(s) x $NPROC_PER_NODE worker(s), lora-dist $COMMAND, config $config, W&B group $WANDB_RUN_GROUP"
}

lora_head_address() {
  local head addr
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # NodeAddr is what slurmd listens on; a node's name need not resolve.
  addr=$(scontrol show node "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  echo "${addr:-$head}"
}

# Runs `srun ... launcher ARGS` in the background and waits. USR1 (the time-limit warning from
# --signal=B:USR1@120, or `scancel --signal=USR1 --batch JOBID`) reaches every launcher (through
# slurm/relay.sh), so every worker saves a checkpoint and exits 0; then the job requeues itself,
# and its next run resumes (train.resume=auto). On SIGTERM (scancel, or preemption, which requeues by
# itself) Slurm has already signalled the training processes; the job does not requeue itself.
lora_launch() {
  [[ -z $PREEMPTED ]] || _lora_requeue_or_stop 0  # the signal came before the training started
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" "${RUN_PREFIX[@]}" \
    bash slurm/relay.sh "$PYTHON" launcher/launch.py "$@" &
  LORA_STEP=$!
  # A trapped signal interrupts `wait`; keep waiting until srun has really exited.
  while wait "$LORA_STEP"; kill -0 "$LORA_STEP" 2> /dev/null; do :; done
  local rc=0
  wait "$LORA_STEP" || rc=$?
  [[ -z $PREEMPTED ]] || _lora_requeue_or_stop "$rc"
  if [[ $rc == 0 ]]; then lora_log "training finished: $OUTPUT_DIR"; else lora_log "training failed with exit code $rc"; fi
  exit "$rc"
}

_lora_requeue_or_stop() {
  local rc=$1
  [[ $PREEMPTED == USR1 ]] || exit 143  # SIGTERM: cancelled, or preempted (Slurm requeues those itself)
  [[ $rc == 0 ]] || lora_die "training exited with $rc after USR1; not requeueing (see the log above)"
  lora_log "checkpoint saved; requeueing job $SLURM_JOB_ID, which resumes from it"
  scontrol requeue "$SLURM_JOB_ID" || lora_die "scontrol requeue failed: resubmit with the same output_dir to resume"
  exit 0
}

_lora_forward() {
  [[ -n $PREEMPTED ]] && return  # once is enough
  PREEMPTED=$1
  if [[ $1 == TERM ]]; then
    # scancel or preemption: Slurm signals every process of the job itself.
    lora_log "got SIGTERM: the workers save a checkpoint and exit"
    return
  fi
  lora_log "got SIGUSR1: asking every worker to save a checkpoint and exit"
  [[ -n $LORA_STEP ]] || return 0
  # To every node's relay (slurm/relay.sh), which passes it to its launcher as SIGUSR1. By number:
  # scancel knows no SIGWINCH by name. A failure here must not end the script (set -e).
  scancel --signal="$(kill -l WINCH)" "$SLURM_JOB_ID" || lora_log "scancel failed; the job will not checkpoint"
}
