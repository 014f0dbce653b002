"""Command line: `lora-dist train|params|report|eval ...` (also `python -m lora_dist ...`).

    lora-dist train --config configs/smoke.yaml output_dir=runs/smoke
    lora-dist params --config configs/gpt2-small-lora.yaml
    lora-dist report runs/smoke
    lora-dist eval runs/smoke --split test
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-dist", description="LoRA fine-tuning of GPT-2 on the SMS spam data.")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "fine-tune (under torchrun or deepspeed for several processes)"),
                       ("params", "print total and trainable parameter counts without training")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--config", required=True, help="YAML file, e.g. configs/smoke.yaml")
        c.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=1 output_dir=runs/x")
    r = sub.add_parser("report", help="write RUN_DIR/report.md and RUN_DIR/plots/ for a finished run, and print the report")
    r.add_argument("run_dir", help="a training run's output_dir, e.g. runs/smoke")
    e = sub.add_parser("eval", help="re-evaluate a run's saved adapter on one of its splits or on your own labelled file")
    e.add_argument("run_dir", help="a training run's output_dir, e.g. runs/smoke")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"), help="the run's split (default: test)")
    e.add_argument("--data", default=None, help="a CSV/TSV with text and label columns instead of a split")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Everything is written and the process group is gone; skip C++ static destructors, which at
        # interpreter exit sometimes abort ("terminate called without an active exception") and would
        # turn a finished rank into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        if args.command in ("report", "eval"):
            return _tool(args)
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "params":
            return _params(cfg)
        from .train import run

        run(cfg)
        return 0
    except UserError as e:  # every rank that fails says so; rank 0 without a prefix
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


def _tool(args) -> int:
    """`report` and `eval` (`report.py`, `evaluate.py`): they read a run directory, no config."""
    if args.command == "report":
        from .report import write_report

        path = write_report(args.run_dir)
        print(path.read_text(), end="")
        print(f"written: {path}", file=sys.stderr)
        return 0
    from .evaluate import main as evaluate

    return evaluate(args.run_dir, args.split, args.data, args.device, args.json)


def _params(cfg) -> int:
    """Counts come from the model's structure alone: built on the meta device, no weights read."""
    import torch

    from .lora import count_params
    from .train import build_model

    m = cfg.model
    structure = replace(m, weights="random", name=m.name if m.weights in ("pretrained", "random") else m.weights)
    with torch.device("meta"):
        model, wrapped = build_model(replace(cfg, model=structure))
    total, trainable = count_params(model)
    print(f"model: {cfg.model.name}  LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, {len(wrapped)} layers")
    print(f"total parameters: {total:,}")
    print(f"trainable parameters: {trainable:,}")
    return 0
