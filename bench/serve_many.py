"""Many adapters on demand: `lora-dist serve --adapters-dir` with 1,000 adapters, under a Zipf load.

    python bench/serve_many.py --model gpt2-small                    # 1,000 rank-8 adapters, --max-loaded 64
    python bench/serve_many.py --model tiny --n 200 --requests 200   # quick (fewer: says so)

Writes N random rank-8 adapters of one random base in a sweep's layout (DIR/adapters/NAME/adapter/..., as
bench/fake_adapters.py writes them, but one description for all and only the tensors drawn per adapter; past
the first 128 each copies the files of one of those, as its own files; kept in --cache between runs), then
starts the service twice as a subprocess:
- on demand: --adapters-dir DIR --max-loaded M (default 64);
- preloaded: --adapters-dir DIR --max-loaded D, D the number of distinct adapters the load asks for, each
  read once before the clock starts (every request a hit: what preloading them all gives, without building
  1,000 gpt2-small adapters into one process, which the shared machine cannot hold).
Each gets the same bounded load: --requests single-message requests from --clients keep-alive clients, the
adapter of each drawn from a Zipf law (s = 1.1) over the N adapters (seeded: both runs see one sequence).
Reported: start to ready, requests/s, p50/p95/p99 latency by cache hit and miss (the X-Adapter-Cache header),
failures, the service's RSS (resident memory) at ready and at the end. Results:
bench/results/serve-many-<model>-<machine>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import results_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
FULL = 1000
DRAWN = 128  # adapters with tensors of their own; the others copy one of these (each its own files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(root: Path, n: int, model: str) -> Path:
    """`n` rank-8 adapters a0000... under root/adapters (made once; reused when already there)."""
    import torch

    from lora_dist import adapter as adapters
    from lora_dist.build import build_model
    from lora_dist.config import Config, DataConfig, LoRAConfig, ModelConfig, TrainConfig
    from lora_dist.lora import adapter_state_dict

    done = root / f".{n}-done"
    if done.exists():
        return root
    cfg = Config(
        model=ModelConfig(name=model, weights="random"),
        lora=LoRAConfig(rank=8, alpha=16.0, scaling="alpha/r", targets=("all",), head=True, train_head=True),
        data=DataConfig(padding="batch"),
        train=TrainConfig(seed=123),
    )
    with torch.device("meta"):
        structure, wrapped = build_model(replace(cfg, model=replace(cfg.model, weights="random")), 2)
        shapes = {k: v.shape for k, v in adapter_state_dict(structure).items()}
        ctx = structure.cfg.context_length
    spec = adapters.AdapterSpec.for_run(cfg, ("ham", "spam"), ctx, wrapped, adapters.base_of(cfg))
    t = time.perf_counter()
    for i in range(n):
        d = root / "adapters" / f"a{i:04d}"
        if (d / "adapter" / "adapter_config.json").exists():
            continue
        if i >= DRAWN:  # a copy of a drawn one's files (saving fsyncs each file: slow on a loaded disk)
            (d / "adapter").mkdir(parents=True, exist_ok=True)
            src = root / "adapters" / f"a{i % DRAWN:04d}" / "adapter"
            for f in ("adapter_model.safetensors", "adapter_config.json"):  # tensors first, as `save` does
                shutil.copyfile(src / f, d / "adapter" / f)
            continue
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {
            k: torch.randn(s, generator=g) * (0.02 if k.endswith(".lora.B") else 0.1 if "head" in k else 0.05)
            for k, s in shapes.items()
        }
        adapters.save(d, spec, tensors)
    done.touch()
    print(f"made {n} adapters in {time.perf_counter() - t:.0f} s under {root}", flush=True)
    return root


def rss_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now and at its peak, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    return out


def start(root: Path, max_loaded: int, a, log: Path) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    cmd = [sys.executable, "-m", "lora_dist", "serve", "--adapters-dir", str(root), "--max-loaded", str(max_loaded)]
    cmd += ["--port", str(port), "--max-wait-ms", str(a.max_wait_ms), "--threads", str(a.threads)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=log.open("w"))
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return proc, port, time.perf_counter() - t
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the service did not get ready in 10 minutes")


async def client(port: int, todo: list, texts: list[str], rows: list, fails: list[str], rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            name = todo.pop()
            body = json.dumps({"adapter": name, "texts": [rng.choice(texts)]}).encode()
            head = (
                f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            t = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status = (await reader.readline()).split(b" ")[1]
            length, cache = 0, "-"
            while (line := await reader.readline()) not in (b"\r\n", b""):
                low = line.lower()
                if low.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                elif low.startswith(b"x-adapter-cache:"):
                    cache = line.split(b":")[1].strip().decode()
            answer = await reader.readexactly(length)
            if status != b"200" or b'"results"' not in answer:
                fails.append(f"{status.decode()}: {answer[:200]!r}")
            else:
                rows.append((cache, time.perf_counter() - t))
    except (OSError, asyncio.IncompleteReadError, IndexError) as e:
        fails.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()


def percentiles(lat: list[float]) -> dict:
    if not lat:
        return {"n": 0}
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"n": len(lat), "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98]}


def drive(port: int, names: list[str], clients: int, texts: list[str]) -> dict:
    rows: list = []
    fails: list[str] = []
    todo = list(reversed(names))

    async def run():
        await asyncio.gather(*(client(port, todo, texts, rows, fails, random.Random(i)) for i in range(clients)))

    t = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t
    return {
        "requests": len(rows),
        "failures": len(fails),
        "failure_examples": fails[:3],
        "seconds": wall,
        "requests_per_s": len(rows) / wall,
        "all": percentiles([x for _, x in rows]),
        "hit": percentiles([x for c, x in rows if c == "hit"]),
        "miss": percentiles([x for c, x in rows if c == "miss"]),
    }


def zipf(n: int, count: int, s: float, seed: int) -> list[int]:
    """`count` draws of 0..n-1 with P(k) proportional to 1 / (k + 1)^s, the ranks shuffled onto the adapters."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    return [order[k] for k in rng.choices(range(n), weights=weights, k=count)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--n", type=int, default=1000, help="adapters on disk (default 1000)")
    p.add_argument("--max-loaded", type=int, default=64)
    p.add_argument("--requests", type=int, default=FULL, help=f"requests per run (default {FULL})")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="the service's torch threads")
    p.add_argument("--cache", default=None, help="where the adapters are kept (default: $TMPDIR/serve-many-MODEL-N)")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    full = a.requests >= FULL and a.n >= 1000
    if not full:
        print(f"note: {a.n} adapters, {a.requests} requests: a quick run, not the benchmark", file=sys.stderr)
    import tempfile

    from lora_dist.data import read_sms, shipped_sms_path

    texts = read_sms(shipped_sms_path())["text"].tolist()
    root = Path(a.cache or Path(tempfile.gettempdir()) / f"serve-many-{a.model}-{a.n}")
    make_adapters(root, a.n, a.model)
    draws = zipf(a.n, a.requests, a.zipf, seed=0)
    names = [f"adapters/a{i:04d}" for i in draws]
    distinct = sorted(set(names))
    results = {}
    for mode, max_loaded in (("on_demand", a.max_loaded), ("preloaded", len(distinct))):
        proc, port, ready_s = start(root, max_loaded, a, root / f"{mode}.log")
        try:
            at_ready = rss_mb(proc.pid)
            warm = drive(port, [names[0]] * 4, 1, texts)  # first-request costs of the process
            if mode == "preloaded":
                warm = drive(port, distinct, a.clients, texts)  # each read once: every timed request a hit
            r = drive(port, names, a.clients, texts)
            r.update(
                max_loaded=max_loaded,
                start_to_ready_s=ready_s,
                memory_at_ready=at_ready,
                memory_at_end=rss_mb(proc.pid),
                warm_up_failures=warm["failures"],
            )
            results[mode] = r
            print(f"{mode:10s} {json.dumps(r)}", flush=True)
        finally:
            proc.terminate()
            proc.wait(120)
    od, pre = results["on_demand"], results["preloaded"]

    def cell(x: dict) -> str:
        return f"{x['p50_ms']:.0f}/{x['p95_ms']:.0f}/{x['p99_ms']:.0f} (n={x['n']})" if x["n"] else "-"

    lines = [
        f"{a.n} rank-8 adapters of {a.model} (random base) on disk; {a.requests} one-message requests, "
        f"{a.clients} clients, adapters Zipf(s={a.zipf}): {len(distinct)} distinct.",
        "",
        "| service | start to ready s | req/s | hit p50/p95/p99 ms | miss p50/p95/p99 ms | failures | RSS at ready / end MiB |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    for label, x in (
        (f"--max-loaded {od['max_loaded']} (on demand)", od),
        (f"--max-loaded {pre['max_loaded']} (all requested preloaded)", pre),
    ):
        lines.append(
            f"| {label} | {x['start_to_ready_s']:.1f} | {x['requests_per_s']:.1f} | {cell(x['hit'])} | "
            f"{cell(x['miss'])} | {x['failures']} | {x['memory_at_ready']['rss_mb']:.0f} / "
            f"{x['memory_at_end']['rss_mb']:.0f} |"
        )
    ratio = od["requests_per_s"] / pre["requests_per_s"]
    lines.append("")
    lines.append(f"on demand / preloaded requests/s: {ratio:.2f}x")
    if od["hit"]["n"] and od["miss"]["n"]:
        lines.append(f"a miss over a hit at p50: {od['miss']['p50_ms'] - od['hit']['p50_ms']:.0f} ms")
    table = "\n".join(lines)
    print(table)
    fields = {
        "model": a.model,
        "adapters": a.n,
        "requests": a.requests,
        "clients": a.clients,
        "zipf_s": a.zipf,
        "distinct_adapters": len(distinct),
        "full_run": full,
        "threads": a.threads,
        "note": "measured on a shared, loaded 2-core machine",
        "results": results,
        "table": table,
    }
    path = results_file.write(a.out, f"serve-many-{a.model}", fields, suffix="" if full else "-quick")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    path.with_suffix(".md").write_text(
        f"# serve --adapters-dir ({path.stem})\n\n`python {' '.join(sys.argv)}`\n\n{table}\n\n"
        f"Measured on a shared, loaded {results_file.machine()} machine (load average {load} at the end).\n"
    )


if __name__ == "__main__":
    main()
