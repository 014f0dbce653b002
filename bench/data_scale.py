"""Data at scale: preparing the token cache, and a run's start and memory once it is prepared, for message files
of 0.1 M, 1 M and 10 M messages made deterministically from the SMS messages (each with a few extra words).

    python bench/data_scale.py                                # 0.1 M and 1 M messages (+ the SMS data as the baseline)
    python bench/data_scale.py --sizes 10000000               # the 10 M file (about 10 minutes on 2 cores)
    python bench/data_scale.py --sizes 1000000 --only start --lora-dist /work/main/.venv/bin/lora-dist --tag before
    python bench/data_scale.py --table bench/results/data-scale-1000000.json

Each measurement runs in its own process (tiny model, configs/smoke.yaml, CPU):
- prepare: `lora-dist prepare` on a fresh cache: seconds, rows/s and tokens/s end to end (read, tokenize,
  write), peak RSS; and tiktoken's own multi-threaded `encode_ordinary_batch` on the same texts, already in memory.
- start: `lora-dist train` from process start to its 3rd step (`tracking.log_every=1`), the cache prepared:
  seconds and peak RSS per rank (VmHWM of each rank), 1 and 2 ranks (torchrun).
- classify: `lora-dist classify --file` on a text file of `--classify-lines` lines: messages/s and peak RSS.
Writes bench/results/data-scale-<size>[-tag].json and data-scale.md (all results files as one table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
WORDS = "ok then later today call me now free txt reply stop win cash prize home soon love work".split()


def make_file(path: Path, n: int) -> Path:
    """n messages: the SMS messages in turn, each with 1-4 extra words drawn by a seeded generator; label kept."""
    if path.is_file():
        return path
    import pandas as pd

    from lora_dist.data import read_sms, shipped_sms_path

    sms = read_sms(shipped_sms_path())
    texts, labels = sms["text"].tolist(), sms["label"].tolist()
    rng = random.Random(n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        for start in range(0, n, 100_000):
            idx = [i % len(texts) for i in range(start, min(n, start + 100_000))]
            extra = [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in idx]
            frame = pd.DataFrame(
                {
                    "text": [f"{texts[i]} {e}" for i, e in zip(idx, extra, strict=False)],
                    "label": [labels[i] for i in idx],
                }
            )
            frame.to_csv(f, index=False, header=start == 0)
    os.replace(tmp, path)
    return path


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out + [g for c in out for g in children(c)]


def hwm_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_to_step(cmd: list[str], metrics: Path, step: int, ranks: int, timeout: float) -> dict:
    """Start `cmd`; when metrics.jsonl has `step`, read each rank's peak RSS and stop it."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    metrics.unlink(missing_ok=True)  # a run kept by --work: its old lines would end the wait at once
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    peaks: dict[int, float] = {}
    reached = None
    try:
        while time.monotonic() - t0 < timeout and proc.poll() is None:
            pids = [proc.pid, *children(proc.pid)]
            for p in pids:
                peaks[p] = max(peaks.get(p, 0.0), hwm_mb(p))
            if metrics.is_file() and f'"step": {step},' in metrics.read_text():  # a line written in part is no error
                reached = time.monotonic() - t0
                for p in [proc.pid, *children(proc.pid)]:
                    peaks[p] = max(peaks.get(p, 0.0), hwm_mb(p))
                break
            time.sleep(0.05)
    finally:
        for p in [*children(proc.pid), proc.pid]:  # torchrun's workers sit in sessions of their own
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out = proc.communicate()[0].decode(errors="replace")
    if reached is None:
        raise RuntimeError(f"{' '.join(cmd)} did not reach step {step}:\n{out[-3000:]}")
    ranks_rss = sorted(peaks.values(), reverse=True)[:ranks] if ranks > 1 else [max(peaks.values())]
    return {"seconds": round(reached, 2), "peak_rss_mb_per_rank": round(max(ranks_rss), 1), "ranks": ranks}


