"""What a sweep's adapters need before any of them trains: their data, checked, and the memory they take.

    lora-dist sweep --config configs/sweep-smoke.yaml sweep.max_concurrent=4

Memory grows with the adapters trained at once: each keeps its micro-batch's activations for the backward
pass (measured here on one message of its longest length, through the autograd hooks that see what is
saved, and scaled to its micro-batch), and its trained tensors with their gradients and AdamW's two moments.
The frozen base is there once whatever the number. A sweep that asks for more adapters at once than the free
memory holds stops before training, saying how many fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..build import add_trainable, num_classes, shared_copy
from ..config import Config
from ..data import Say, fixed_length
from ..device import autocast
from ..errors import UserError
from ..model import GPT2
from ..token_cache import run_data
from .backend import Strategy
from .loaders import make_loaders, micro_batch_size
from .sweep_config import SweepPlan

HEADROOM = 0.9  # of the free memory: the rest for the allocator's slack and the backward pass's temporaries


@dataclass(frozen=True)
class AdapterData:
    labels: tuple[str, ...]
    num_classes: int
    length: int  # its longest training micro-batch, in tokens
    micro: int  # its rows per micro-batch on each rank
    steps: int = 0  # its optimizer steps: train.epochs over its data, or train.max_steps


def prepare_data(plan: SweepPlan, context_length: int, world: int, rank: int) -> list[AdapterData]:
    """Every adapter's data read, split, labelled and tokenized (each distinct data config once), so that a
    bad file or batch size stops the sweep before anything is written."""
    out, seen = [], {}
    for p in plan.adapters:
        cfg, t = p.cfg, p.cfg.train
        try:
            if cfg.data not in seen:
                data = run_data(cfg.data, context_length, say=lambda *_: None)
                seen[cfg.data] = (data.labels, data.datasets, data.length)
            labels, datasets, length = seen[cfg.data]
            micro = micro_batch_size(t.batch_size, world, t.grad_accum)
            # one batch at least
            loaders = make_loaders(datasets, length, cfg.data, micro, t.grad_accum, world, rank, t.seed)
            longest = fixed_length(cfg.data, length) or int(datasets["train"].lengths.max())
            steps = loaders.sampler.steps * t.epochs
            steps = min(steps, t.max_steps) if t.max_steps else steps
            out.append(AdapterData(labels, num_classes(cfg, labels), longest, micro, steps))
        except UserError as e:
            raise UserError(f"sweep adapter '{p.name}': {e}") from e
    return out


def adapter_bytes(base: GPT2, plan_cfg: Config, data: AdapterData, device: torch.device, precision: str) -> int:
    """Bytes one adapter takes in training: its micro-batch's saved activations, and its trained tensors four
    times over (weights, gradients, AdamW's two moments)."""
    frozen = {p.untyped_storage().data_ptr() for p in base.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = shared_copy(base)
        add_trainable(model, plan_cfg, data.num_classes)
        model.train()
        ids = torch.zeros(1, data.length, dtype=torch.long, device=device)  # one message of the longest length
        last = torch.tensor([data.length - 1], device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
            model(ids, last)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return data.micro * sum(saved.values()) + 4 * trained


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (a GPU's free memory; the CPU's MemAvailable), None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(base: GPT2, plan: SweepPlan, data: list[AdapterData], job: Strategy, say: Say = print) -> int:
    """How many adapters train at once (`sweep.max_concurrent`, default all): said with what they cost, and
    refused before training when the most expensive ones would not fit in the free memory."""
    n = len(plan.adapters)
    costs = [adapter_bytes(base, p.cfg, d, job.device, job.precision) for p, d in zip(plan.adapters, data, strict=True)]
    k = min(plan.sweep.max_concurrent or n, n)
    worst = sorted(costs, reverse=True)
    need = sum(worst[:k])
    known = [f for f in job.all_gather_object(available_memory(job.device)) if f is not None]
    free = min(known) if known else None  # the tightest rank's: every rank decides alike
    gib = 2**30
    say(
        f"memory: {min(costs) / 2**20:.0f}-{max(costs) / 2**20:.0f} MiB per adapter in training (activations of its "
        f"micro-batch at its longest, its trained tensors and their optimizer state); {k} at a time need about "
        f"{need / gib:.2f} GiB" + (f" of {free / gib:.1f} GiB free on {job.device}" if free is not None else "")
    )
    if free is not None and need > HEADROOM * free:
        fits, total = 0, 0
        for c in worst:
            if total + c > HEADROOM * free:
                break
            fits, total = fits + 1, total + c
        hint = f"set sweep.max_concurrent={fits}" if fits else "use smaller train.batch_size or data.max_length"
        raise UserError(
            f"the sweep would train {k} adapters at a time, which need about {need / gib:.2f} GiB (activations grow "
            f"with adapters x batch x tokens), but {job.device} has {free / gib:.2f} GiB free; {hint}"
        )
    return k
