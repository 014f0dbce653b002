"""Many adapters on demand: `lora-dist serve --adapters-dir` with 1,000 adapters, under a Zipf load.

    python bench/serve_many.py --model gpt2-small                    # 1,000 rank-8 adapters, --max-loaded 64
    python bench/serve_many.py --model gpt2-small --micro            # in one process: start-up and a miss, by stage
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
adapter of each drawn from a Zipf law (s = 1.1) over the N adapters (seeded: both runs see one sequence). At
the defaults 1,000 requests ask for 275 distinct adapters, over 4 times the 64 slots: the on-demand service
evicts. Reported: start to ready, requests/s, p50/p95/p99 latency by cache hit and miss (the X-Adapter-Cache
header), failures, loads and evictions (GET /metrics), the service's RSS (resident memory) at ready and at
the end, against its bound: at ready the base and every slot are in memory, so reads and evictions may add at
most 15%. Results: bench/results/serve-many-<model>-<machine>-<date>.json and .md.

--micro times the parts in one process instead (no HTTP, no second thread): the start-up's stages (imports,
the scan, the base, the slots, the warm-up) and, for --samples adapters past the slots (each evicts), a miss's
stages: the read and the parse (the reader thread's, in the service) and the copy into the slot (the model
thread's), then one message's classify through a miss and through a hit, p50/p95.
Results: bench/results/serve-many-micro-<model>-<machine>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import results_file
from http_load import classify_once, serve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
FULL = 1000
DRAWN = 128  # adapters with tensors of their own; the others copy one of these (each its own files)


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


def start(root: Path, max_loaded: int, a: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, int, float]:
    args = ["--adapters-dir", str(root), "--max-loaded", str(max_loaded), "--max-wait-ms", str(a.max_wait_ms)]
    return serve(args, a.threads, log)


async def client(port: int, todo: list, texts: list[str], rows: list, fails: list[str], rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            name = todo.pop()
            t = time.perf_counter()
            status, headers, answer = await classify_once(reader, writer, name, rng.choice(texts))
            cache = headers.get(b"x-adapter-cache", b"-").decode()
            if status != b"200" or b'"results"' not in answer:
                fails.append(f"{status.decode()}: {answer[:200]!r}")
            else:
                rows.append((cache, time.perf_counter() - t))
    except (OSError, asyncio.IncompleteReadError, IndexError) as e:
        fails.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()


def metrics(port: int) -> dict[str, float]:
    """The service's adapter loads and evictions so far, and the seconds its loads took (GET /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()

    def value(name: str) -> float:
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))

    return {
        "loads": value('lora_dist_adapter_loads_total{result="ok"}'),
        "evictions": value("lora_dist_adapter_evictions_total"),
        "load_s": value("lora_dist_adapter_load_seconds_sum"),
    }


def percentiles(lat: list[float]) -> dict:
    if not lat:
        return {"n": 0}
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"n": len(lat), "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98]}


def drive(port: int, names: list[str], clients: int, texts: list[str]) -> dict:
    rows: list = []
    fails: list[str] = []
    todo = list(reversed(names))

    async def run() -> None:
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


def spread(xs: list[float]) -> dict[str, float]:
    """p50 and p95 of `xs` seconds, in ms."""
    q = statistics.quantiles(xs, n=20) if len(xs) > 1 else [xs[0]] * 19
    return {"n": len(xs), "p50_ms": 1000 * statistics.median(xs), "p95_ms": 1000 * q[18]}


