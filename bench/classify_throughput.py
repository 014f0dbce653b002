"""Classification throughput: lora-dist's classifier against transformers' pipeline over the PEFT export.

    python bench/classify_throughput.py                    # gpt2-small (random weights), SMS test split + 10,000 messages
    python bench/classify_throughput.py --messages 2000    # fewer drawn messages, on a slow or busy machine
    python bench/classify_throughput.py --quick --out /tmp/bench   # the tiny model and a few messages (tests)

Contenders, each in its own process (its peak RSS is its own), on the same messages, batch size 32:
(a) `lora-dist classify`'s engine (`Classifier`) at its default, fp32, unmerged and with `--merge`, and
under `--precision auto` (bf16 where the CPU has it natively: faster, and not the exports' answers);
(b) transformers `pipeline("text-classification")` over the PEFT-loaded model; (c) the same
model after `merge_and_unload()`. The adapter: rank 16, alpha 16 on every Linear layer and the head, its
tensors drawn at random (a random base learns nothing worth keeping; the cost is the same). Writes
bench/results/classify_throughput.{json,md} (or --out), with the adapter's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAMES = {
    "a": "(a) lora-dist classify",
    "a-merge": "(a) lora-dist classify --merge",
    "a-auto": "(a) lora-dist classify --precision auto",
    "b": "(b) transformers pipeline, PEFT model",
    "c": "(c) transformers pipeline, merge_and_unload",
}


def setup(work: Path, model: str, messages: int, test_limit: int | None) -> dict:
    """The base (HF layout), the adapter, its PEFT export, and the messages."""
    import torch

    from lora_dist import load_gpt2, save_hf_checkpoint
    from lora_dist.adapter import AdapterSpec, base_of, save
    from lora_dist.build import build_model
    from lora_dist.config import load_config
    from lora_dist.data import load_frame, prepare_splits
    from lora_dist.export import main as export
    from lora_dist.lora import adapter_state_dict

    torch.manual_seed(0)
    base = save_hf_checkpoint(load_gpt2(model, "random"), work / "base")
    cfg = load_config(
        None,
        [
            f"model.name={model}",
            f"model.weights={base}",
            "lora.rank=16",
            "lora.alpha=16",
            "lora.scaling=alpha/r",
            "data.download=false",
        ],
    )
    net, modules = build_model(cfg, 2)
    tensors = adapter_state_dict(net)
    with torch.no_grad():
        for t in tensors.values():
            t.add_(torch.randn_like(t) * 0.02)
    ctx = net.cfg.context_length
    save(work / "run", AdapterSpec.for_run(cfg, ("ham", "spam"), ctx, modules, base_of(cfg)), tensors)
    export(str(work / "run"), "peft", str(work / "peft"))
    test = prepare_splits(cfg.data, say=lambda *_: None)["test"]["text"].tolist()[:test_limit]
    pool = load_frame("sms", cfg.data, lambda *_: None)["text"]
    drawn = pool.sample(n=messages, replace=messages > len(pool), random_state=123).tolist()
    texts = {"sms-test": test, f"collection-{messages}": drawn}
    (work / "texts.json").write_text(json.dumps(texts))
    adapter_file = work / "run" / "adapter" / "adapter_model.safetensors"
    return {
        "adapter_bytes": adapter_file.stat().st_size,
        "adapter_tensors": len(tensors),
        "adapter_parameters": int(sum(t.numel() for t in tensors.values())),
        "messages": {k: len(v) for k, v in texts.items()},
        "padding": padding(texts, 32),
    }


def padding(texts: dict, batch: int) -> dict:
    """Padded tokens over real tokens: (a) sorts by length before batching, the pipeline keeps input order."""
    from lora_dist.tokenizer import get_tokenizer

    out = {}
    for name, ts in texts.items():
        lens = [max(1, len(i)) for i in get_tokenizer().encode_batch(ts, disallowed_special=())]
        cost = lambda ls: sum(max(ls[i : i + batch]) * len(ls[i : i + batch]) for i in range(0, len(ls), batch))  # noqa: E731
        out[name] = {
            "real_tokens": sum(lens),
            "padded_a": cost(sorted(lens, reverse=True)),
            "padded_pipeline": cost(lens),
        }
    return out


# ------------------------------------------------------------------------------------------- worker


def worker(name: str, work: Path, batch: int) -> None:
    import torch

    texts = json.loads((work / "texts.json").read_text())
    t0 = time.perf_counter()
    if name.startswith("a"):
        from lora_dist import Classifier

        clf = Classifier.from_pretrained(
            work / "run", device="cpu", precision="auto" if name == "a-auto" else "fp32", merge=name == "a-merge"
        )
        precision = clf.precision
        run = lambda ts: [r["label"] for r in clf.predict(ts, batch_size=batch)]  # noqa: E731
    else:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
        from transformers.utils import logging

        logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(work / "peft")
        base = AutoModelForSequenceClassification.from_pretrained(
            work / "base",
            num_labels=2,
            pad_token_id=50256,
            id2label={0: "ham", 1: "spam"},
            label2id={"ham": 0, "spam": 1},
        )
        model = PeftModel.from_pretrained(base, work / "peft").eval()
        if name == "c":
            model = model.merge_and_unload()
        pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
        precision = "fp32"
        run = lambda ts: [r["label"] for r in pipe(ts, batch_size=batch, truncation=True)]  # noqa: E731
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        run(next(iter(texts.values()))[:batch])  # warm-up: first-call costs (weight packing, allocator)
        result = {"name": name, "precision": precision, "load_s": load_s, "datasets": {}, "labels": {}}
        for key, ts in texts.items():
            t, cpu = time.perf_counter(), time.process_time()
            labels = run(ts)
            dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
            result["datasets"][key] = {
                "messages": len(ts),
                "seconds": dt,
                "messages_per_s": len(ts) / dt,
                "cpu_seconds": dcpu,
                "messages_per_cpu_s": len(ts) / dcpu,
            }
            result["labels"][key] = labels
    result["peak_rss_mb"] = peak_rss_mb()
    (work / f"result-{name}.json").write_text(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss survives execve on Linux, so it would include the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -------------------------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--messages", type=int, default=10_000, help="messages drawn from the collection")
    ap.add_argument(
        "--test-limit", type=int, default=None, help="first N messages of the SMS test split (default: all)"
    )
    ap.add_argument("--contenders", default="a,a-merge,a-auto,b,c")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="the tiny model, 40 drawn messages, 24 test messages")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--note", default="", help="a remark for the results (e.g. the machine's load)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.work), args.batch_size)
        return 0
    if args.quick:
        args.model, args.messages, args.test_limit = "tiny", 40, 24
    names = args.contenders.split(",")
    with tempfile.TemporaryDirectory(prefix="classify-bench-") as tmp:
        work = Path(tmp)
        print(f"setting up {args.model} in {work} ...", flush=True)
        info = setup(work, args.model, args.messages, args.test_limit)
        load = [os.getloadavg()[0]]
        results = {}
        for name in names:
            print(f"running {NAMES[name]} ...", flush=True)
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--work", str(work), "--batch-size", str(args.batch_size)],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[name] = json.loads((work / f"result-{name}.json").read_text())
            load.append(os.getloadavg()[0])
            doc = write(args, info, results, load)  # after each contender: a run cut short keeps what it measured
    print(markdown(doc))
    return 0


def write(args, info: dict, results: dict, load: list[float]) -> dict:
    doc = report(args, info, {n: dict(r) for n, r in results.items()}, load)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classify_throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "classify_throughput.md").write_text(markdown(doc))
    return doc


def report(args, info: dict, results: dict, load: list[float]) -> dict:
    labels = {n: r.pop("labels") for n, r in results.items()}
    agree = {}
    for a in (n for n in results if n.startswith("a")):
        for b in (n for n in results if not n.startswith("a")):
            agree[f"{a} vs {b}"] = {
                k: sum(x == y for x, y in zip(labels[a][k], labels[b][k], strict=True)) / len(labels[a][k])
                for k in labels[a]
            }
    ratios = {}
    for a in (n for n in results if n.startswith("a")):
        if "b" in results:
            for unit in ("messages_per_s", "messages_per_cpu_s"):
                ratios[f"{a}/b {unit}"] = {
                    k: results[a]["datasets"][k][unit] / results["b"]["datasets"][k][unit]
                    for k in results[a]["datasets"]
                }
    argv = sys.argv[1:]
    if "--note" in argv:  # the note has its own line
        i = argv.index("--note")
        argv = argv[:i] + argv[i + 2 :]
    cmd = "python bench/classify_throughput.py " + " ".join(argv)
    return {
        "command": cmd.strip(),
        "model": args.model,
        "batch_size": args.batch_size,
        "note": args.note,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_1min_during": load,
        },
        **info,
        "contenders": results,
        "agreement": agree,
        "speedup": ratios,
    }


def markdown(doc: dict) -> str:
    keys = list(doc["messages"])
    mb = doc["adapter_bytes"] / 1e6
    lines = [
        f"# Classification throughput: {doc['model']} (random weights), batch {doc['batch_size']}",
        "",
        f"`{doc['command']}`",
        "",
        f"Adapter (rank 16, alpha 16, every Linear layer and the head): {doc['adapter_tensors']} tensors, "
        f"{doc['adapter_parameters']:,} values, **{doc['adapter_bytes']:,} bytes ({mb:.2f} MB, "
        f"{doc['adapter_bytes'] / 2**20:.2f} MiB)** in fp32.",
        "",
        "Messages per second of wall time, and per CPU-second (all of the process's threads; on a shared "
        "machine the wall time also measures the other processes, the CPU time only the contender's work):",
        "",
        "| contender | precision | " + " | ".join(f"{k} msg/s | {k} msg/CPU-s" for k in keys) + " | load | peak RSS |",
        "|---|---|" + "---:|---:|" * len(keys) + "---:|---:|",
    ]
    for n, r in doc["contenders"].items():
        lines.append(
            f"| {NAMES[n]} | {r['precision']} | "
            + " | ".join(
                f"{r['datasets'][k]['messages_per_s']:.2f} | {r['datasets'][k].get('messages_per_cpu_s', float('nan')):.2f}"
                for k in keys
            )
            + f" | {r['load_s']:.1f} s | {r['peak_rss_mb'] / 1024:.2f} GiB |"
        )
    lines += [
        "",
        "Speed-up over (b): "
        + "; ".join(f"{k}: " + ", ".join(f"{d} {v:.2f}x" for d, v in r.items()) for k, r in doc["speedup"].items()),
        "",
        "Predictions agreeing: "
        + "; ".join(f"{k}: " + ", ".join(f"{d} {v:.2%}" for d, v in r.items()) for k, r in doc["agreement"].items()),
        "",
        "Padded tokens per real token at batch 32: "
        + "; ".join(
            f"{k}: (a) sorted by length {p['padded_a'] / p['real_tokens']:.2f}, pipeline in input order "
            f"{p['padded_pipeline'] / p['real_tokens']:.2f}"
            for k, p in doc["padding"].items()
        ),
        "",
        "What buys (a)'s lead: messages sorted by length before batching (little padding, see above; the "
        "pipeline pads each batch of 32 in input order to its longest), the last block run for each message's "
        "last real token only and the head read there (transformers runs every position through every block and "
        "the score layer), and the frozen weights packed once for oneDNN (lora_dist/frozen_linear.py).",
        "",
        f"Machine: {doc['machine']['cores']} cores, 1-minute load average "
        f"{', '.join(f'{x:.1f}' for x in doc['machine']['load_avg_1min_during'])} (before and after each contender). "
        + doc["note"],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
