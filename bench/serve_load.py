"""Load on `lora-dist serve` over loopback: dynamic batching on against off (--max-batch 1).

    python bench/serve_load.py                                   # gpt2-small, 4 adapters, 1/8/32 clients, 2,000 requests each
    python bench/serve_load.py --model tiny --requests 40 --clients 1,4 --out /tmp/x    # quick (fewer requests: says so)

Makes random adapters on a random base (bench/fake_adapters.py), starts the service twice as a subprocess
(batching: --max-batch 32; none: --max-batch 1), and for each client count runs a bounded phase: that many
concurrent clients, each on its own keep-alive connection, send one real SMS message per request to an
adapter picked at random, until --requests requests are answered. It stops by itself. Per phase: requests/s,
p50/p95/p99 latency, failures, and the service's own batch-size histogram (from /metrics). Results go to
bench/results/serve-load-<model>-<machine>-<date>.json. Target: at 32 clients, batching >= 2x none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import results_file
from http_load import classify_once, serve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
FULL = 2000


def start(adapters: dict, max_batch: int, a, log: Path) -> tuple[subprocess.Popen, int]:
    spec = ",".join(f"{k}={v}" for k, v in adapters.items())
    args = ["--adapters", spec, "--max-batch", str(max_batch), "--max-wait-ms", str(a.max_wait_ms)]
    proc, port, _ = serve(args, a.threads, log, poll_s=0.3)
    return proc, port


def batch_histogram(port: int) -> dict[str, float]:
    """Cumulative counts of lora_dist_batch_size_bucket by upper bound."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lora_dist_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


async def client(
    port: int,
    names: list[str],
    texts: list[str],
    left: list[int],
    lat: list[float],
    fails: list[str],
    rng: random.Random,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter()
            status, _, answer = await classify_once(reader, writer, rng.choice(names), rng.choice(texts))
            lat.append(time.perf_counter() - t)
            if status != b"200" or b'"results"' not in answer:
                fails.append(f"{status.decode()}: {answer[:200]!r}")
    except (OSError, asyncio.IncompleteReadError, IndexError) as e:
        fails.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()


def phase(port: int, clients: int, requests: int, names: list[str], texts: list[str]) -> dict:
    before = batch_histogram(port)
    lat: list[float] = []
    fails: list[str] = []
    left = [requests]

    async def run():
        await asyncio.gather(*(client(port, names, texts, left, lat, fails, random.Random(i)) for i in range(clients)))

    t = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t
    after = batch_histogram(port)
    cumulative = {le: after[le] - before.get(le, 0) for le in after}
    hist, prev = {}, 0.0
    for le, c in cumulative.items():  # per bucket, not cumulative
        if c - prev:
            hist[le] = int(c - prev)
        prev = c
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {
        "clients": clients,
        "requests": len(lat),
        "failures": len(fails),
        "failure_examples": fails[:3],
        "seconds": wall,
        "requests_per_s": len(lat) / wall,
        "p50_ms": 1000 * q[49],
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
        "batch_size_histogram": hist,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument(
        "--requests", type=int, default=FULL, help=f"requests per phase (default {FULL}; fewer is a quick run)"
    )
    p.add_argument("--max-batch", type=int, default=32, help="the batching service's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="the service's torch threads")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    if a.requests < FULL:
        print(f"note: {a.requests} requests per phase, not {FULL}: a quick run, not the benchmark", file=sys.stderr)
    from fake_adapters import make_set

    from lora_dist.data import read_sms, shipped_sms_path

    texts = read_sms(shipped_sms_path())["text"].tolist()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_set(
            Path(tmp), a.adapters, a.model, ranks=(8, 16), targets=("all", "att"), labels=("spam", "support")
        )
        for mode, max_batch in (("batching", a.max_batch), ("none", 1)):
            proc, port = start(paths, max_batch, a, Path(tmp) / f"{mode}.log")
            try:
                phase(port, 4, 16, list(paths), texts)  # warm-up
                results[mode] = []
                for n in (int(c) for c in a.clients.split(",")):
                    r = phase(port, n, a.requests, list(paths), texts)
                    results[mode].append(r)
                    print(f"{mode:9s} {json.dumps(r)}", flush=True)
            finally:
                proc.terminate()
                proc.wait(120)
    lines = [
        "| clients | batching req/s | none req/s | speed-up | batching p50/p95/p99 ms | none p50/p95/p99 ms "
        "| failures | batch sizes (batching) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for on, off in zip(results["batching"], results["none"], strict=True):
        lines.append(
            f"| {on['clients']} | {on['requests_per_s']:.1f} | {off['requests_per_s']:.1f} | "
            f"{on['requests_per_s'] / off['requests_per_s']:.2f}x | {on['p50_ms']:.0f}/{on['p95_ms']:.0f}/{on['p99_ms']:.0f} | "
            f"{off['p50_ms']:.0f}/{off['p95_ms']:.0f}/{off['p99_ms']:.0f} | {on['failures'] + off['failures']} | "
            f"{' '.join(f'<={k}:{v}' for k, v in on['batch_size_histogram'].items())} |"
        )
    table = "\n".join(lines)
    print(table)
    full = a.requests >= FULL
    fields = {
        "model": a.model,
        "adapters": a.adapters,
        "requests_per_phase": a.requests,
        "full_run": full,
        "max_batch": a.max_batch,
        "max_wait_ms": a.max_wait_ms,
        "threads": a.threads,
    }
    results_file.write(
        a.out, f"serve-load-{a.model}", {**fields, "results": results, "table": table}, suffix="" if full else "-quick"
    )


if __name__ == "__main__":
    main()
