"""Run rows of the book's chapter-6 experiment table and put our figures beside the book's.

    .venv/bin/python bench/book_table.py --rows 1,10,11
    .venv/bin/python bench/book_table.py --rows 10 --seeds 123,124,125
    .venv/bin/python bench/book_table.py --rows 1,5 --nproc 8 train.precision=auto

Each row is `configs/book/row-NN-*.yaml`, trained with the real `lora-dist train` (under torchrun with
--nproc > 1); the book's figures are read from the config's own header line. Writes a markdown table to
stdout and to bench/results/book-table-<machine>-<date>[-tag].md, with the raw figures in a .json beside
it (bench/results/ is tracked: pass --results-dir elsewhere for scratch runs). Rows other than 10 need the
pretrained weights from the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "configs" / "book"
FIGURES = re.compile(r"# The book: ([\d.]+) / ([\d.]+) / ([\d.]+) % .*?, ([\d.]+) min")


def book_rows() -> dict[int, dict]:
    """row number -> {"config", "what", "book": [train, val, test], "book_minutes"} from configs/book/."""
    rows = {}
    for path in sorted(BOOK.glob("row-*.yaml")):
        text = path.read_text()
        m = FIGURES.search(text)
        if not m:
            raise SystemExit(f"{path} lacks its '# The book: ...' line")
        number = int(path.name.split("-")[1])
        what = " ".join(line[2:] for line in text.splitlines() if line.startswith("# ") and "row" in text)
        what = re.sub(r"^.*?row \d+: ", "", what.split("# The book:")[0]).split(". The book:")[0].strip()
        rows[number] = {
            "config": str(path.relative_to(ROOT)),
            "what": what.rstrip("."),
            "book": [float(m.group(i)) for i in (1, 2, 3)],
            "book_minutes": float(m.group(4)),
        }
    return rows


def run_row(config: str, out_dir: Path, seed: int, nproc: int, overrides: list[str]) -> dict:
    python = sys.executable
    launcher = (
        [
            python,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
        ]
        if nproc > 1
        else [python]
    )
    cmd = [
        *launcher,
        "-m",
        "lora_dist",
        "train",
        "--config",
        config,
        f"output_dir={out_dir}",
        "overwrite=true",
        f"train.seed={seed}",
        "data.seed=123",
        "tracking.wandb.mode=disabled",
        *overrides,
    ]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"seed": seed, "error": tail, "wall_seconds": wall}
    r = json.loads((out_dir / "results.json").read_text())
    return {
        "seed": seed,
        "wall_seconds": wall,
        "train_seconds": r["train_seconds"],
        "acc": [r["train_accuracy"] * 100, r["val_accuracy"] * 100, r["test_accuracy"] * 100],
        "trainable_params": r["trainable_params"],
        "world_size": r["world_size"],
    }


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: dict[int, dict], runs: dict[int, list[dict]]) -> str:
    lines = [
        "| row | setting | book: train / val / test | ours: train / val / test | test, ours − book | time, ours | seeds |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for n, got in runs.items():
        row = rows[n]
        ok = [g for g in got if "acc" in g]
        book = " / ".join(f"{x:.2f}" for x in row["book"])
        if not ok:
            lines.append(f"| {n} | {row['what']} | {book} | failed: {got[0]['error']} | | | |")
            continue
        ours = " / ".join(fmt([g["acc"][i] for g in ok]) for i in range(3))
        delta = statistics.mean(g["acc"][2] for g in ok) - row["book"][2]
        minutes = statistics.mean(g["wall_seconds"] for g in ok) / 60
        lines.append(
            f"| {n} | {row['what']} | {book} | {ours} | {delta:+.2f} | {minutes:.1f} min | "
            f"{', '.join(str(g['seed']) for g in ok)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", required=True, help="comma-separated row numbers, e.g. 1,10,11 (or 'all')")
    p.add_argument("--seeds", default="123", help="comma-separated train.seed values (default: 123, the book's)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun); default 1")
    p.add_argument("--runs-dir", default="runs/book-table", help="where the runs go (default: runs/book-table)")
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"), help="where the table goes")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.precision=auto")
    args = p.parse_args(argv)
    rows = book_rows()
    wanted = sorted(rows) if args.rows == "all" else [int(x) for x in args.rows.split(",") if x.strip()]
    unknown = [n for n in wanted if n not in rows]
    if unknown:
        p.error(f"no config for row(s) {unknown}; rows are {sorted(rows)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {
        n: [
            run_row(rows[n]["config"], Path(args.runs_dir) / f"row-{n:02d}-seed-{s}", s, args.nproc, args.overrides)
            for s in seeds
        ]
        for n in wanted
    }
    text = table(rows, runs)
    print(text)
    machine = os.uname().nodename.split(".")[0]
    stem = f"book-table-{machine}-{datetime.date.today().isoformat()}" + (f"-{args.tag}" if args.tag else "")
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "rows": {n: {**rows[n], "runs": runs[n]} for n in wanted},
                "overrides": args.overrides,
                "nproc": args.nproc,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written: {out / stem}.md and .json", file=sys.stderr)
    return 0 if all("acc" in g for got in runs.values() for g in got) else 1


if __name__ == "__main__":
    raise SystemExit(main())
