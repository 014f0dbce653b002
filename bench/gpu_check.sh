#!/usr/bin/env bash
# The GPU check of the performance work, as one script: at most GPU_CHECK_DEADLINE seconds (470) on one H100/H200.
#
#   bash bench/gpu_check.sh              # on a CUDA machine: logs in bench/results/gpu-check-<stamp>/, the summary
#                                        # in bench/results/gpu-check-<stamp>.json (and both under $OUT when set)
#   bash bench/gpu_check.sh --dry-run    # every step on the CPU with the tiny model and a few steps
#
# 0. The GPU tests (pytest -m gpu): the captured step replays what the plain step computes, bf16 storage of the
#    frozen weights, a random base drawn on the GPU.
# 1. The book recipe end to end: gpt2-small, 5 epochs, evaluation included, at the shipped config's defaults
#    (bf16, CUDA graphs, lengths padded to multiples of 64): process start to exit (target <= 20 s) and training
#    time (<= 10 s); then the book exactly (configs/book/appendix-e.yaml, fp32, every message padded to 120).
# 2. gpt2-small at batch 8, steady state: (a) lora-dist's defaults, (a) without CUDA graphs, (c) transformers +
#    PEFT (cuDNN attention off for both), side by side in one run: real tokens/s of (a) over (c) (target >= 4).
#    Every batch shape the timed steps see is warmed up first.
# 3. gpt2-xl: process start to the end of its first step (target <= 10 s); at batch 32, MFU over real tokens
#    (FLOPs counted as bench/flops.py counts them; target >= 40%) and HFU over every computed token, at lengths
#    rounded to 64 (the default) and to 16 (a-pad16), and peak memory with and without activation checkpointing.
# 4. torch.profiler over (a) without graphs: the CUDA kernels that take the time, for the next change.
# Each step is capped by `timeout`, and every cap by what is left of one global deadline (GPU_CHECK_DEADLINE, at
# most 480 s: a device call has 600); a step that fails, times out or finds no time left is recorded as such and
# the others run. After every step the summary JSON and a tarball of the logs (no checkpoints, adapters or
# splits) are copied to $OUT: two files, each well under 16 MiB, so that a stalled step loses nothing before it.
# GPU_CHECK_STEPS="1 3" runs only those steps. (c) needs transformers and peft (the GPU image has them; where
# they cannot be imported, (c) is left out, and the log says so).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
STAMP=$(date +%Y-%m-%d-%H%M)
DEADLINE=${GPU_CHECK_DEADLINE:-470}  # seconds from the start to the last copy to $OUT
T0=$(date +%s)
# each step's own cap in seconds; their sum fits the deadline (bench/gpu_preflight.py checks it)
declare -A CAP=([tests]=45 [e2e-defaults]=40 [e2e-book]=40 [small]=120 [xl-start]=45 [xl]=150 [profile]=25)
if [ $DRY = 1 ]; then
    DIR=$(mktemp -d)/gpu-check-dry-run
    DEVICE=cpu; SMALL=tiny; XL=tiny; XL_BATCH=8
    E2E_EXTRA=(train.max_steps=3 train.epochs=1 train.eval_batches=1)
    XL_RUN=(--batches 1 --passes 1 --steps 1 --warmup 1 --probe-seconds 0.1)
    SMALL_RUN=(--batches 2 --passes 1 --steps 1 --warmup 1 --probe-seconds 0.1)
    PROFILE_STEPS=2
else
    DIR=bench/results/gpu-check-$STAMP
    DEVICE=cuda; SMALL=gpt2-small; XL=gpt2-xl; XL_BATCH=32
    E2E_EXTRA=()
    XL_RUN=(--batches 6 --passes 2 --steps 3 --warmup 4 --probe-seconds 1)
    SMALL_RUN=(--batches 40 --passes 2 --steps 20 --warmup 10 --probe-seconds 1)
    PROFILE_STEPS=10
fi
mkdir -p "$DIR"
LOG=$DIR/gpu_check.log
say() { echo "== $*" | tee -a "$LOG"; }
now() { date +%s.%N; }
left() { echo $((DEADLINE - ($(date +%s) - T0))); }
STEPS=${GPU_CHECK_STEPS:-0 1 2 3 4}
step() { [[ " $STEPS " == *" $1 "* ]]; }
total=0
for k in "${!CAP[@]}"; do total=$((total + CAP[$k])); done
say "plan: deadline ${DEADLINE}s; caps $(for k in tests e2e-defaults e2e-book small xl-start xl profile; do printf '%s=%s ' $k "${CAP[$k]}"; done)(sum ${total}s)"

