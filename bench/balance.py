"""data.balance on the unbalanced SMS data (13% spam): weight vs undersample vs none, on one test split.

    python bench/balance.py                                   # tiny (the smoke config), 3 seeds
    python bench/balance.py --model gpt2-small --seeds 1 --steps 60   # gpt2-small, random weights (slow on a CPU)

The SMS data is split once (seed 123) into 70% for training and 30% for testing. Every run trains on --pool
messages drawn from the 70% at its spam share (`data.source` = that file, cut by the run into 85% train, 10%
validation and a 5% test split this benchmark does not use) with `data.balance` = weight, undersample or none, for
--steps optimizer steps, and is then scored by `lora-dist eval --data` on the same 30% (1,673 messages, 13% spam):
macro F1 and spam recall. A random base (model.weights=random) is fine for the comparison: what is compared is how
the modes treat the rare class.
Results go to bench/results/balance-<model>-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import results_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
sys.path.insert(0, str(ROOT))

MODES = ("weight", "undersample", "none")


def lora_dist(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "lora_dist", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lora-dist {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pool", type=int, default=1000, help="training messages drawn from the 70%% (stratified)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from lora_dist.data import read_sms, shipped_sms_path, split

    frame = read_sms(shipped_sms_path())
    parts = split(frame, 0.7, 0.01, seed=123)  # the 1% validation part joins training below
    work = Path(tempfile.mkdtemp(prefix="balance-"))
    train = work / "train.csv"
    test = work / "test.csv"
    import pandas as pd

    pool = pd.concat([parts["train"], parts["validation"]])
    if a.pool < len(pool):  # the same share of spam, fewer messages: the runs' own evaluations stay short
        pool = pool.groupby("label", group_keys=False).sample(frac=a.pool / len(pool), random_state=123)
    pool[["text", "label"]].to_csv(train, index=False)
    parts["test"][["text", "label"]].to_csv(test, index=False)
    test_spam = float((parts["test"]["label"] == "spam").mean())
    model = [] if a.model == "tiny" else [f"model.name={a.model}", "model.weights=random", "lora.rank=8"]
    rows = []
    for seed in range(a.seeds):
        for mode in MODES:  # interleaved: the modes take turns, seed by seed
            out = work / f"{mode}-{seed}"
            lora_dist(
                "train",
                "--config",
                str(SMOKE),
                f"output_dir={out}",
                f"data.source={train}",
                "data.train_frac=0.85",
                "data.val_frac=0.1",
                f"data.balance={mode}",
                f"train.seed={123 + seed}",
                f"train.max_steps={a.steps}",
                "train.eval_every=1000000",
                *model,
            )
            got = json.loads(
                lora_dist(
                    "eval", str(out), "--data", str(test), "--device", "cpu", "--json", "--batch-size", "64"
                ).stdout
            )
            r = json.loads((out / "results.json").read_text())
            rows.append(
                {
                    "mode": mode,
                    "seed": 123 + seed,
                    "train_messages": sum(r["confusion"]["train"][i][j] for i in range(2) for j in range(2)),
                    "macro_f1": got["macro"]["f1"],
                    "spam_recall": got["per_class"]["spam"]["recall"],
                    "spam_precision": got["per_class"]["spam"]["precision"],
                    "accuracy": got["accuracy"],
                    "train_seconds": r["train_seconds"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        m: {
            k: {
                "mean": statistics.mean(x[k] for x in rows if x["mode"] == m),
                "min": min(x[k] for x in rows if x["mode"] == m),
                "max": max(x[k] for x in rows if x["mode"] == m),
            }
            for k in ("macro_f1", "spam_recall", "spam_precision", "accuracy")
        }
        for m in MODES
    }
    results_file.write(
        a.out,
        f"balance-{a.model}",
        {
            "model": a.model,
            "weights": "random",
            "steps": a.steps,
            "batch_size": 8,
            "test_messages": len(parts["test"]),
            "train_pool": len(pool),
            "train_pool_spam_share": float((pool["label"] == "spam").mean()),
            "test_spam_share": test_spam,
            "note": "measured on a shared, loaded 2-core machine; random base weights; one test split for every mode",
            "summary": summary,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
