"""A sweep's joint checkpoints: every adapter in training, at one sweep step, in one atomic checkpoint.

    lora-dist sweep --config configs/sweep-smoke.yaml train.resume=auto     # continue where it stopped

`RUN/checkpoints/step-00000120/` is written as a run's checkpoint is (`checkpoint.py`: staged, hashed, renamed
into place, the last K kept) and holds, beside the job's random states and `state.json`,
`adapters/NAME/{adapter,optimizer,rng}.safetensors` for each adapter in training: its tensors, its optimizer's
state and its own random state on every rank. `state.json` gives the sweep step, each adapter's status
(queued, training, done, failed) and each one's place in its data. A sweep resumes all adapters from the same
step, in the same order, so that it continues as if never stopped: kill -9 and resume give the same adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from ..errors import UserError
from . import checkpoint as ckpt
from .backend import Strategy
from .sweep_config import AdapterPlan, SweepPlan
from .tracking import NullOutput, RunOutput, prepare_run_dir

# What a sweep leaves in its directory (each adapter's run is under adapters/).
SWEEP_FILES = ("sweep.json", "sweep.md", "metrics.jsonl", "config.yaml", "checkpoints", "adapters", "plots")


class OwnState(Protocol):
    """An adapter's own random state (`sweep.OwnRNG`)."""

    state: list[torch.Tensor] | None


class Logs(Protocol):
    def log(self, record: dict) -> None: ...


class SweepAdapter(Protocol):
    """What a joint checkpoint reads and restores of one adapter in training (`sweep.AdapterRun`)."""

    @property
    def plan(self) -> AdapterPlan: ...
    @property
    def adapter_names(self) -> list[str]: ...
    @property
    def rng(self) -> OwnState: ...
    @property
    def strategy(self) -> Strategy: ...
    @property
    def out(self) -> Logs: ...
    @property
    def step(self) -> int: ...
    def stage_selection(self, staging: Path) -> None: ...
    def progress(self) -> dict: ...
    def restore(self, path: Path, state: dict) -> None: ...


class SweepState(Protocol):
    """What a joint checkpoint holds of a sweep (`sweep.Sweep`), and what resuming sets: its step, each
    adapter's status, errors and pruning, and the adapters in training."""

    step: int
    due: bool
    examples: int
    seconds: float
    status: list[str]
    errors: dict[int, str]
    rungs: dict[str, dict[str, float]]
    pruned: dict[int, dict]

    @property
    def plan(self) -> SweepPlan: ...
    @property
    def out(self) -> RunOutput | NullOutput: ...
    @property
    def job(self) -> Strategy: ...
    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    @property
    def runs(self) -> Mapping[int, SweepAdapter]: ...
    def start(self, number: int) -> SweepAdapter: ...


def prepare_dir(run_dir: Path, overwrite: bool, resume: bool) -> int | None:
    """Rank 0: lock the sweep's directory (held until the process ends: a second sweep into it is refused), and
    refuse to clobber a sweep unless told to overwrite or resume it. Returns the lock's file descriptor."""
    return prepare_run_dir(run_dir, overwrite, resume, SWEEP_FILES, "a sweep")


def save(sweep: SweepState) -> None:
    """Every rank: one checkpoint of the whole sweep (`sweep.Sweep`) at its current step."""
    sweep.due = False
    out, job = sweep.out, sweep.job

    def fill(staging: Path) -> ckpt.Contents:
        own = job.all_gather_object({n: a.rng.state for n, a in sweep.runs.items()})  # per rank
        adapters = {}
        for n, a in sweep.runs.items():
            tensors, optimizer = a.strategy.adapter_state(a.adapter_names), a.strategy.optimizer_state()
            states = [o[n] for o in own]
            meta = out.call(_write_adapter, staging / "adapters" / a.plan.name, tensors, optimizer, states)
            out.call(a.stage_selection, staging / "adapters" / a.plan.name)  # train.select's best adapter so far
            adapters[a.plan.name] = {**a.progress(), "optimizer": meta}
        names = [p.name for p in sweep.plan.adapters]
        state = {
            "step": sweep.step,
            "identity": sweep.plan.identity(),
            "status": dict(zip(names, sweep.status, strict=True)),
            "errors": {names[i]: e for i, e in sweep.errors.items()},
            "training": [a.plan.name for a in sweep.runs.values()],  # in batch order
            "adapters": adapters,
            "examples": sweep.examples,
            "seconds": sweep.seconds,
            "rungs": sweep.rungs,  # sweep.prune's record
            "pruned": {names[i]: v for i, v in sweep.pruned.items()},
            "world_size": sweep.world,
            "config": sweep.plan.resolved,
        }
        return ckpt.Contents(adapter={}, optimizer=None, meta=state)  # the adapters' files are staged above

    ckpt.save(out, job, sweep.step, sweep.plan.cfg.train.keep_checkpoints, fill)


def _write_adapter(directory: Path, tensors: dict, optimizer: dict | None, states: list) -> dict | None:
    meta = ckpt.write_trainable(directory, tensors, optimizer)
    save_file(
        {f"rank{r}.{i}": t for r, st in enumerate(states) for i, t in enumerate(st)}, str(directory / "rng.safetensors")
    )
    return meta


def resume(sweep: SweepState) -> None:
    """Every rank: the sweep as its newest valid checkpoint holds it (`train.resume`), if there is one."""
    cfg, out = sweep.plan.cfg, sweep.out
    found = ckpt.resolve(cfg.train.resume, out.dir, say=out.print, kind="sweep")
    if found is None:
        return
    path, state = found
    if state.get("identity") != sweep.plan.identity():
        raise UserError(
            f"checkpoint {path} was written by another sweep (other adapters or settings); resume it with the "
            f"config and overrides it was started with, or pass overwrite=true to start again"
        )
    if set(state["status"]) != {p.name for p in sweep.plan.adapters}:
        raise UserError(f"checkpoint {path} names other adapters than this sweep's; pass overwrite=true to start again")
    ckpt.restore_rng(path, state, sweep.rank, sweep.world, say=out.print)
    sweep.step, sweep.examples, sweep.seconds = state["step"], state["examples"], state["seconds"]
    number = {p.name: i for i, p in enumerate(sweep.plan.adapters)}
    for name, status in state["status"].items():
        sweep.status[number[name]] = "queued" if status == "training" else status
    sweep.errors = {number[name]: e for name, e in state["errors"].items()}
    sweep.rungs = dict(state.get("rungs") or {})
    sweep.pruned = {number[name]: v for name, v in (state.get("pruned") or {}).items() if name in number}
    for name in state["training"]:
        a = sweep.start(number[name])
        d = path / "adapters" / name
        a.restore(d, state["adapters"][name])
        saved = ckpt.load_tensors(d, "rng.safetensors")
        rank = sweep.rank if f"rank{sweep.rank}.0" in saved else 0  # more ranks than it was written by
        a.rng.state = [saved[k] for k in sorted(k for k in saved if k.startswith(f"rank{rank}."))]
        a.out.log({"event": "resume", "step": a.step, "checkpoint": str(path)})
    out.print(f"resumed from {path} (sweep step {sweep.step}; {len(state['training'])} adapters in training)")
    out.log({"event": "resume", "step": sweep.step, "checkpoint": str(path)})