# ship STEP: the summary JSON and the logs (no checkpoints, adapters or data splits) to $OUT, now
ship() {
    $PY bench/gpu_summary.py "$DIR" "${DIR}.json" > "$DIR/summary.log" 2>&1
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        cp "${DIR}.json" "$OUT/"
        local name tarball
        name=$(basename "$DIR")
        tarball=$OUT/$name-logs.tar.gz
        tar -czf "$tarball" -C "$(dirname "$DIR")" --exclude=checkpoints --exclude=adapter --exclude=weights \
            --exclude=splits --exclude=plots --exclude='*.safetensors' --exclude='*.pt' "$name"
        if [ "$(stat -c %s "$tarball")" -ge $((15 * 1024 * 1024)) ]; then  # 16 MiB or more would not come back
            (cd "$(dirname "$DIR")" && find "$name" -name '*.log' -o -name '*.json' -o -name status |
                tar -czf "$tarball" -T -)
        fi
        echo "after $1: $(find "$OUT" -type f | wc -l) files, largest $(find "$OUT" -type f -printf '%s\n' | sort -n | tail -1) bytes" >> "$DIR/shipped"
    fi
    if [ -n "${GPU_CHECK_ON_SHIP:-}" ]; then $GPU_CHECK_ON_SHIP "$1"; fi  # bench/gpu_preflight.py looks at $OUT here
}

# cap NAME CMD...: CMD under `timeout`, for its own cap or what is left of the deadline (600 s in the dry run, on a
# slow CPU); its exit status is logged, then everything so far is shipped
cap() {
    local name=$1 secs rest rc
    shift
    secs=${CAP[$name]}
    rest=$(($(left) - 15))  # kept for the last summary and copy
    [ "$rest" -lt "$secs" ] && secs=$rest
    [ $DRY = 1 ] && secs=600
    if [ "$secs" -lt 5 ]; then
        echo "$name skipped" >> "$DIR/status"
        say "$name skipped: the ${DEADLINE}s deadline is near"
        ship "$name"
        return 124
    fi
    timeout --kill-after=5 "$secs" "$@"
    rc=$?
    echo "$name $rc" >> "$DIR/status"
    [ $rc = 0 ] || say "$name failed or ran past ${secs}s (exit $rc)"
    ship "$name"
    return $rc
}

[ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY - <<'EOF' | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

if step 0 && [ $DRY = 0 ]; then
    say "0. the GPU tests"
    cap tests $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$DIR/tests.log" 2>&1
    tail -3 "$DIR/tests.log" | tee -a "$LOG"
fi

if step 1; then
    say "1. the book recipe end to end on $DEVICE ($SMALL, random weights)"
    for mode in defaults book; do
        if [ $mode = book ]; then CONFIG=configs/book/appendix-e.yaml; else CONFIG=configs/gpt2-small-lora.yaml; fi
        now > "$DIR/e2e-$mode.start"
        cap "e2e-$mode" $PY -m lora_dist train --config $CONFIG model.name=$SMALL model.weights=random \
            data.download=false train.device=$DEVICE tracking.wandb.mode=disabled output_dir="$DIR/e2e-$mode" \
            overwrite=true "${E2E_EXTRA[@]}" > "$DIR/e2e-$mode.log" 2>&1
        now > "$DIR/e2e-$mode.end"
        head -3 "$DIR/e2e-$mode.log" | tee -a "$LOG"
        tail -1 "$DIR/e2e-$mode.log" | tee -a "$LOG"
    done
fi

if step 2; then
    say "2. $SMALL at batch 8: (a) defaults, (a) with train.lora_cast_once, (a) without CUDA graphs, (c) transformers + PEFT"
    CONTENDERS=a,a-castonce,a-nographs,c
    if ! $PY -c "import transformers, peft" > /dev/null 2>&1; then
        say "2. leaving (c) out: transformers/peft cannot be imported (pip install -e .[bench])"
        CONTENDERS=a,a-castonce,a-nographs
    fi
    cap small $PY bench/train_throughput.py --device $DEVICE --precision bf16 --model $SMALL \
        --contenders $CONTENDERS "${SMALL_RUN[@]}" --out "$DIR" --tag small 2>&1 | tee -a "$LOG"  # the table on the console too
fi

if step 3; then
    say "3. $XL: process start to first step; batch $XL_BATCH MFU and HFU at multiples 64 and 16; peak memory with and without checkpointing"
    now > "$DIR/xl-start.start"
    cap xl-start $PY -m lora_dist train --config configs/gpt2-xl-lora.yaml model.name=$XL model.weights=random \
        data.download=false train.device=$DEVICE train.batch_size=$XL_BATCH train.max_steps=2 train.eval_batches=1 \
        tracking.wandb.mode=disabled output_dir="$DIR/xl-start" overwrite=true > "$DIR/xl-start.log" 2>&1
    cap xl $PY bench/train_throughput.py --device $DEVICE --precision bf16 --model $XL --batch $XL_BATCH \
        --contenders a,a-pad16,a-ckpt "${XL_RUN[@]}" --out "$DIR" --tag xl 2>&1 | tee -a "$LOG"
fi

if step 4; then
    say "4. where (a)'s eager step goes on $DEVICE"
    cap profile $PY bench/profile_step.py a-nographs --model $SMALL --device $DEVICE --precision bf16 \
        --steps $PROFILE_STEPS > "$DIR/profile.log" 2>&1
    head -30 "$DIR/profile.log" >> "$LOG"
fi

say "summary"
ship summary
tee -a "$LOG" < "$DIR/summary.log"
say "done in $(($(date +%s) - T0))s: $DIR"
ship done
