#!/usr/bin/env bash
# The GPU check of the performance work, as one script: about 6 minutes on one H100/H200 (budget: 8).
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
#    PEFT, side by side in one run: real tokens/s of (a) over (c) (target >= 4).
# 3. gpt2-xl: process start to the end of its first step (target <= 10 s); at batch 32, MFU (FLOPs counted as
#    bench/flops.py counts them; target >= 40%) and peak memory with and without activation checkpointing.
# 4. torch.profiler over (a) without graphs: the CUDA kernels that take the time, for the next change.
# Each step is capped by `timeout`; a step that fails or times out is recorded as such and the others run.
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
STEPS=${GPU_CHECK_STEPS:-0 1 2 3 4}
step() { [[ " $STEPS " == *" $1 "* ]]; }
# cap SECONDS NAME CMD...: CMD under `timeout` (600 s in the dry run, on a slow CPU); its exit status is logged
cap() {
    local secs=$1 name=$2; shift 2
    [ $DRY = 1 ] && secs=600
    timeout --kill-after=10 "$secs" "$@"
    local rc=$?
    echo "$name $rc" >> "$DIR/status"
    [ $rc = 0 ] || say "$name failed or ran past ${secs}s (exit $rc)"
    return $rc
}
[ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY - <<'EOF' | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

if step 0 && [ $DRY = 0 ]; then
    say "0. the GPU tests"
    cap 150 tests $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$DIR/tests.log" 2>&1
    tail -3 "$DIR/tests.log" | tee -a "$LOG"
fi

if step 1; then
    say "1. the book recipe end to end on $DEVICE ($SMALL, random weights)"
    for mode in defaults book; do
        if [ $mode = book ]; then CONFIG=configs/book/appendix-e.yaml; else CONFIG=configs/gpt2-small-lora.yaml; fi
        echo "$(now)" > "$DIR/e2e-$mode.start"
        cap 90 "e2e-$mode" $PY -m lora_dist train --config $CONFIG model.name=$SMALL model.weights=random \
            data.download=false train.device=$DEVICE tracking.wandb.mode=disabled output_dir="$DIR/e2e-$mode" \
            overwrite=true "${E2E_EXTRA[@]}" > "$DIR/e2e-$mode.log" 2>&1
        echo "$(now)" > "$DIR/e2e-$mode.end"
        head -3 "$DIR/e2e-$mode.log" | tee -a "$LOG"
        tail -1 "$DIR/e2e-$mode.log" | tee -a "$LOG"
    done
fi

if step 2; then
    say "2. $SMALL at batch 8: (a) defaults, (a) without CUDA graphs, (c) transformers + PEFT"
    CONTENDERS=a,a-nographs,c
    if ! $PY -c "import transformers, peft" > /dev/null 2>&1; then
        say "2. leaving (c) out: transformers/peft cannot be imported (pip install -e .[bench])"
        CONTENDERS=a,a-nographs
    fi
    cap 240 small $PY bench/train_throughput.py --device $DEVICE --precision bf16 --model $SMALL \
        --contenders $CONTENDERS "${SMALL_RUN[@]}" --out "$DIR" --tag small 2>&1 | tee -a "$LOG"
fi

if step 3; then
    say "3. $XL: process start to first step; batch $XL_BATCH MFU and peak memory with and without checkpointing"
    echo "$(now)" > "$DIR/xl-start.start"
    cap 120 xl-start $PY -m lora_dist train --config configs/gpt2-xl-lora.yaml model.name=$XL model.weights=random \
        data.download=false train.device=$DEVICE train.batch_size=$XL_BATCH train.max_steps=2 train.eval_batches=1 \
        tracking.wandb.mode=disabled output_dir="$DIR/xl-start" overwrite=true > "$DIR/xl-start.log" 2>&1
    cap 300 xl $PY bench/train_throughput.py --device $DEVICE --precision bf16 --model $XL --batch $XL_BATCH \
        --contenders a,a-ckpt "${XL_RUN[@]}" --out "$DIR" --tag xl 2>&1 | tee -a "$LOG"
fi

if step 4; then
    say "4. where (a)'s eager step goes on $DEVICE"
    cap 90 profile $PY bench/profile_step.py a-nographs --model $SMALL --device $DEVICE --precision bf16 \
        --steps $PROFILE_STEPS > "$DIR/profile.log" 2>&1
    head -30 "$DIR/profile.log" >> "$LOG"
fi

say "summary"
$PY bench/gpu_summary.py "$DIR" "${DIR}.json" 2>&1 | tee -a "$LOG"
say "done: $DIR"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # the device machine's return folder: at most 8 files come back
    cp "${DIR}.json" "$OUT/" 2>/dev/null
    tar -czf "$OUT/$(basename "$DIR").tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")"
fi
