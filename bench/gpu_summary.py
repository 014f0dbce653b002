"""The summary of a bench/gpu_check.sh run: one JSON with the figures the performance issue asks for.

    python bench/gpu_summary.py bench/results/gpu-check-<stamp> bench/results/gpu-check-<stamp>.json

Fields: `device`, `e2e_seconds` (process start to exit) and `train_seconds` of the book recipe at the
defaults, the same for the exact book (`book_exact`), `small_vs_peft` (real tokens/s of lora-dist's defaults
over transformers + PEFT in the same run), `xl_mfu` (a fraction, FLOPs as bench/flops.py counts them),
`xl_hfu` (the same over every computed token, padding included), `xl_pad16` (both at lengths rounded to 16),
`xl_first_step_seconds` (process start to the end of gpt2-xl's first step), `xl_peak_memory_gb` with and without
activation checkpointing, timed steps of a shape the warm-up had not seen (0 expected), contenders that failed
to build, each step's exit status, and the targets met. Written after every step, so partial runs have one too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {  # field: (comparison, value)
    "train_seconds": ("<=", 10.0),
    "e2e_seconds": ("<=", 20.0),
    "small_vs_peft": (">=", 4.0),
    "xl_mfu": (">=", 0.40),
    "xl_first_step_seconds": ("<=", 10.0),
}


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _seconds(d: Path, name: str) -> float | None:
    try:
        return float((d / f"{name}.end").read_text()) - float((d / f"{name}.start").read_text())
    except (OSError, ValueError):
        return None


def _throughput(d: Path, tag: str) -> dict:
    found = sorted(d.glob(f"*{tag}.json"))
    doc = _read(found[-1]) if found else None
    return (doc or {}).get("contenders", {}) if isinstance(doc, dict) else {}


def _failed(d: Path, tag: str) -> dict:
    found = sorted(d.glob(f"*{tag}.json"))
    doc = _read(found[-1]) if found else None
    return {f"{tag}/{k}": v for k, v in ((doc or {}).get("failed") or {}).items()} if isinstance(doc, dict) else {}


def e2e(d: Path, mode: str) -> dict:
    r = _read(d / f"e2e-{mode}" / "results.json") or {}
    out = {"e2e_seconds": _seconds(d, f"e2e-{mode}")}
    for key in ("train_seconds", "eval_seconds", "wall_seconds", "test_accuracy", "examples_per_second"):
        out[key] = r.get(key)
    return out


def first_step_seconds(d: Path) -> float | None:
    try:
        start = float((d / "xl-start.start").read_text())
        for line in (d / "xl-start" / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "first_step":
                return record["time"] - start
    except (OSError, ValueError, KeyError):
        pass
    return None


def summary(d: Path) -> dict:
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001  (a summary is written whatever broke)
        device = None
    small, xl = _throughput(d, "small"), _throughput(d, "xl")
    a, c = small.get("a", {}), small.get("c", {})
    status = {}
    if (d / "status").is_file():
        status = {k: int(v) for k, v in (line.split() for line in (d / "status").read_text().splitlines())}
    doc = {
        "device": device,
        **e2e(d, "defaults"),
        "book_exact": e2e(d, "book"),
        "small_vs_peft": a["tokens_per_s"] / c["tokens_per_s"]
        if a.get("tokens_per_s") and c.get("tokens_per_s")
        else None,
        "small": {
            k: {
                f: v.get(f)
                for f in (
                    "what",
                    "tokens_per_s",
                    "examples_per_s",
                    "step_s_median",
                    "mfu",
                    "hfu",
                    "padding_fraction",
                    "shapes",
                    "cuda_max_allocated_mb",
                )
            }
            for k, v in small.items()
        },
        "xl_mfu": xl.get("a", {}).get("mfu"),
        "xl_hfu": xl.get("a", {}).get("hfu"),
        "xl_pad16": {k: xl.get("a-pad16", {}).get(k) for k in ("mfu", "hfu", "padding_fraction", "shapes")},
        "xl_padding_fraction": xl.get("a", {}).get("padding_fraction"),
        "timed_steps_unwarmed": {
            f"{tag}/{k}": v.get("timed_steps_unwarmed")
            for tag, res in (("small", small), ("xl", xl))
            for k, v in res.items()
        },
        "failed_to_build": {**_failed(d, "small"), **_failed(d, "xl")},
        "xl_first_step_seconds": first_step_seconds(d),
        "xl_peak_memory_gb": {"plain": _gb(xl.get("a", {})), "activation_checkpointing": _gb(xl.get("a-ckpt", {}))},
        "status": status,
    }
    doc["targets"] = {
        f"{k} {op} {v}": (doc[k] is not None and (doc[k] <= v if op == "<=" else doc[k] >= v))
        for k, (op, v) in TARGETS.items()
    }
    return doc


def _gb(r: dict) -> float | None:
    mb = r.get("cuda_max_allocated_mb")
    return None if mb is None else mb / 1024


def main() -> None:
    d, out = Path(sys.argv[1]), Path(sys.argv[2])
    doc = summary(d)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: doc[k]
                for k in (
                    "device",
                    "e2e_seconds",
                    "train_seconds",
                    "small_vs_peft",
                    "xl_mfu",
                    "xl_hfu",
                    "xl_first_step_seconds",
                    "targets",
                )
            },
            indent=1,
        )
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
