#!/usr/bin/env bash
# The distributed issue's GPU check, as one script (a few minutes on one H100/H200).
#
#   bash bench/gpu_dist_check.sh              # on a CUDA machine; JSON in bench/results/gpu-dist-<date>.json
#   bash bench/gpu_dist_check.sh --dry-run    # the same runs on the CPU, fp32, 5 steps (checks the script)
#
# The smoke config and gpt2-small (random weights), 200 steps each, bf16, under DDP with 1 process and under
# DeepSpeed ZeRO-2 (1 process): examples/s, tokens/s and peak GPU memory. Copied to $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
STEPS=200; PREC=bf16; DEV=cuda
if [ "${1:-}" = "--dry-run" ]; then STEPS=5; PREC=fp32; DEV=cpu; fi
STAMP=$(date +%Y-%m-%d-%H%M)
WORK=$(mktemp -d)
OUTFILE=bench/results/gpu-dist-$STAMP.json
[ "${1:-}" = "--dry-run" ] && OUTFILE=$WORK/gpu-dist-$STAMP-dry-run.json  # a dry run is no result
mkdir -p bench/results
for config in smoke gpt2-small; do
  if [ $config = smoke ]; then CFG=configs/smoke.yaml; MODEL=(); else CFG=configs/gpt2-small-lora.yaml; MODEL=(model.weights=random); fi
  for strategy in ddp zero2; do
    if [ $strategy = zero2 ]; then DIST=(dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.json); else DIST=(dist.strategy=ddp); fi
    echo "== $config under $strategy, $STEPS steps, $PREC, $DEV"
    $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m lora_dist train --config $CFG "${MODEL[@]}" \
      "${DIST[@]}" output_dir="$WORK/$config-$strategy" train.max_steps=$STEPS train.epochs=100 train.precision=$PREC \
      train.device=$DEV train.eval_every=100000 data.download=false tracking.wandb.mode=disabled \
      >"$WORK/$config-$strategy.log" 2>&1 || { tail -30 "$WORK/$config-$strategy.log"; exit 1; }
  done
done
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
[ -n "${OUT:-}" ] && cp "$OUTFILE" "$OUT/" || true