def micro(root: Path, a: argparse.Namespace, texts: list[str]) -> None:
    """--micro: the start-up's stages and a miss's, in this process (see the module's docstring)."""
    code = "import time; t = time.perf_counter(); import lora_dist.cli, lora_dist.serve.app; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    imports = float(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )
    import torch

    from lora_dist.infer.adapter_store import Catalog, materialize, read_raw
    from lora_dist.infer.multi_adapter import MultiAdapterClassifier, expected_shapes

    torch.set_num_threads(a.threads)
    start = {"imports_s": imports}
    t = time.perf_counter()
    catalog = Catalog(root)
    catalog.scan()
    start["scan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    m = MultiAdapterClassifier.from_catalog(catalog, device="cpu", max_loaded=a.max_loaded)
    start["model_s"] = time.perf_counter() - t
    start.update(getattr(m, "startup", {}))  # (an older lora-dist has none)
    names = list(catalog.entries)
    t = time.perf_counter()
    m.predict(["warm up"], names[0])  # as the service warms up
    m.forget([names[0]])
    start["warm_up_s"] = time.perf_counter() - t
    start["total_s"] = sum(v for k, v in start.items() if k in ("imports_s", "scan_s", "model_s", "warm_up_s"))
    print("start-up:", json.dumps(start), flush=True)

    stages: dict[str, list[float]] = {"read": [], "parse": [], "copy": []}
    assert m.slots is not None
    for k, name in enumerate(names[1 : 1 + m.slots.n + a.samples]):  # past the slots, each load evicts one
        e = catalog.entries[name]
        t0 = time.perf_counter()
        parts = read_raw(e)
        t1 = time.perf_counter()
        materialize(parts, expected_shapes)
        t2 = time.perf_counter()
        m.slots.put(parts, set())
        t3 = time.perf_counter()
        if k >= m.slots.n:
            for key, x in zip(stages, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                stages[key].append(x)
    text = texts[0]
    hit, miss = [], []
    for name in names[1 + m.slots.n + a.samples :][: a.samples]:  # never read yet: a miss, then a hit
        t = time.perf_counter()
        m.predict([text], name)
        miss.append(time.perf_counter() - t)
        t = time.perf_counter()
        m.predict([text], name)
        hit.append(time.perf_counter() - t)
    miss_parts = {k: spread(v) for k, v in stages.items()}
    classify = {"miss": spread(miss), "hit": spread(hit)}
    lines = [
        f"{a.model}, {len(names)} rank-8 adapters, --max-loaded {a.max_loaded}, {a.threads} torch threads, one "
        f"process (`--micro`).",
        "",
        "| start-up stage | s |",
        "|---|---:|",
        *(f"| {k.removesuffix('_s')} | {v:.2f} |" for k, v in start.items()),
        "",
        f"| a miss's stage ({a.samples} adapters, each evicting one) | thread in the service | p50 ms | p95 ms |",
        "|---|---|---:|---:|",
        f"| read the file | reader | {miss_parts['read']['p50_ms']:.1f} | {miss_parts['read']['p95_ms']:.1f} |",
        f"| parse and check | reader | {miss_parts['parse']['p50_ms']:.1f} | {miss_parts['parse']['p95_ms']:.1f} |",
        f"| copy into the slot | model | {miss_parts['copy']['p50_ms']:.1f} | {miss_parts['copy']['p95_ms']:.1f} |",
        "",
        "| one message classified | p50 ms | p95 ms |",
        "|---|---:|---:|",
        *(f"| {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} |" for k, v in classify.items()),
        "",
        f"a miss over a hit at p50, all on one thread: {classify['miss']['p50_ms'] - classify['hit']['p50_ms']:.1f} ms; "
        f"the model thread's part of it (the copy): {miss_parts['copy']['p50_ms']:.1f} ms",
    ]
    table = "\n".join(lines)
    print(table)
    fields = {
        "model": a.model,
        "adapters": len(names),
        "max_loaded": a.max_loaded,
        "threads": a.threads,
        "start_up": start,
        "miss_stages": miss_parts,
        "classify": classify,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "table": table,
    }
    path = results_file.write(a.out, f"serve-many-micro-{a.model}", fields)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    path.with_suffix(".md").write_text(
        f"# serve --adapters-dir, by stage ({path.stem})\n\n`python {' '.join(sys.argv)}`\n\n{table}\n\n"
        f"Measured on a shared {results_file.machine()} machine (load average {load} at the end).\n"
    )


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
    p.add_argument("--micro", action="store_true", help="time the start-up's and a miss's stages in one process")
    p.add_argument("--samples", type=int, default=40, help="--micro: adapters timed past the slots (default 40)")
    a = p.parse_args()
    full = a.requests >= FULL and a.n >= 1000
    if not full and not a.micro:
        print(f"note: {a.n} adapters, {a.requests} requests: a quick run, not the benchmark", file=sys.stderr)
    import tempfile

    from lora_dist.data import read_sms, shipped_sms_path

    texts = read_sms(shipped_sms_path())["text"].tolist()
    root = Path(a.cache or Path(tempfile.gettempdir()) / f"serve-many-{a.model}-{a.n}")
    make_adapters(root, a.n, a.model)
    if a.micro:
        micro(root, a, texts)
        return
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
            before = metrics(port)
            r = drive(port, names, a.clients, texts)
            after = metrics(port)
            r.update(
                max_loaded=max_loaded,
                start_to_ready_s=ready_s,
                memory_at_ready=at_ready,
                memory_at_end=rss_mb(proc.pid),
                warm_up_failures=warm["failures"],
                loads=after["loads"] - before["loads"],
                evictions=after["evictions"] - before["evictions"],
                load_seconds_mean=(after["load_s"] - before["load_s"]) / max(1, after["loads"] - before["loads"]),
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
        "| service | start to ready s | req/s | hit p50/p95/p99 ms | miss p50/p95/p99 ms | failures | loads / "
        "evictions | RSS at ready / end MiB |",
        "|---|---:|---:|---|---|---:|---|---|",
    ]
    for label, x in (
        (f"--max-loaded {od['max_loaded']} (on demand)", od),
        (f"--max-loaded {pre['max_loaded']} (all requested preloaded)", pre),
    ):
        lines.append(
            f"| {label} | {x['start_to_ready_s']:.1f} | {x['requests_per_s']:.1f} | {cell(x['hit'])} | "
            f"{cell(x['miss'])} | {x['failures']} | {x['loads']:.0f} / {x['evictions']:.0f} | "
            f"{x['memory_at_ready']['rss_mb']:.0f} / {x['memory_at_end']['rss_mb']:.0f} |"
        )
    ratio = od["requests_per_s"] / pre["requests_per_s"]
    grown = od["memory_at_end"]["rss_mb"] / od["memory_at_ready"]["rss_mb"] - 1
    targets = {
        "ready_s": (od["start_to_ready_s"], od["start_to_ready_s"] <= 15),
        "on_demand_over_preloaded": (ratio, ratio >= 0.8 and od["evictions"] > 0 and od["failures"] == 0),
        "memory_growth": (grown, grown <= 0.15),
    }
    lines.append("")
    lines.append(f"ready with {a.n} adapters: {od['start_to_ready_s']:.1f} s (target <= 15 s)")
    lines.append(
        f"on demand / preloaded requests/s: {ratio:.2f}x with {od['evictions']:.0f} evictions and "
        f"{od['failures']} failures (target >= 0.8x, evictions > 0, no failure)"
    )
    if od["hit"]["n"] and od["miss"]["n"]:
        extra = od["miss"]["p50_ms"] - od["hit"]["p50_ms"]
        targets["miss_over_hit_p50_ms"] = (extra, extra <= 50)
        lines.append(f"a miss over a hit at p50: {extra:.0f} ms (target <= 50 ms)")
    lines.append(
        f"RSS at the end {100 * grown:+.0f}% over ready, where the base and all {od['max_loaded']} slots are "
        f"already held (target <= +15%)"
    )
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
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # a loaded machine cannot judge a target
        "results": results,
        "targets": {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()},
        "table": table,
    }
    path = results_file.write(a.out, f"serve-many-{a.model}", fields, suffix="" if full else "-quick")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    path.with_suffix(".md").write_text(
        f"# serve --adapters-dir ({path.stem})\n\n`python {' '.join(sys.argv)}`\n\n{table}\n\n"
        f"Measured on {results_file.machine()} (load average {load} at the end).\n"
    )


if __name__ == "__main__":
    main()
