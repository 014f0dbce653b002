"""Training throughput of lora-dist against the book's recipe and transformers + PEFT, in one run.

    python bench/train_throughput.py                          # gpt2-small: (a) defaults, (b) book mode, (c) PEFT
    python bench/train_throughput.py --model gpt2-medium --batches 24 --passes 2
    python bench/train_throughput.py --contenders a,a-plain,a-mkl,a-fullseq,a-noaddmm,a-bf16-autocast --batches 24 --passes 4 --tag ablation
    python bench/train_throughput.py --device cuda --precision bf16 --model gpt2-xl --batch 32 --contenders a,a-ckpt
    python bench/train_throughput.py --table bench/results/<file>.json    # print a results file as a table

Each contender (bench/contenders.py) lives in its own process, so that its peak memory is its own, and holds
its model, data and optimizer for the whole run. After a warm-up on other batches, each replays the same
`--batches` batches (default: one epoch) `--passes` times. The contenders take turns of `--steps` steps, in
an order that rotates, so that drift in the machine's load hits all of them alike; a matmul probe runs
between turns, for the hardware limit. Two figures come out: over all timed steps (the run's conditions),
and "best", each batch at its fastest pass (closer to a quiet machine). Results go to
bench/results/<machine>-<date>[-tag].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# bf16 dense peak (TFLOP/s, no sparsity) by exact device name (torch.cuda.get_device_name without "NVIDIA "),
# for model FLOPs utilisation on GPUs. Names differ by form factor (H100 SXM reads "H100 80GB HBM3"); a
# name not listed here gets the rate of a measured large bf16 matmul instead (peak_source "measured").
NOMINAL_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200 480GB": 989.0,
    "A100-SXM4-40GB": 312.0,
    "A100-SXM4-80GB": 312.0,
    "A100-PCIE-40GB": 312.0,
    "A100 80GB PCIe": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
}


# ------------------------------------------------------------------------------------------- worker


def worker(name: str, args: argparse.Namespace, conn) -> None:
    """Build contender `name`, then obey the parent: warmup n / run n / stats."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from contenders import VARIANTS, build, warm_batches
    from flops import step_flops

    try:
        runner, build_s = build(name, args)
    except BaseException as e:  # report, do not hang the parent (SystemExit too: a UserError's exit, say)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    cfg = runner.model_cfg
    cuda = runner_device(runner).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mean_tokens = mean_train_tokens(runner)
    conn.send(
        (
            "ready",
            {
                "build_s": build_s,
                "steps_per_epoch": runner.steps_per_epoch,
                "mean_tokens": mean_tokens,
                "what": VARIANTS[name].what,
                "overrides": list(VARIANTS[name].overrides),
                "patches": list(VARIANTS[name].patches),
                "threads": torch.get_num_threads(),
                "device": str(runner_device(runner)),
                "precision": runner_precision(runner),
            },
        )
    )
    passes_len = args.batches or runner.steps_per_epoch
    pos = 0
    warmed: set[tuple[int, ...]] = set()
    while True:
        cmd, n = conn.recv()
        if cmd == "warmup":  # one step of each shape the timed steps will see, then n on epoch 1's batches
            firsts, warmed = warm_batches(runner, passes_len)
            times = []
            for batch in firsts:
                t0 = time.perf_counter()
                runner.step(batch)
                sync()
                times.append(time.perf_counter() - t0)
            runner.reset(1)
            for _ in range(n):
                t0 = time.perf_counter()
                runner.step()
                sync()
                times.append(time.perf_counter() - t0)
            runner.reset(0)
            conn.send(times)
        elif cmd == "run":
            records = []
            for _ in range(n):
                if pos == passes_len:  # a new pass over the same batches
                    runner.reset(0)
                    pos = 0
                sync()
                t0 = time.perf_counter()
                s = runner.step()
                sync()
                records.append(
                    {
                        "pos": pos,
                        "unwarmed": (s.examples, s.width) not in warmed,  # a shape the warm-up did not see
                        "seconds": time.perf_counter() - t0,
                        "examples": s.examples,
                        "tokens": s.tokens,
                        "padded": s.padded,
                        "model_flops": step_flops(cfg, 16, s.lengths),
                        "hardware_flops": step_flops(cfg, 16, s.lengths, s.width),
                    }
                )
                pos += 1
            conn.send(records)
        elif cmd == "stats":
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
            cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            conn.send({"peak_rss_mb": rss_mb, "cuda_max_allocated_mb": cuda_mb, "batches_per_pass": passes_len})
            return


