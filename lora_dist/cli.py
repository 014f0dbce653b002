"""Command line: `lora-dist train|sweep|params|report|eval|classify|adapter|export|serve ...` (also `python -m lora_dist ...`).

lora-dist train --config configs/smoke.yaml output_dir=runs/smoke
lora-dist sweep --config configs/sweep-smoke.yaml output_dir=runs/sweep
lora-dist params --config configs/gpt2-small-lora.yaml
lora-dist prepare --config configs/smoke.yaml        # tokenize the data into the cache, ahead of a job
lora-dist report runs/smoke          # or a sweep: runs/sweep
lora-dist eval runs/smoke --split test
lora-dist classify --adapter runs/smoke "WINNER!! Claim your prize" "see you at 6"
lora-dist adapter info runs/smoke
lora-dist export runs/smoke --format peft --out exports/smoke-peft
lora-dist serve --adapters spam=runs/smoke,support=runs/support --port 8000
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

from . import describe, export, report, sweep_report
from .build import build_model, num_classes
from .config import Config, load_config
from .device import PRECISIONS, DistEnv, set_cpu_threads
from .errors import UserError
from .infer import classify, evaluate
from .lora import count_params
from .serve import command as serve
from .token_cache import cache_dir_of, cache_limit, open_cache, run_data
from .train.loop import run
from .train.sweep import run as run_sweep
from .train.sweep_config import load_sweep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-dist", description="LoRA fine-tuning of GPT-2 on the SMS spam data.")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "fine-tune (under torchrun or deepspeed for several processes)"),
        ("sweep", "train the adapters a config's sweep: section lists, in one job over one frozen base"),
        ("params", "print total and trainable parameter counts without training"),
        ("prepare", "read and tokenize a config's data into the token cache (data.cache_dir) ahead of a job"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("--config", required=True, help="YAML file, e.g. configs/smoke.yaml")
        c.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=1 output_dir=runs/x")
    r = sub.add_parser(
        "report", help="write RUN_DIR/report.md and RUN_DIR/plots/ for a finished run, and print the report"
    )
    r.add_argument("run_dir", help="a training run's output_dir, e.g. runs/smoke, or a sweep's (its sweep.md)")
    e = sub.add_parser(
        "eval", help="re-evaluate a run's saved adapter on one of its splits or on your own labelled file"
    )
    e.add_argument("run_dir", help="a training run's output_dir, e.g. runs/smoke")
    e.add_argument(
        "--split", default="test", choices=("train", "validation", "test"), help="the run's split (default: test)"
    )
    e.add_argument("--data", default=None, help="a CSV/TSV with text and label columns instead of a split")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS, help="(default: fp32)")
    e.add_argument("--batch-size", type=int, default=32, help="messages per forward pass (default: 32)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    classify.add_arguments(
        sub.add_parser("classify", help="label new messages with a trained adapter (table, JSON or JSON lines)")
    )
    a = sub.add_parser("adapter", help="inspect a saved adapter").add_subparsers(dest="action", required=True)
    i = a.add_parser("info", help="print what an adapter is: base, layers, labels, tensors, size")
    i.add_argument("path", help="a training run or its adapter/ directory, a PEFT adapter, or a sweep's directory")
    i.add_argument("--base", help="a PEFT adapter's base directory, where its adapter_config.json names none")
    x = sub.add_parser("export", help="export an adapter for transformers + PEFT, or as a merged Hugging Face model")
    x.add_argument("path", help="a training run or its adapter/ (weights/) directory")
    x.add_argument(
        "--format", required=True, choices=("peft", "merged"), help="peft: a PEFT LoRA adapter; merged: a full model"
    )
    x.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    x.add_argument("--base", help="a directory holding the adapter's base weights, if not where training found them")
    serve.add_arguments(
        sub.add_parser("serve", help="serve adapters of one base over HTTP, with dynamic batching and a web page")
    )
    return p


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if DistEnv.from_environ().world_size > 1:
        # Everything is written and the process group is gone; skip C++ static destructors, which at
        # interpreter exit sometimes abort ("terminate called without an active exception") and would
        # turn a finished rank into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    rank = DistEnv.from_environ().rank
    try:
        if not torch.cuda.is_available():  # CPU work: as many torch threads as the machine's load leaves cores
            set_cpu_threads()
        if args.command in ("report", "eval", "classify", "adapter", "export", "serve"):
            return _tool(args)
        if args.command == "sweep":
            run_sweep(load_sweep(args.config, args.overrides))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "params":
            return _params(cfg)
        if args.command == "prepare":
            return _prepare(cfg, rank)
        run(cfg)
        return 0
    except UserError as e:  # every rank that fails says so; rank 0 without a prefix
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lora-dist ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _tool(args: argparse.Namespace) -> int:
    """The commands that read a run or an adapter, no config: report, eval, classify, adapter, export."""
    if args.command == "classify":
        return classify.main(args)
    if args.command == "serve":
        return serve.main(args)
    if args.command == "adapter":
        print(describe.info(args.path, args.base))
        return 0
    if args.command == "export":
        return export.main(args.path, args.format, args.out, args.base)
    if args.command == "report":
        write = sweep_report.write_report if sweep_report.is_sweep(args.run_dir) else report.write_report
        path = write(args.run_dir)
        print(path.read_text(), end="")
        print(f"written: {path}", file=sys.stderr)
        return 0
    return evaluate.main(args.run_dir, args.split, args.data, args.device, args.json, args.precision, args.batch_size)


def _context_length(cfg: Config) -> int:
    """The model's context, from its structure alone (built on the meta device, no weights read)."""
    m = cfg.model
    structure = replace(m, weights="random", name=m.name if m.weights in ("pretrained", "random") else m.weights)
    with torch.device("meta"):
        model, _ = build_model(replace(cfg, model=structure), 2)
    return model.cfg.context_length


def _prepare(cfg: Config, rank: int) -> int:
    """`lora-dist prepare`: what a training run's start does to its data, with progress (rank 0 prints)."""

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    context = _context_length(cfg)
    say(f"prepare: data.source={cfg.data.source}, cache {cache_dir_of(cfg.data)}")
    data = run_data(cfg.data, context, say=say)
    m = data.cache.manifest
    say(
        f"ready: {data.cache.path} ({m['rows']:,} messages, {m['tokens']:,} tokens, labels "
        f"{', '.join(f'{k} ({v:,})' for k, v in m['label_counts'].items())}); splits "
        f"{', '.join(f'{k} {len(v):,}' for k, v in data.splits.items())}"
    )
    return 0


def _params(cfg: Config) -> int:
    """Counts come from the model's structure alone: built on the meta device, no weights read. The number
    of classes comes from the data's labels (or model.num_classes)."""
    m = cfg.model
    labels = open_cache(cfg.data, cache_limit(cfg.data), say=lambda *_: None).label_names
    structure = replace(m, weights="random", name=m.name if m.weights in ("pretrained", "random") else m.weights)
    with torch.device("meta"):
        model, wrapped = build_model(replace(cfg, model=structure), num_classes(cfg, labels))
    total, trainable = count_params(model)
    what = (
        f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, {len(wrapped)} layers"
        if cfg.train.trainable == "lora"
        else f"trained: {cfg.train.trainable}"
    )
    print(f"model: {cfg.model.name}  {what}  labels: {', '.join(labels)}")
    print(f"total parameters: {total:,}")
    print(f"trainable parameters: {trainable:,}")
    return 0