def timed(cmd: list[str], timeout: float = 1800) -> tuple[float, float, str]:
    """(seconds, peak RSS MB of the process and its children, output)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out


TIKTOKEN = """
import json, sys, time, resource
import pandas as pd
from lora_dist.tokenizer import get_tokenizer
texts = []
for chunk in pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False, chunksize=200_000):
    texts += chunk["text"].tolist()
enc = get_tokenizer()
t0 = time.perf_counter()
n = 0
for s in range(0, len(texts), 1_000_000):  # a million at a time: 10 M messages' token lists would be ~10 GB
    n += sum(len(i) for i in enc.encode_ordinary_batch(texts[s : s + 1_000_000]))
s = time.perf_counter() - t0
print(json.dumps({"seconds": s, "rows_per_s": len(texts) / s, "tokens_per_s": n / s, "tokens": n}))
"""


def bench_size(args, size: int | None, work: Path) -> dict:
    lora = args.lora_dist
    src = "sms" if size is None else str(make_file(args.data_dir / f"messages-{size}.csv", size))
    cache = work / f"cache-{size}"
    common = [f"data.source={src}", f"data.cache_dir={cache}"] if "prepare" in args.only or "start" in args.only else []
    if args.tag == "before":
        common = [f"data.source={src}"]
    result: dict = {"messages": size or 5574, "source": src}
    if "prepare" in args.only and args.tag != "before":
        seconds, rss, out = timed([lora, "prepare", "--config", str(SMOKE), *common])
        manifest = json.loads(next(cache.glob("tokens-*/manifest.json")).read_text())
        ref = json.loads(
            timed([sys.executable, "-c", TIKTOKEN, src if size else str(_sms_csv(work))])[2].strip().splitlines()[-1]
        )
        result["prepare"] = {
            "process_seconds": round(seconds, 2),
            "build_seconds": manifest["seconds"],
            "rows_per_s": round(manifest["rows"] / manifest["seconds"]),
            "tokens_per_s": round(manifest["tokens"] / manifest["seconds"]),
            "tokens": manifest["tokens"],
            "peak_rss_mb": round(rss, 1),
            "tiktoken_encode_ordinary_batch_tokens_per_s": round(ref["tokens_per_s"]),
            "of_tiktoken": round(manifest["tokens"] / manifest["seconds"] / ref["tokens_per_s"], 3),
        }
        print(json.dumps({"prepare": result["prepare"]}), flush=True)
    if "start" in args.only:
        for ranks in args.ranks:
            out_dir = work / f"run-{size}-{ranks}"
            launch = (
                [lora]
                if ranks == 1
                else [
                    str(Path(lora).parent / "torchrun"),
                    f"--nproc_per_node={ranks}",
                    str(Path(lora).parent / "lora-dist"),
                ]
            )
            cmd = [
                *launch,
                "train",
                "--config",
                str(SMOKE),
                *common,
                "tracking.log_every=1",
                f"output_dir={out_dir}",
                "overwrite=true",
            ]
            cmd += args.extra
            r = run_to_step(cmd, out_dir / "metrics.jsonl", 3, ranks, args.timeout)
            result.setdefault("start", []).append(r)
            print(json.dumps({"start": r}), flush=True)
    if "classify" in args.only and size is not None:
        lines = args.data_dir / f"lines-{args.classify_lines}.txt"
        if not lines.is_file():
            import pandas as pd

            left = args.classify_lines
            with open(lines, "w", encoding="utf-8") as f:
                for chunk in pd.read_csv(src, dtype=str, keep_default_na=False, chunksize=200_000):
                    f.writelines(" ".join(t.split()) + "\n" for t in chunk["text"][:left])
                    left -= min(left, len(chunk))
                    if not left:
                        break
        adapter = _adapter(args, work)
        seconds, rss, _ = timed(
            [
                lora,
                "classify",
                "--adapter",
                str(adapter),
                "--file",
                str(lines),
                "--jsonl",
                "--out",
                str(work / "pred.jsonl"),
            ]
        )
        result["classify"] = {
            "lines": args.classify_lines,
            "seconds": round(seconds, 2),
            "messages_per_s": round(args.classify_lines / seconds),
            "peak_rss_mb": round(rss, 1),
        }
        print(json.dumps({"classify": result["classify"]}), flush=True)
    return result


def _sms_csv(work: Path) -> Path:
    from lora_dist.data import read_sms, shipped_sms_path

    path = work / "sms.csv"
    read_sms(shipped_sms_path())[["text", "label"]].to_csv(path, index=False)
    return path


def _adapter(args, work: Path) -> Path:
    run = work / "adapter-run"
    if not (run / "adapter").exists():  # 2 steps on 200 messages: the final evaluation is quick too
        small = work / "small.csv"
        from lora_dist.data import read_sms, shipped_sms_path

        read_sms(shipped_sms_path()).groupby("label").head(100)[["text", "label"]].to_csv(small, index=False)
        overrides = [
            "train.max_steps=2",
            f"output_dir={run}",
            f"data.source={small}",
            f"data.cache_dir={work / 'cache-small'}",
        ]
        timed([args.lora_dist, "train", "--config", str(SMOKE), *overrides])
    return run


def table(files: list[Path]) -> str:
    rows = [
        "| file | messages | prepare s | rows/s | tokens/s | of tiktoken | prepare peak MB "
        "| start→3rd step s (1 rank / 2) | peak MB per rank (1 / 2) | classify msg/s | classify peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in files:
        r = json.loads(f.read_text())
        for res in r["results"]:
            p, c = res.get("prepare", {}), res.get("classify", {})
            st = {s["ranks"]: s for s in res.get("start", [])}
            start = " / ".join(str(st[k]["seconds"]) for k in sorted(st)) or "-"
            mem = " / ".join(f"{st[k]['peak_rss_mb_per_rank']:.0f}" for k in sorted(st)) or "-"
            prep = (
                f"{p['process_seconds']} | {p['rows_per_s']:,} | {p['tokens_per_s']:,} | {p['of_tiktoken']} | {p['peak_rss_mb']}"
                if p
                else "- | - | - | - | -"
            )
            tail = f"{c.get('messages_per_s', '-')} | {c.get('peak_rss_mb', '-')}"
            rows.append(f"| {f.name} | {res['messages']:,} | {prep} | {start} | {mem} | {tail} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--no-sms", action="store_true", help="skip the SMS baseline")
    p.add_argument("--only", nargs="*", default=["prepare", "start", "classify"])
    p.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    p.add_argument("--classify-lines", type=int, default=1_000_000)
    p.add_argument("--lora-dist", default=str(Path(sys.executable).parent / "lora-dist"))
    p.add_argument("--tag", default="", help="'before': a lora-dist without the cache (no prepare, no data.cache_dir)")
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-dist-data-scale")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--work", type=Path, help="keep the caches and runs here (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--table", nargs="*", type=Path, help="print these results files as one table")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        help="an override for the training runs, e.g. data.balance=false",
    )
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    args.data_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    sizes: list[int | None] = ([] if args.no_sms else [None]) + list(args.sizes)
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        tmp = str(args.work or tmp)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for size in sizes:
            load0 = round(os.getloadavg()[0], 2)  # a loaded machine's figures cannot judge a speed target
            res = bench_size(args, size, Path(tmp))
            extra = "-" + "-".join(args.extra).replace("=", "_") if args.extra else ""
            name = f"data-scale-{size or 'sms'}{'-' + args.tag if args.tag else ''}{extra}.json"
            meta = {
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "load_average_1m": {"before": load0, "after": round(os.getloadavg()[0], 2)},
                "command": " ".join(sys.argv),
            }
            (args.out / name).write_text(
                json.dumps({**meta, "lora_dist": args.lora_dist, "extra": args.extra, "results": [res]}, indent=1)
            )
            written.append(args.out / name)
    files = sorted(args.out.glob("data-scale-*.json"))
    (args.out / "data-scale.md").write_text(table(files) + "\n")
    print(table(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