def runner_precision(runner) -> str:
    """The precision the contender really trains in (lora-dist resolves train.precision=auto)."""
    return runner.s.precision if hasattr(runner, "s") else runner.cfg.train.precision


def runner_device(runner):
    import torch

    return runner.s.device if hasattr(runner, "s") else getattr(runner, "device", torch.device("cpu"))


def mean_train_tokens(runner) -> float:
    if hasattr(runner, "loaders"):
        ds = runner.loaders.datasets["train"]
        return sum(len(i) for i in ds.ids) / len(ds)
    return sum(len(e["input_ids"]) for e in runner.examples) / len(runner.examples)


# ------------------------------------------------------------------------------------------- parent


def run(args: argparse.Namespace) -> dict:
    import torch
    from flops import limit_examples_per_s, matmul_gflops

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.contenders.split(",")
    ctx = mp.get_context("spawn")
    procs, conns, info = {}, {}, {}
    failed: dict[str, str] = {}
    load = {"before": os.getloadavg(), "cpu_pressure_before": cpu_pressure(), "rounds": []}
    say(f"load average before: {load['before']}")
    for name in names:  # built one at a time, so the builds do not compete
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=worker, args=(name, args, child)
        )  # not daemonic: a contender may start DataLoader workers
        p.start()
        try:
            kind, payload = parent.recv()
        except EOFError:  # the worker died before it could say why
            kind, payload = "error", f"the worker exited with code {p.exitcode}"
        if kind == "error":  # the others are still compared; the results file says why this one is missing
            say(f"contender {name} failed to build: {payload}")
            failed[name] = payload
            p.join(timeout=30)
            continue
        procs[name], conns[name], info[name] = p, parent, payload
        say(f"built {name}: {payload['what']} in {payload['build_s']:.1f}s")
    names = [n for n in names if n not in failed]
    if not names:
        raise SystemExit(f"no contender could be built: {failed}")
    for name in names:
        conns[name].send(("warmup", args.warmup))
        info[name]["warmup_step_s"] = conns[name].recv()
        say(f"warm-up {name}: " + ", ".join(f"{t:.2f}s" for t in info[name]["warmup_step_s"]))
    device = info[names[0]]["device"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    # a probe per precision in use (and the fp32 one): each contender's limit is at its own dtype
    precisions = sorted({args.precision, "fp32"} | {info[n]["precision"] for n in names})
    total = {n: args.passes * (args.batches or info[n]["steps_per_epoch"]) for n in names}
    timed = {n: [] for n in names}  # one list of step records per round
    probes = {p: [] for p in precisions}
    r = 0
    while any(sum(len(x) for x in timed[n]) < total[n] for n in names):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            left = total[name] - sum(len(x) for x in timed[name])
            conns[name].send(("run", min(args.steps, left)) if left > 0 else ("run", 0))
            timed[name].append(conns[name].recv())
        for p in precisions:
            probes[p].append(
                matmul_gflops(dtypes[p], device if device.startswith("cuda") else "cpu", seconds=args.probe_seconds)
            )
        load["rounds"].append({"loadavg_1m": os.getloadavg()[0], "cpu_pressure_some_avg10": cpu_pressure()})
        r += 1
        if r % args.print_every == 0:
            say(
                f"round {r}: "
                + ", ".join(f"{n} {rate([x for rnd in timed[n] for x in rnd]):.2f} ex/s" for n in names)
                + " so far; matmul "
                + ", ".join(f"{p} {v[-1]:.0f}" for p, v in probes.items())
                + f" GFLOP/s; load {load['rounds'][-1]['loadavg_1m']:.2f}, "
                f"CPU pressure {load['rounds'][-1]['cpu_pressure_some_avg10']}%"
            )
    for name in names:
        conns[name].send(("stats", 0))
        info[name] |= conns[name].recv()
        procs[name].join(timeout=60)
    load["after"] = os.getloadavg()
    load["cpu_pressure_after"] = cpu_pressure()
    pressures = [x["cpu_pressure_some_avg10"] for x in load["rounds"] if x["cpu_pressure_some_avg10"] is not None]
    load["cpu_pressure_median"] = statistics.median(pressures) if pressures else None

    results = {}
    by_precision = {
        p: {"per_round_gflops": v, "best_gflops": max(v), "median_gflops": statistics.median(v)}
        for p, v in probes.items()
    }
    matmul = {"dtype": args.precision, **by_precision[args.precision], "by_precision": by_precision}
    peak, peak_source = peak_tflops(device) if device.startswith("cuda") else (None, None)
    for name in names:
        recs = [x for rnd in timed[name] for x in rnd]
        secs = sum(x["seconds"] for x in recs)
        ex = sum(x["examples"] for x in recs)
        tok = sum(x["tokens"] for x in recs)
        pad = sum(x["padded"] for x in recs)
        mflops = sum(x["model_flops"] for x in recs)
        hflops = sum(x["hardware_flops"] for x in recs)
        best = {}  # batch position -> its fastest step, over the passes
        for x in recs:
            if x["pos"] not in best or x["seconds"] < best[x["pos"]]["seconds"]:
                best[x["pos"]] = x
        best_secs = sum(x["seconds"] for x in best.values())
        per_pass = info[name]["batches_per_pass"]
        i = info[name]
        res = {
            "what": i["what"],
            "overrides": i["overrides"],
            "patches": i["patches"],
            "device": i["device"],
            "threads": i["threads"],
            "build_s": i["build_s"],
            "warmup_step_s": i["warmup_step_s"],
            "timed_steps": len(recs),
            "batches_per_pass": per_pass,
            "passes": len(recs) / per_pass,
            "seconds": secs,
            "examples": ex,
            "real_tokens": tok,
            "padded_tokens": pad,
            "examples_per_s": ex / secs,
            "tokens_per_s": tok / secs,
            "padded_tokens_per_s": pad / secs,
            # the same batches at each one's fastest pass: what a quieter machine gives
            "examples_per_s_best": sum(x["examples"] for x in best.values()) / best_secs,
            "tokens_per_s_best": sum(x["tokens"] for x in best.values()) / best_secs,
            "padding_fraction": 1 - tok / pad,
            "step_s_median": statistics.median(x["seconds"] for x in recs),
            "per_round_examples_per_s": [rate(rnd) for rnd in timed[name] if rnd],
            "steps_per_epoch": i["steps_per_epoch"],
            "epoch_s": i["steps_per_epoch"] * secs / len(recs),
            "epoch_s_best": i["steps_per_epoch"] * best_secs / len(best),
            "peak_rss_mb": i["peak_rss_mb"],
            "cuda_max_allocated_mb": i["cuda_max_allocated_mb"],
            "model_flops_per_step": mflops / len(recs),
            "hardware_flops_per_step": hflops / len(recs),
            "model_gflops_per_s": mflops / secs / 1e9,
            "hardware_gflops_per_s": hflops / secs / 1e9,
            "mean_train_tokens": i["mean_tokens"],
            "shapes": len({(x["examples"], x["padded"]) for x in recs}),
            "timed_steps_unwarmed": sum(x["unwarmed"] for x in recs),  # 0: every timed shape was warmed first
        }
        from lora_dist.model import SIZES

        cfg = SIZES[args.model]
        own = by_precision[i["precision"]]
        res["precision"] = i["precision"]
        # the limit at the contender's own matmul dtype, and the fp32 one
        for key, g in (
            ("limit_examples_per_s", own["median_gflops"]),
            ("limit_examples_per_s_best_probe", own["best_gflops"]),
            ("limit_examples_per_s_fp32", by_precision["fp32"]["median_gflops"]),
        ):
            res[key] = limit_examples_per_s(cfg, i["mean_tokens"], g)
        # in real tokens, so that a part of an epoch whose messages are shorter or longer than the mean is
        # not flattered or penalised (over whole epochs it is the examples/s ratio)
        tok = i["mean_tokens"]
        res["fraction_of_limit"] = res["tokens_per_s"] / (res["limit_examples_per_s"] * tok)
        res["fraction_of_limit_best"] = res["tokens_per_s_best"] / (res["limit_examples_per_s_best_probe"] * tok)
        res["fraction_of_fp32_limit"] = res["tokens_per_s"] / (res["limit_examples_per_s_fp32"] * tok)
        res["model_flops_utilisation_vs_probe"] = res["model_gflops_per_s"] / own["median_gflops"]
        if peak:
            res["mfu"] = res["model_gflops_per_s"] / (peak * 1e3)  # real tokens only
            res["hfu"] = res["hardware_gflops_per_s"] / (peak * 1e3)  # every token computed, padding included
        results[name] = res
    return {
        "contenders": results,
        "failed": failed,
        "matmul": matmul,
        "load": load,
        "nominal_peak_tflops": peak,
        "peak_source": peak_source,
        "ratios": ratios(results),
        "targets": targets(results, args),
    }


def rate(records: list[dict]) -> float:
    secs = sum(x["seconds"] for x in records)
    return sum(x["examples"] for x in records) / secs if secs else 0.0


def ratios(res: dict) -> dict:
    """(a) against each other contender: totals, and the median of the per-round ratios."""
    if "a" not in res:
        return {}
    a, out = res["a"], {}
    for y, r in res.items():
        if y != "a":
            out[f"a/{y} examples_per_s"] = a["examples_per_s"] / r["examples_per_s"]
            out[f"a/{y} tokens_per_s"] = a["tokens_per_s"] / r["tokens_per_s"]
            out[f"a/{y} examples_per_s_best"] = a["examples_per_s_best"] / r["examples_per_s_best"]
    return out


def targets(res: dict, args) -> dict:
    """The issue's CPU targets, on both figures."""
    if not {"a", "b", "c"} <= set(res) or args.device.startswith("cuda"):
        return {}
    a, b, c = res["a"], res["b"], res["c"]
    out = {}
    for sfx in ("", "_best"):
        out[f"a >= 5x b (examples_per_s{sfx})"] = a[f"examples_per_s{sfx}"] >= 5 * b[f"examples_per_s{sfx}"]
        out[f"a >= 1.5x c (examples_per_s{sfx})"] = a[f"examples_per_s{sfx}"] >= 1.5 * c[f"examples_per_s{sfx}"]
        out[f"a >= c (tokens_per_s{sfx})"] = a[f"tokens_per_s{sfx}"] >= c[f"tokens_per_s{sfx}"]
    return out


def cpu_pressure() -> float | None:
    """Linux PSI: the share of the last 10 s in which some runnable task waited for a CPU (None if absent)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def nominal_peak(name: str) -> float | None:
    """The listed bf16 peak of the GPU called `name` (exact match: "L40" is not an "L4"), or None."""
    return NOMINAL_BF16_TFLOPS.get(name.strip().removeprefix("NVIDIA ").strip())


def peak_tflops(device: str) -> tuple[float, str]:
    """(bf16 peak in TFLOP/s, "nominal" or "measured"): the listed figure, else an 8192^3 bf16 matmul's rate."""
    import torch
    from flops import matmul_gflops

    peak = nominal_peak(torch.cuda.get_device_name(torch.device(device)))
    if peak is not None:
        return peak, "nominal"
    return matmul_gflops(torch.bfloat16, device, n=8192, seconds=2.0) / 1e3, "measured"


# ------------------------------------------------------------------------------------------ reporting


def machine() -> dict:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def slug(m: dict, device: str) -> str:
    if device.startswith("cuda") and m.get("gpu"):
        name = m["gpu"]
    else:
        name = f"{m['cpu']} {m['cores']}c"
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")


def git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def table(doc: dict) -> str:
    """The results as a markdown table, with the command that made them."""
    gpu = doc["settings"]["device"].startswith("cuda")
    head = [
        "contender",
        "precision",
        "examples/s",
        "best",
        "real tokens/s",
        "padding",
        "step (median)",
        "epoch",
        "peak RSS",
    ]
    head += ["CUDA peak", "MFU"] if gpu else ["of limit at its precision (best)", "of the fp32 limit"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in doc["contenders"].items():
        cells = [
            f"({name}) {r['what']}",
            r.get("precision", doc["settings"]["precision"]),
            f"{r['examples_per_s']:.2f}",
            f"{r['examples_per_s_best']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['padding_fraction'] * 100:.0f}%",
            f"{r['step_s_median'] * 1e3:.0f} ms",
            f"{r['epoch_s']:.0f} s",
            f"{r['peak_rss_mb'] / 1024:.2f} GiB",
        ]
        if gpu:
            cells += [
                f"{(r['cuda_max_allocated_mb'] or 0) / 1024:.2f} GiB",
                f"{r['mfu'] * 100:.0f}%" if "mfu" in r else "n/a",
            ]
        else:
            cells += [
                f"{r['fraction_of_limit'] * 100:.0f}% ({r['fraction_of_limit_best'] * 100:.0f}%)",
                f"{r['fraction_of_fp32_limit'] * 100:.0f}%" if "fraction_of_fp32_limit" in r else "n/a",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    s, m, load = doc["settings"], doc["matmul"], doc["load"]
    first = next(iter(doc["contenders"].values()))
    where = doc["machine"].get("gpu") if gpu else f"{doc['machine']['cpu']}, {first['threads']} threads"
    lines = [
        f"`{doc['command']}`",
        "",
        f"{s['model']}, batch {s['batch']}, {s['precision']}, {where}; {first['batches_per_pass']} batches x "
        f"{s['passes']} passes per contender, in turns of {s['steps']} steps, after {s['warmup']} warm-up steps; "
        f"{doc['date']}. Load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after; CPU pressure "
        f"(PSI some, avg10) median {load.get('cpu_pressure_median')}%. Matmul probe (median, best): "
        + ", ".join(
            f"{p} {v['median_gflops']:.0f}, {v['best_gflops']:.0f} GFLOP/s"
            for p, v in m.get("by_precision", {s["precision"]: m}).items()
        )
        + '. "best": each batch at its fastest pass; the limit is the issue\'s 4 x (Linear parameters) FLOPs per '
        "real token at the probe's rate.",
        "",
    ]
    lines += rows
    if doc["ratios"]:
        lines += ["", "; ".join(f"{k} = {v:.2f}" for k, v in doc["ratios"].items())]
    return "\n".join(lines)


def say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--contenders", default="a,b,c", help="comma-separated names from bench/contenders.py VARIANTS")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=0, help="batches per pass (0: one epoch)")
    ap.add_argument("--passes", type=int, default=2, help="timed passes over those batches")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per contender per turn")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--probe-seconds", type=float, default=0.3, help="matmul probe per round")
    ap.add_argument("--print-every", type=int, default=10, help="rounds between progress lines")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="appended to the results file name")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    os.chdir(ROOT)  # the recipe config is read relative to the repository
    started = datetime.datetime.now()
    out = run(args)
    m = machine()
    doc = {
        "command": "python bench/train_throughput.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": started.strftime("%Y-%m-%d %H:%M"),
        "wall_s": (datetime.datetime.now() - started).total_seconds(),
        "machine": m,
        "git": git_state(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "model",
                "contenders",
                "batch",
                "batches",
                "passes",
                "steps",
                "warmup",
                "threads",
                "device",
                "precision",
                "seed",
            )
        },
    } | out
    path = (
        Path(args.out)
        / f"{slug(m, args.device)}-{started.strftime('%Y-%m-%d')}{'-' + args.tag if args.tag else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    for k, v in doc["targets"].items():
        print(f"target {k}: {'met' if v else 'NOT met'}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
