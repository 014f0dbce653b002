#!/usr/bin/env bash
# The GPU half of the performance issue, as one script (budget: about 10 minutes on one H100/H200).
#
#   bash bench/gpu_check.sh              # on a machine with a CUDA GPU; logs and JSON in bench/results/gpu-check-<date>/
#   bash bench/gpu_check.sh --dry-run    # the same steps on the CPU with the tiny model and a few steps
#
# 1. The full 5-epoch book recipe, gpt2-small with random weights, bf16, end to end (evaluation included),
#    at lora-dist's defaults and in book mode. Target: under 20 s.
# 2. gpt2-xl at batch 32, bf16: training MFU (target >= 40%), and peak memory with and without
#    activation checkpointing.
# 3. gpt2-small throughput, (a) defaults vs (b) book mode vs (c) transformers + PEFT, and torch.compile
#    with its warm-up time. (c) needs the bench extras (transformers, peft): installed here when missing
#    (GPU_CHECK_NO_INSTALL=1: never), else (c) is left out with a message.
# GPU_CHECK_STEPS="1 3" runs only those steps; SMALL_CONTENDERS=a,b picks step 3's contenders. MFU is against
# the GPU's listed bf16 peak (exact name), or a measured 8192^3 bf16 matmul where none is listed.
# Results are also copied to $OUT when that is set (the device machine's return folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
STAMP=$(date +%Y-%m-%d-%H%M)
DIR=bench/results/gpu-check-$STAMP
if [ $DRY = 1 ]; then
    DIR=$(mktemp -d)/gpu-check-dry-run
    DEVICE=cpu; SMALL=tiny; XL=tiny; XL_BATCH=8
    E2E_EXTRA=(train.max_steps=3 train.epochs=1 train.eval_batches=1)
    XL_STEPS=(--batches 1 --passes 1 --steps 1 --warmup 1 --probe-seconds 0.1)
    SMALL_STEPS=(--batches 2 --passes 1 --steps 1 --warmup 1 --probe-seconds 0.1)
else
    DEVICE=cuda; SMALL=gpt2-small; XL=gpt2-xl; XL_BATCH=32
    E2E_EXTRA=()
    XL_STEPS=(--batches 8 --passes 3 --steps 4 --warmup 5 --probe-seconds 1)
    SMALL_STEPS=(--passes 2 --steps 20 --warmup 10 --probe-seconds 1)
fi
mkdir -p "$DIR"
LOG=$DIR/gpu_check.log
say() { echo "== $*" | tee -a "$LOG"; }
[ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" || true

STEPS=${GPU_CHECK_STEPS:-1 2 3}  # which steps run (tests pick one)
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step 1; then
say "1. gpt2-small book recipe end to end, bf16, random weights ($DEVICE)"
for mode in defaults book; do
    if [ $mode = book ]; then PAD=(data.padding=longest data.bucket=false); else PAD=(data.padding=batch data.bucket=true); fi
    start=$(date +%s.%N)
    $PY -m lora_dist train --config configs/book/appendix-e.yaml model.name=$SMALL model.weights=random \
        data.download=false train.precision=bf16 train.device=$DEVICE tracking.wandb.mode=disabled \
        output_dir="$DIR/e2e-$mode" overwrite=true "${PAD[@]}" "${E2E_EXTRA[@]}" >"$DIR/e2e-$mode.log" 2>&1
    end=$(date +%s.%N)
    $PY - "$DIR/e2e-$mode/results.json" "$start" "$end" "$mode" <<'EOF' | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"{sys.argv[4]}: {wall:.1f}s end to end (process start to exit; target < 20 s), {r['wall_seconds']:.1f}s inside "
      f"run(), {r['train_seconds']:.1f}s training, {r['examples_per_second']:.0f} examples/s, test accuracy "
      f"{r['test_accuracy'] * 100:.1f}% (random weights: chance level is expected)")
EOF
done
fi

if step 2; then
say "2. $XL at batch $XL_BATCH, bf16: MFU, and peak memory with and without activation checkpointing"
$PY bench/train_throughput.py --device $DEVICE --precision bf16 --model $XL --batch $XL_BATCH \
    --contenders a,a-bf16,a-ckpt "${XL_STEPS[@]}" --out "$DIR" --tag xl 2>&1 | tee -a "$LOG"
fi

if step 3; then
say "3. $SMALL throughput, bf16: (a) defaults, (b) book mode, (c) transformers + PEFT, and torch.compile"
# (c) needs the bench extras (transformers, peft), which the GPU image does not have: install them, or
# leave (c) out and say so. GPU_CHECK_NO_INSTALL=1: never install.
CONTENDERS=${SMALL_CONTENDERS:-a,b,c,a-bf16,a-compile}
has_bench_extras() { $PY - <<< "import transformers, peft" > /dev/null 2>&1; }
if [[ ,$CONTENDERS, == *,c,* ]] && ! has_bench_extras; then
    if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
        mapfile -t EXTRAS < <($PY - <<< "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))")
        say "3. installing the bench extras for (c): ${EXTRAS[*]}"
        timeout 180 "$PY" -m pip install --quiet --retries 1 --timeout 15 "${EXTRAS[@]}" 2>&1 | tail -3 | tee -a "$LOG" || true
    fi
    if ! has_bench_extras; then
        say "3. skipping (c) transformers + PEFT: transformers/peft cannot be imported (pip install -e .[bench])"
        CONTENDERS=$(echo ",$CONTENDERS," | sed 's/,c,/,/; s/^,//; s/,$//')
    fi
fi
if [ -n "$CONTENDERS" ]; then
    $PY bench/train_throughput.py --device $DEVICE --precision bf16 --model $SMALL \
        --contenders "$CONTENDERS" "${SMALL_STEPS[@]}" --out "$DIR" --tag small 2>&1 | tee -a "$LOG"
else
    say "3. no contender left to run"
fi
fi

say "done: $DIR"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp -r "$DIR" "$OUT/"
fi
