#!/usr/bin/env bash
# The distributed issue's GPU check, as one script (a few minutes on one H100/H200).
#
#   bash bench/gpu_dist_check.sh              # on a CUDA machine; JSON in bench/results/gpu-dist-<date>.json
#   bash bench/gpu_dist_check.sh --dry-run    # the same runs on the CPU, fp32, 5 steps (checks the script)
#
# The smoke config and gpt2-small (random weights), 200 steps each, bf16, under DDP with 1 process and under
# DeepSpeed ZeRO-2 (1 process): examples/s, tokens/s and peak GPU memory. Then gpt2-small in fp32 with TF32
# on (the default) and off. Copied to $OUT when that is set. Checks (issue 13), each a CHECK line; the script
# fails if one fails:
#   - DeepSpeed runs torch's fused AdamW (first line of the run), and nothing compiles FusedAdam;
#   - DeepSpeed bf16 saves the fp32 master adapter weights (values that bf16 cannot hold);
#   - DeepSpeed counts collectives only on sampled steps (1, 11, 21, ...: no GPU sync on the others);
#   - fp32 on CUDA says "TF32 matmuls" in its first line, and train.tf32=false does not;
#   - ZeRO-3 with optimizer offload runs (torch's fused AdamW on the CPU, nothing compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
STEPS=200; PREC=bf16; DEV=cuda
if [ "${1:-}" = "--dry-run" ]; then STEPS=5; PREC=fp32; DEV=cpu; fi
STAMP=$(date +%Y-%m-%d-%H%M)
WORK=$(mktemp -d)
OUTFILE=bench/results/gpu-dist-$STAMP.json
[ "${1:-}" = "--dry-run" ] && OUTFILE=$WORK/gpu-dist-$STAMP-dry-run.json  # a dry run is no result
mkdir -p bench/results
run() {  # NAME STEPS PRECISION CONFIG [overrides...]
  local name=$1 steps=$2 prec=$3 cfg=$4
  shift 4
  echo "== $name, $steps steps, $prec, $DEV"
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m lora_dist train --config "$cfg" "$@" \
    output_dir="$WORK/$name" train.max_steps="$steps" train.epochs=100 train.precision="$prec" \
    train.device=$DEV train.eval_every=100000 data.download=false tracking.wandb.mode=disabled \
    >"$WORK/$name.log" 2>&1 || { tail -30 "$WORK/$name.log"; exit 1; }
}
for config in ${DIST_CHECK_CONFIGS:-smoke gpt2-small}; do  # DIST_CHECK_CONFIGS=smoke: a quick dry run
  if [ "$config" = smoke ]; then CFG=configs/smoke.yaml; MODEL=(); else CFG=configs/gpt2-small-lora.yaml; MODEL=(model.weights=random); fi
  for strategy in ddp zero2; do
    if [ $strategy = zero2 ]; then DIST=(dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.json); else DIST=(dist.strategy=ddp); fi
    run "$config-$strategy" $STEPS $PREC $CFG "${MODEL[@]}" "${DIST[@]}"
  done
done
# ZeRO-3 with optimizer offload: torch's fused AdamW steps on the CPU (DeepSpeedCPUAdam is not built)
[ $DEV = cuda ] && run smoke-zero3-offload 50 $PREC configs/smoke.yaml dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero3-offload.json
FP32_STEPS=$((STEPS / 2)); FP32=(configs/gpt2-small-lora.yaml model.weights=random)
[ $DEV = cpu ] && FP32=(configs/smoke.yaml)  # a dry run: the tiny model
run gpt2-small-fp32-tf32 $FP32_STEPS fp32 "${FP32[@]}" dist.strategy=ddp
run gpt2-small-fp32-notf32 $FP32_STEPS fp32 "${FP32[@]}" dist.strategy=ddp train.tf32=false
$PY - "$WORK" "$OUTFILE" <<'PYEOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for run in sorted(p for p in work.iterdir() if p.is_dir()):
    r = json.loads((run / "results.json").read_text())
    mem = [json.loads(l).get("gpu_mem_gb") for l in (run / "metrics.jsonl").read_text().splitlines()]
    mem = [m for m in mem if m is not None]
    rows.append({"run": run.name, "steps": r["steps"], "examples_per_second": r["examples_per_second"],
                 "tokens_per_second": r["tokens_per_second"], "peak_gpu_mem_gb": max(mem) if mem else None,
                 "train_seconds": r["train_seconds"], "test_accuracy": r["test_accuracy"]})
    print(f"{run.name:20s} {r['examples_per_second']:9.1f} ex/s {r['tokens_per_second']:11.0f} tok/s  peak "
          f"{(max(mem) if mem else float('nan')):.2f} GiB")
out.write_text(json.dumps({"check": "gpu_dist_check", "runs": rows}, indent=2) + "\n")
print("written:", out)
PYEOF
$PY - "$WORK" "$DEV" "$PREC" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from lora_dist.train.deepspeed_strategy import COMMS_SAMPLE_EVERY
work, dev, prec = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
failed = []
def check(ok, what):
    print(f"CHECK {'ok' if ok else 'FAILED'}: {what}")
    ok or failed.append(what)
def first_line(name):
    return next(l for l in (work / f"{name}.log").read_text().splitlines() if l.startswith("lora-dist: "))
for name in sorted(p.name for p in work.iterdir() if p.is_dir() and "-zero" in p.name):
    log = (work / f"{name}.log").read_text()
    check("optimizer torch AdamW (fused)" in first_line(name), f"{name}: {first_line(name)!r} names torch's fused AdamW")
    check("FusedAdam" not in log and "fused_adam" not in log, f"{name}: nothing built or used DeepSpeed's FusedAdam")
    steps = [m["step"] for m in map(json.loads, (work / name / "metrics.jsonl").read_text().splitlines()) if "allreduce_bytes" in m]
    r = json.loads((work / name / "results.json").read_text())
    check(steps == list(range(1, r["steps"] + 1, COMMS_SAMPLE_EVERY)), f"{name}: collectives counted on steps {steps[:4]}... only")
    if prec != "fp32":
        a = load_file(str(work / name / "adapter" / "adapter_model.safetensors"))
        exact = sum(int((t.to(torch.bfloat16).float() != t).sum()) for t in a.values())
        check(exact > 0, f"{name}: the saved adapter is the fp32 master copy ({exact} values bf16 cannot hold)")
if dev == "cuda":
    check("(TF32 matmuls)" in first_line("gpt2-small-fp32-tf32"), f"fp32 on CUDA: {first_line('gpt2-small-fp32-tf32')!r}")
    check("TF32" not in first_line("gpt2-small-fp32-notf32"), "train.tf32=false: full fp32")
    on, off = (json.loads((work / n / "results.json").read_text())["examples_per_second"] for n in ("gpt2-small-fp32-tf32", "gpt2-small-fp32-notf32"))
    print(f"gpt2-small fp32: {on:.1f} ex/s with TF32, {off:.1f} without ({on / off:.2f}x)")
else:
    print("(dry run: the TF32 checks need CUDA)")
sys.exit(1 if failed else 0)
PYEOF
[ -n "${OUT:-}" ] && cp "$OUTFILE" "$OUT/" || true
