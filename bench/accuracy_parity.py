"""Accuracy parity: do the speed defaults reach the book mode's test accuracy? Smoke config, several seeds.

    python bench/accuracy_parity.py                                  # seeds 123 124 125; defaults, defaults in fp32, book mode
    python bench/accuracy_parity.py --seeds 1 2 3 4 5 6 7 8 9 10 --modes defaults book --tag 10-seeds
    python bench/accuracy_parity.py --config configs/gpt2-small-lora.yaml --extra model.weights=random

Each run is `lora-dist train` as a user runs it (a subprocess, the full 5,574-message pipeline, final
evaluation on the whole test split). `train.seed` varies (adapter init, shuffling); the data split stays the
book's. "Within noise" means the means differ by less than twice the standard error of their difference.
Results go to bench/results/accuracy-parity-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MODES = {
    "defaults": [],  # DataConfig's padding and bucket and TrainConfig's precision, whatever they are
    "no-bucket": ["data.padding=batch", "data.bucket=false"],
    "defaults-fp32": ["train.precision=fp32"],
    "book": ["data.padding=longest", "data.bucket=false", "train.precision=fp32"],
}


def train(config: str, mode: str, seed: int, extra: list[str], out: Path) -> dict:
    # The smoke config pins data.padding and fp32; "defaults" means the dataclasses' own values, so set them.
    from lora_dist.config import DataConfig, TrainConfig

    d, t = DataConfig(), TrainConfig()
    base = [f"data.padding={d.padding}", f"data.bucket={str(d.bucket).lower()}", f"train.precision={t.precision}"]
    overrides = (
        base
        + MODES[mode]
        + [
            f"train.seed={seed}",
            f"output_dir={out}",
            "overwrite=true",
            "data.download=false",
            "tracking.wandb.mode=disabled",
        ]
        + extra
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lora_dist", "train", "--config", config, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} seed {seed} failed:\n{proc.stderr[-3000:]}")
    r = json.loads((out / "results.json").read_text())
    return {
        "test_accuracy": r["test_accuracy"],
        "val_accuracy": r["val_accuracy"],
        "train_accuracy": r["train_accuracy"],
        "test_loss": r["test_loss"],
        "train_seconds": r["train_seconds"],
        "wall_s": time.perf_counter() - start,
        "examples_per_second": r["examples_per_second"],
        "overrides": overrides,
    }


def summary(accs: list[float]) -> dict:
    n = len(accs)
    sd = statistics.stdev(accs) if n > 1 else 0.0
    return {"mean": statistics.mean(accs), "stdev": sd, "n": n, "values": accs}


def compare(x: dict, y: dict) -> dict:
    diff = x["mean"] - y["mean"]
    se = math.sqrt(x["stdev"] ** 2 / x["n"] + y["stdev"] ** 2 / y["n"])
    # a floor for identical-looking seeds: one test message out of 300 is 0.33 points
    noise = max(2 * se, 1 / 300)
    return {"difference": diff, "two_standard_errors": 2 * se, "within_noise": abs(diff) <= noise}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[123, 124, 125])
    ap.add_argument("--modes", nargs="+", default=["defaults", "defaults-fp32", "book"], choices=list(MODES))
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="appended to the results file name")
    args = ap.parse_args()
    from train_throughput import machine, slug

    started = datetime.datetime.now()
    runs: dict[str, dict[int, dict]] = {m: {} for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # modes alternate inside each seed, so load drift hits them alike
            for mode in args.modes:
                r = train(args.config, mode, seed, args.extra, Path(tmp) / f"{mode}-{seed}")
                runs[mode][seed] = r
                print(
                    f"{mode:>13} seed {seed}: test {r['test_accuracy'] * 100:.2f}%, val {r['val_accuracy'] * 100:.2f}%, "
                    f"{r['examples_per_second']:.1f} examples/s, {r['wall_s']:.0f}s",
                    flush=True,
                )
    stats = {m: summary([runs[m][s]["test_accuracy"] for s in args.seeds]) for m in args.modes}
    ref = "book" if "book" in stats else args.modes[-1]
    comparisons = {f"{m} vs {ref}": compare(stats[m], stats[ref]) for m in args.modes if m != ref}
    m = machine()
    doc = {
        "command": "python bench/accuracy_parity.py " + " ".join(sys.argv[1:]),
        "date": started.strftime("%Y-%m-%d %H:%M"),
        "config": args.config,
        "seeds": args.seeds,
        "extra": args.extra,
        "machine": m,
        "test_accuracy": stats,
        "comparisons": comparisons,
        "runs": {k: {str(s): v for s, v in r.items()} for k, r in runs.items()},
    }
    path = (
        Path(args.out)
        / f"accuracy-parity-{slug(m, 'cpu')}-{started.strftime('%Y-%m-%d')}{'-' + args.tag if args.tag else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n| mode | test accuracy, seeds {' '.join(map(str, args.seeds))} | mean ± sd |\n|---|---|---|")
    for mode, st in stats.items():
        print(
            f"| {mode} | {' / '.join(f'{v * 100:.2f}' for v in st['values'])} | {st['mean'] * 100:.2f} ± {st['stdev'] * 100:.2f} |"
        )
    for k, c in comparisons.items():
        print(
            f"{k}: difference {c['difference'] * 100:+.2f} points, 2 standard errors {c['two_standard_errors'] * 100:.2f}: "
            f"{'within noise' if c['within_noise'] else 'NOT within noise'}"
        )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
