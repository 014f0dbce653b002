"""N adapters in one sweep against the same N trained one after another: examples/s summed over the adapters.

    python bench/sweep_throughput.py                                     # tiny (the smoke config), N = 1, 4, 16, CPU
    python bench/sweep_throughput.py --model gpt2-small --counts 1,4      # gpt2-small, random weights
    python bench/sweep_throughput.py --device cuda --model gpt2-small --counts 1,4,16 --precision bf16   # a GPU

Each run is `lora-dist sweep` or `lora-dist train` as a user runs it, in its own process: the smoke config (or
--model with random weights), batch --batch, --steps optimizer steps, no evaluation after the first step. The N
adapters differ in their learning rate only (same shapes, so the comparison is fair). Times are the runs' own
step times (metrics.jsonl `step_seconds`, evaluation excluded) after --warmup steps: the sweep's joint steps,
and each alone run's steps summed over the N runs. For each N the sweep and the N alone runs take turns
(which goes first alternates), so that drift in a shared machine's load hits both alike. Also: each adapter's
share of the sweep's step (step time / N) against an alone step, and peak memory (RSS on the CPU, the
largest allocated on a GPU). Results go to bench/results/sweep-throughput-<model>-<machine>-<date>.json.
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
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def run(args: list[str], threads: int) -> int:
    """`python -m lora_dist ARGS` in its own process; its peak RSS in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lora_dist", *args], cwd=ROOT, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS, not the largest of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"lora-dist {' '.join(args[:3])} failed:\n{log.read()[-3000:]}")
    return int(usage.ru_maxrss / 1024)


