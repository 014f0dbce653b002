"""Many adapters over one base: a mixed batch against a loop per adapter and a merged model per adapter.

    python bench/multi_adapter.py                                # gpt2-small, random weights, 1/4/16/64 adapters
    python bench/multi_adapter.py --model tiny --counts 1,4 --rows 32 --repeats 1 --out /tmp/x   # quick

Rows are real SMS messages (the copy shipped in the package), each given an adapter at random. For each
adapter count N, in its own process (so peak memory is its own):
  - mixed:  MultiAdapterClassifier, every batch mixing adapters (`predict`, batches of --batch);
  - loop:   the same model, each adapter's rows as their own batches;
  - merged: one Classifier per adapter with LoRA merged into its own copy of the base (measured up to
            --merged-max adapters; beyond that the memory is N x one merged model, marked "estimated").
The three take turns pass by pass, so that drift in a shared machine's load hits them alike.
  - one:    the same rows all through one adapter, the reference for "mixed": measured in the same process,
            in turns with the others, so that a shared machine's load hits both alike. Messages/s is the best of
--repeats passes. Results go to bench/results/multi-adapter-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import results_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def messages(n: int, seed: int = 0) -> list[str]:
    import random

    from lora_dist.data import read_sms, shipped_sms_path

    texts = read_sms(shipped_sms_path())["text"].tolist()
    return random.Random(seed).sample(texts, n)


def best_rates(contenders: dict, rows: int, repeats: int) -> dict[str, float]:
    """Messages/s of each contender, best of `repeats` passes; the passes take turns (a, b, c, a, b, c, ...)
    so that drift in the machine's load hits every contender alike."""
    best = {name: float("inf") for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # the order rotates: no seat is better
            fn = contenders[name]
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: rows / s for name, s in best.items()}


def measure(n: int, paths: dict, texts: list[str], which: list[str], a, queue) -> None:
    import torch

    from lora_dist import Classifier, MultiAdapterClassifier
    from lora_dist.multi_lora import adapter_bytes

    torch.set_num_threads(a.threads)
    before = rss_mb()
    m = MultiAdapterClassifier.from_pretrained(None, paths, device="cpu", precision="fp32")
    base_bytes = sum(p.numel() * p.element_size() for p in m.model.parameters())
    loaded = rss_mb()
    out = {
        "adapters": n,
        "rows": len(texts),
        "base_mb": base_bytes / 2**20,
        "stacked_adapters_mb": adapter_bytes(m.model) / 2**20,
        "rss_model_mb": loaded - before,
    }
    groups: dict[str, list[int]] = {}
    for i, w in enumerate(which):
        groups.setdefault(w, []).append(i)
    first = next(iter(paths))
    contenders = {
        "one": lambda: m.logits(texts, first, a.batch),  # the same rows, all through one adapter
        "mixed": lambda: m.logits(texts, which, a.batch),
        "loop": lambda: [m.logits([texts[i] for i in rows], name, a.batch) for name, rows in groups.items()],
    }
    m.logits(texts[: a.batch], which[: a.batch], a.batch)  # warm-up: weight packing, allocator
    if n <= a.merged_max:
        start = rss_mb()
        merged = {
            name: Classifier.from_pretrained(paths[name], device="cpu", precision="fp32", merge=True) for name in groups
        }
        out["merged_rss_mb"] = rss_mb() - start
        out["merged_models"] = len(merged)
        contenders["merged"] = lambda: [
            merged[name].logits([texts[i] for i in rows], a.batch) for name, rows in groups.items()
        ]
        for c in merged.values():
            c.logits(texts[:2], a.batch)
    for name, rate in best_rates(contenders, len(texts), a.repeats).items():
        out[f"{name}_msg_s"] = rate
    queue.put(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--counts", default="1,4,16,64")
    p.add_argument("--rows", type=int, default=64, help="messages per pass")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--merged-max", type=int, default=2, help="measure merged models up to this many adapters")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    import random

    from fake_adapters import make_set

    counts = [int(c) for c in a.counts.split(",")]
    texts = messages(a.rows)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_set(Path(tmp), max(counts), a.model, ranks=(a.rank,))
        ctx = mp.get_context("spawn")
        for n in counts:
            chosen = dict(list(paths.items())[:n])
            rng = random.Random(n)
            which = [rng.choice(list(chosen)) for _ in texts]
            q = ctx.Queue()
            proc = ctx.Process(target=measure, args=(n, chosen, texts, which, a, q))
            proc.start()
            r = q.get()
            proc.join()
            results.append(r)
            print(json.dumps(r), flush=True)
    one = True
    merged_one = next((r["merged_rss_mb"] for r in results if "merged_rss_mb" in r and r["adapters"] == 1), None)
    lines = [
        "| adapters | mixed msg/s | vs one adapter | loop msg/s | merged msg/s | base MB | stacked adapters MB | "
        "model RSS MB | merged models RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        merged_mb = (
            f"{r['merged_rss_mb']:.0f}"
            if "merged_rss_mb" in r
            else f"~{merged_one * r['adapters']:.0f} (estimated)"
            if merged_one
            else "-"
        )
        lines.append(
            f"| {r['adapters']} | {r['mixed_msg_s']:.1f} | {r['mixed_msg_s'] / r['one_msg_s']:.2f}x | {r['loop_msg_s']:.1f} | "
            f"{r.get('merged_msg_s', float('nan')):.1f} | {r['base_mb']:.0f} | {r['stacked_adapters_mb']:.1f} | "
            f"{r['rss_model_mb']:.0f} | {merged_mb} |"
            if one
            else str(r)
        )
    table = "\n".join(lines)
    print(table)
    fields = {"model": a.model, "rows": a.rows, "batch": a.batch, "rank": a.rank, "threads": a.threads}
    results_file.write(a.out, f"multi-adapter-{a.model}", {**fields, "results": results, "table": table})


if __name__ == "__main__":
    main()
