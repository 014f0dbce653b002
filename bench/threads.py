"""Torch threads on a CPU: the smoke config and the README's smoke sweep with torch's default threads, 1, 2 and
lora-dist's default (`device.cpu_threads`: torch's count capped by the cores the load average leaves free).

    .venv/bin/python bench/threads.py                                  # both workloads, 2 rounds, interleaved
    .venv/bin/python bench/threads.py --workloads smoke --rounds 3 --modes torch,1,auto

Each run is `lora-dist train` (or `sweep`) in a fresh process, shortened with train.max_steps; the figure is
training examples/s (results.json, or the sweep's last metrics record: every adapter's examples), and the
process's wall time. The load average before and after each run is recorded beside it: on a machine shared
with other work the figures say how a setting behaves under that load, not what the machine can do.
Writes bench/results/threads-<date>.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results_file import write  # noqa: E402

WORKLOADS = {
    "smoke": ("train", "configs/smoke.yaml"),
    "sweep": ("sweep", "configs/sweep/smoke.yaml"),
}
# mode -> environment: torch's own default, a fixed count, or lora-dist's default (nothing set)
MODES = {
    "torch": {"LORA_DIST_THREADS": "torch"},
    "1": {"OMP_NUM_THREADS": "1"},
    "2": {"OMP_NUM_THREADS": "2"},
    "auto": {},
}


def run_once(workload: str, mode: str, steps: int, timeout: float) -> dict:
    command, config = WORKLOADS[workload]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LORA_DIST_THREADS", "MKL_NUM_THREADS")}
    env |= MODES[mode] | {"WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        args = [sys.executable, "-m", "lora_dist", command, "--config", config, f"output_dir={out}"]
        args += [f"train.max_steps={steps}", "tracking.wandb.mode=disabled"]
        load = os.getloadavg()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"workload": workload, "mode": mode, "timed_out_s": timeout, "load_before": load}
        wall = time.perf_counter() - t0
        record = {"workload": workload, "mode": mode, "wall_s": round(wall, 2), "load_before": load}
        record["load_after"] = os.getloadavg()
        if proc.returncode != 0:
            record["error"] = proc.stderr[-500:]
            return record
        first = proc.stdout.splitlines()[0:3]
        record["threads_line"] = next((x for x in first if " thread" in x), "")[:200]
        if command == "train":
            r = json.loads((out / "results.json").read_text())
            record["examples_per_s"] = round(r["examples_per_second"], 2)
            record["train_s"] = round(r["train_seconds"], 2)
        else:
            steps_done = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            rate = [x["examples_per_s"] for x in steps_done if "examples_per_s" in x]
            record["examples_per_s"] = round(rate[-1], 2)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="smoke,sweep")
    p.add_argument("--modes", default="torch,1,2,auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke-steps", type=int, default=30)
    p.add_argument("--sweep-steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory (default: bench/results)")
    p.add_argument("--suffix", default="", help="added to the file's name, e.g. -idle")
    p.add_argument("--note", default="", help="what the machine was doing (e.g. 'shared, loaded by 6 others')")
    a = p.parse_args()
    runs = []
    for r in range(a.rounds):
        for workload in a.workloads.split(","):
            modes = a.modes.split(",")
            for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate the order: drifting load hits all alike
                steps = a.smoke_steps if workload == "smoke" else a.sweep_steps
                rec = run_once(workload, mode, steps, a.timeout) | {"round": r}
                print(json.dumps(rec), flush=True)
                runs.append(rec)
    summary: dict = {}
    for rec in runs:
        if "examples_per_s" in rec:
            summary.setdefault(rec["workload"], {}).setdefault(rec["mode"], []).append(rec["examples_per_s"])
    result = {
        "cores": len(os.sched_getaffinity(0)),
        "note": a.note,
        "steps": {"smoke": a.smoke_steps, "sweep": a.sweep_steps},
        "examples_per_s": summary,
        "runs": runs,
    }
    write(a.out, "threads", result, a.suffix)


if __name__ == "__main__":
    main()