def step_times(metrics: Path, warmup: int) -> tuple[list[float], float | None]:
    """(`step_seconds` of the steps after `warmup`, the largest gpu_mem_gb) of a metrics.jsonl."""
    times, mem = {}, None
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "step_seconds" in r and r["step"] > warmup:
            times[r["step"]] = r["step_seconds"]  # a step logged twice (a resume) counts once
        if "gpu_mem_gb" in r:
            mem = max(mem or 0.0, r["gpu_mem_gb"])
    return [times[k] for k in sorted(times)], mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (the smoke config) or a GPT-2 size, random weights")
    p.add_argument("--counts", default="1,4,16", help="adapter counts N")
    p.add_argument("--batch", type=int, default=8, help="each adapter's batch")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each adapter")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the times")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS of each run")
    p.add_argument(
        "--messages",
        type=int,
        default=0,
        help="train on this many SMS messages (default: all); fewer make the final evaluations, which are not timed, shorter",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    common = [
        f"train.max_steps={args.steps}",
        "train.epochs=1",
        f"train.batch_size={args.batch}",
        "train.eval_every=1000000",
        "train.eval_batches=1",
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        "tracking.wandb.mode=disabled",
        "tracking.log_every=1000000",
        "overwrite=true",
    ]
    if args.model != "tiny":
        common += [f"model.name={args.model}", "model.weights=random", "lora.train_head=false"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.messages:
            common.append(f"data.source={some_messages(Path(tmp), args.messages)}")
        for turn, n in enumerate(counts):
            lrs = [round(1e-3 * (1 + i / n), 8) for i in range(n)]  # N adapters of the same shapes
            order = (measure_sweep, measure_alone) if turn % 2 == 0 else (measure_alone, measure_sweep)
            got = {fn.__name__: fn(Path(tmp), lrs, common, args) for fn in order}
            rows.append(row(n, got["measure_sweep"], got["measure_alone"], args))
    print_table(rows)
    fields = {
        "model": args.model,
        "device": args.device,
        "precision": args.precision,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "messages": args.messages or "all",
        "results": rows,
    }
    results_file.write(args.out, f"sweep-throughput-{args.model}", fields)


def some_messages(tmp: Path, n: int) -> Path:
    """A CSV of `n` SMS messages, half spam, half ham (the shipped copy)."""
    sys.path.insert(0, str(ROOT))
    from lora_dist.data import read_sms, shipped_sms_path

    path = tmp / "messages.csv"
    read_sms(shipped_sms_path()).groupby("label").head(n // 2)[["text", "label"]].to_csv(path, index=False)
    return path


def measure_sweep(tmp: Path, lrs: list[float], common: list[str], args) -> dict:
    """One `lora-dist sweep` of the adapters (a grid over their learning rates)."""
    n = len(lrs)
    config, out = tmp / f"sweep-{n}.yaml", tmp / f"sweep-{n}"
    config.write_text(SMOKE.read_text() + "\n" + yaml.safe_dump({"sweep": {"grid": {"train.lr": lrs}}}))
    rss = run(["sweep", "--config", str(config), f"output_dir={out}", *common], args.threads)
    times, mem = step_times(out / "metrics.jsonl", args.warmup)
    return {
        "seconds": sum(times),
        "steps": len(times),
        "step_ms": 1000 * statistics.mean(times),
        "rss_mb": rss,
        "gpu_mem_gb": mem,
    }


def measure_alone(tmp: Path, lrs: list[float], common: list[str], args) -> dict:
    """`lora-dist train` of each adapter, one after another."""
    total, steps, step_ms, rss, mem = 0.0, 0, [], 0, None
    for i, lr in enumerate(lrs):
        out = tmp / f"alone-{len(lrs)}-{i}"
        rss = max(
            rss, run(["train", "--config", str(SMOKE), f"output_dir={out}", *common, f"train.lr={lr}"], args.threads)
        )
        times, m = step_times(out / "metrics.jsonl", args.warmup)
        total, steps = total + sum(times), steps + len(times)
        step_ms.append(1000 * statistics.mean(times))
        mem = m if m is not None and (mem is None or m > mem) else mem
    return {"seconds": total, "steps": steps, "step_ms": statistics.mean(step_ms), "rss_mb": rss, "gpu_mem_gb": mem}


def row(n: int, s: dict, a: dict, args) -> dict:
    examples = n * (args.steps - args.warmup) * args.batch
    r = {
        "adapters": n,
        "sweep_examples_per_s": examples / s["seconds"],
        "sequential_examples_per_s": examples / a["seconds"],
        "speedup": a["seconds"] / s["seconds"],
        "sweep_step_ms": s["step_ms"],
        "share_of_step_ms": s["step_ms"] / n,  # each adapter's share of the sweep's step
        "alone_step_ms": a["step_ms"],
        "sweep": s,
        "sequential": a,
    }
    print(
        f"N={n}: sweep {r['sweep_examples_per_s']:.1f} examples/s, one after another "
        f"{r['sequential_examples_per_s']:.1f} ({r['speedup']:.2f}x); step {s['step_ms']:.1f} ms "
        f"({r['share_of_step_ms']:.1f} ms an adapter) against {a['step_ms']:.1f} ms alone",
        flush=True,
    )
    return r


def print_table(rows: list[dict]) -> None:
    print()
    print(
        "| adapters | sweep examples/s | one after another | speed-up | sweep step | an adapter's share "
        "| alone step | peak memory, sweep / alone |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, a = r["sweep"], r["sequential"]
        gpu = s["gpu_mem_gb"] is not None and a["gpu_mem_gb"] is not None
        mem = f"{s['gpu_mem_gb']:.2f} / {a['gpu_mem_gb']:.2f} GiB" if gpu else f"{s['rss_mb']} / {a['rss_mb']} MiB RSS"
        print(
            f"| {r['adapters']} | {r['sweep_examples_per_s']:.1f} | {r['sequential_examples_per_s']:.1f} "
            f"| {r['speedup']:.2f}x | {r['sweep_step_ms']:.1f} ms | {r['share_of_step_ms']:.1f} ms "
            f"| {r['alone_step_ms']:.1f} ms | {mem} |"
        )


if __name__ == "__main__":
    main()
