"""A 16-adapter grid (lora.rank x train.lr) swept with and without `sweep.prune` (successive halving).

    python bench/prune_sweep.py                      # tiny (the smoke config) over 400 SMS messages, CPU
    python bench/prune_sweep.py --messages 1494 --epochs 1 --min-steps 10

Both sweeps are `lora-dist sweep` as a user runs it, in their own process, the same grid, data and steps; the
pruned one adds sweep.prune {min_steps, eta, metric: val_loss}. Measured: the examples trained over all
adapters (each adapter's results.json examples_seen), the wall time of each sweep, and the best adapter of
each (sweep.json's first: the best validation accuracy of the adapters that ran to the end, then validation
loss). Results go to bench/results/prune-sweep-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_file
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
sys.path.insert(0, str(ROOT))


def sweep(config: Path, out: Path) -> tuple[float, list[dict]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lora_dist", "sweep", "--config", str(config), f"output_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the sweep failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "sweep.json").read_text())["adapters"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=400, help="balanced SMS messages (half spam)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--min-steps", type=int, default=6)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from lora_dist.data import read_sms, shipped_sms_path

    work = Path(tempfile.mkdtemp(prefix="prune-"))
    data = work / "data.csv"
    read_sms(shipped_sms_path()).groupby("label").head(a.messages // 2)[["text", "label"]].to_csv(data, index=False)
    base = yaml.safe_load(SMOKE.read_text())
    base["data"]["source"] = str(data)
    base["train"] |= {"epochs": a.epochs, "eval_every": 10**6}
    grid = {"lora.rank": [2, 4, 8, 16], "train.lr": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}
    prune = {"method": "successive_halving", "min_steps": a.min_steps, "eta": a.eta, "metric": "val_loss"}
    configs = {}
    for name, extra in (("unpruned", {}), ("pruned", {"prune": prune})):
        configs[name] = work / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**base, "sweep": {"grid": grid, **extra}}))
    measured = {}
    for name in ("unpruned", "pruned"):
        out = work / name
        wall, entries = sweep(configs[name], out)
        examples = sum(
            json.loads((out / "adapters" / e["name"] / "results.json").read_text())["examples_seen"] for e in entries
        )
        measured[name] = {
            "wall_seconds": wall,
            "examples_trained": examples,
            "best": entries[0]["name"],
            "adapters": [
                {
                    k: e.get(k)
                    for k in ("name", "status", "steps", "val_accuracy", "val_loss", "test_accuracy", "pruned")
                }
                for e in entries
            ],
        }
        print(name, json.dumps({k: v for k, v in measured[name].items() if k != "adapters"}), flush=True)
    u, p = measured["unpruned"], measured["pruned"]
    order = [e["name"] for e in u["adapters"]]
    results_file.write(
        a.out,
        "prune-sweep",
        {
            "model": "tiny (random weights)",
            "messages": a.messages,
            "epochs": a.epochs,
            "grid": grid,
            "prune": prune,
            "compute_share": p["examples_trained"] / u["examples_trained"],
            "wall_share": p["wall_seconds"] / u["wall_seconds"],
            "same_best": p["best"] == u["best"],
            "pruned_best_rank_in_unpruned": order.index(p["best"]) + 1,
            "note": "measured on a shared, loaded 2-core machine (wall times are noisy); one run of each",
            **measured,
        },
    )


if __name__ == "__main__":
    main()
