"""Checkpoints: written atomically, verified before use, the last K kept.

A checkpoint is a directory `checkpoints/step-00000130/` holding
- `adapter.safetensors`: the LoRA tensors and the head;
- `optimizer.safetensors`: the optimizer's tensors (absent under DeepSpeed, whose ZeRO shards sit in
  `deepspeed/`, one file per rank, written by DeepSpeed itself);
- `rng.safetensors`: every rank's torch (and CUDA) generator state;
- `state.json`, written last: step, epoch, position in the epoch, Python/NumPy RNG states, the resolved
  config, and the sha256 of every other file.
It is built under `checkpoints/.tmp-step-.../` and renamed into place, so a crash mid-write never leaves
something that looks like a good checkpoint; a checkpoint whose files do not match their hashes is named
and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import WRITE_ERRORS, sha256, write_error

STATE = "state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-step-{step:08d}"


def begin(staging: Path) -> None:
    """Rank 0: an empty staging directory (left-overs of a crashed write are removed)."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)


class Comm(Protocol):
    """What the sequence asks of the job's processes (a strategy)."""

    def all_gather_object(self, obj: Any) -> list: ...
    def barrier(self) -> None: ...


class Out(Protocol):
    """What the sequence asks of the run's output (`tracking.RunOutput` on rank 0, `NullOutput` elsewhere)."""

    dir: Path

    def call(self, fn: Callable, *args: Any, **kw: Any) -> Any: ...
    def log(self, record: dict) -> None: ...


@dataclass(frozen=True)
class Contents:
    """What `commit` writes beside the files already staged: the trained tensors, the optimizer's state (None
    when sharded or written with the files) and state.json's fields."""

    adapter: dict
    optimizer: dict | None
    meta: dict


def save(out: Out, comm: Comm, step: int, keep: int, fill: Callable[[Path], Contents]) -> Path | None:
    """Every rank: the one checkpoint sequence, of a run (`Trainer.save_checkpoint`) and of a sweep
    (`sweep_state.save`). Rank 0 begins the staging directory; every rank's random state is gathered; after a
    barrier `fill(staging)` runs on every rank (its collectives, such as a sharded strategy's state, and rank
    0's writes through `out.call`) and gives what rank 0 commits; a barrier, so that no rank runs ahead of a
    checkpoint that is not yet in place; rank 0 logs it. Returns the checkpoint's path on rank 0."""
    staging = staging_dir(out.dir, step)
    out.call(begin, staging)
    rng = comm.all_gather_object(rng_state())
    comm.barrier()
    c = fill(staging)
    path = out.call(commit, staging, adapter=c.adapter, optimizer=c.optimizer, rng_states=rng, meta=c.meta, keep=keep)
    comm.barrier()
    if path is not None:
        out.log({"event": "checkpoint", "step": step, "path": str(path)})
    return path


def commit(
    staging: Path, *, adapter: dict, optimizer: dict | None, rng_states: list[dict], meta: dict, keep: int
) -> Path:
    """Rank 0: write the files, then state.json with their hashes, fsync, rename into place, prune. Files
    already in `staging` (DeepSpeed's shards, a sweep's adapters) are hashed with the rest. A write that fails (a
    full disk) removes the staging directory and is one UserError; earlier checkpoints stay as they were."""
    py_np = []
    rng: dict[str, torch.Tensor] = {}
    for r, st in enumerate(rng_states):
        py_np.append({"python": st["python"], "numpy": st["numpy"]})
        rng[f"rank{r}.torch"] = st["torch"]
        for i, t in enumerate(st["cuda"]):
            rng[f"rank{r}.cuda{i}"] = t
    try:
        opt_meta = write_trainable(staging, adapter, optimizer)
        save_file(rng, str(staging / "rng.safetensors"))
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        hashes = {str(p.relative_to(staging)): sha256(p) for p in files}
        state = dict(meta, optimizer=opt_meta, rng=py_np, files=hashes)
        (staging / STATE).write_text(json.dumps(state, indent=1))
        for p in list(staging.rglob("*")):
            if p.is_file():
                _fsync(p)
    except WRITE_ERRORS as e:
        shutil.rmtree(staging, ignore_errors=True)
        optimizer_tensors = [
            v for st in (optimizer or {}).get("state", {}).values() for v in st.values() if torch.is_tensor(v)
        ]
        needed = sum(t.nbytes for t in [*adapter.values(), *rng.values(), *optimizer_tensors])
        fix = "earlier checkpoints are intact: free some space, then resume with train.resume=auto"
        raise write_error(staging.parent, needed, e, f"checkpoint {staging.name.removeprefix('.tmp-')}", fix) from e
    final = staging.parent / staging.name.removeprefix(".tmp-")
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    prune(final.parent, keep)
    return final


def write_trainable(directory: Path, adapter: dict, optimizer: dict | None) -> dict | None:
    """adapter.safetensors and, given an optimizer state, optimizer.safetensors in `directory`; returns the
    optimizer state's other values (for state.json), or None."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(directory / "adapter.safetensors"))
    if optimizer is None:
        return None
    tensors, meta = _flatten_optimizer(optimizer)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    return meta


def prune(ckpt_dir: Path, keep: int) -> None:
    for old in sorted(_candidates(ckpt_dir))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _candidates(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(path: Path, kind: str = "train") -> dict:
    """The checkpoint's state.json if it is one a run of this kind ("train" or "sweep") wrote and every file
    matches its hash; else UserError naming what is wrong."""
    sf = path / STATE
    try:
        state = json.loads(sf.read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"checkpoint {path} is corrupt or incomplete ({STATE}: {type(e).__name__})") from e
    why = _state_problem(state, path, kind)
    if why:
        raise UserError(f"checkpoint {path} is corrupt ({STATE}: {why})")
    for rel, digest in files.items():
        p = path / rel
        if not p.is_file():
            raise UserError(f"checkpoint {path} is incomplete ({rel} is missing)")
        if sha256(p) != digest:
            raise UserError(f"checkpoint {path} is corrupt ({rel} does not match its sha256)")
    return state


# The whole-number counts and the seconds each kind of run writes: a training run's, a sweep's (train/sweep_state.py).
COUNTS = {"train": ("step", "epoch", "step_in_epoch", "examples_seen", "tokens_seen"), "sweep": ("step", "examples")}
SECONDS = {"train": "train_seconds", "sweep": "seconds"}
MAX_COUNT = 2**53  # what a JSON number holds exactly; every count a run writes is far below


def _state_problem(state: dict, path: Path, kind: str) -> str | None:
    """What in a checkpoint's state.json no run of this kind writes, or None: counts that are not whole numbers
    >= 0, a file named outside the checkpoint, random states that do not restore."""
    files = state.get("files")
    if not isinstance(files, dict) or not {"adapter.safetensors", "rng.safetensors"} <= set(files):
        return "files must name adapter.safetensors and rng.safetensors"
    for rel, digest in files.items():
        if not _inside(path, rel) or not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
            return f"files names {rel!r:.80}, which is not a file inside the checkpoint with a sha256"
    for k in COUNTS[kind]:
        v = state.get(k)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT):
            return f"{k} must be a whole number from 0 to 2**53, not {v!r:.40}"
    seen = "examples_seen" if kind == "train" else "examples"
    if state[seen] < state["step"]:  # every step takes at least one example: a step no run reached
        return f"step {state['step']} is past the {state[seen]} examples the run has seen"
    if kind == "train" and (state["step_in_epoch"] > state["step"] or state["epoch"] > state["step"]):
        return f"step_in_epoch {state['step_in_epoch']} and epoch {state['epoch']} cannot exceed step {state['step']}"
    if kind == "sweep":
        why = _sweep_problem(state)
        if why:
            return why
    digest = state.get("data_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        return f"data_sha256 must be 64 hex digits, not {digest!r:.40}"
    t = state.get(SECONDS[kind])
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
        return f"{SECONDS[kind]} must be a number of seconds >= 0, not {t!r:.40}"
    rng = state.get("rng")
    if not isinstance(rng, list) or not rng:
        return "rng must list each rank's random states"
    for r, st in enumerate(rng):
        try:  # on scratch generators: the process's own are untouched
            random.Random().setstate(_python_state(st["python"]))
            np.random.RandomState().set_state(_numpy_state(st["numpy"]))
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            return f"rank {r}'s random state does not restore ({type(e).__name__})"
    return None


def _sweep_problem(state: dict) -> str | None:
    """What in a sweep's state.json no sweep writes: each adapter's status, those in training and their states."""
    status, training, adapters, errors = (state.get(k) for k in ("status", "training", "adapters", "errors"))
    if not (
        isinstance(status, dict)
        and all(v in ("queued", "training", "done", "failed", "pruned") for v in status.values())
    ):
        return "status must give each adapter queued, training, done, failed or pruned"
    if not (isinstance(training, list) and all(isinstance(n, str) and status.get(n) == "training" for n in training)):
        return "training must list the adapters whose status is training"
    if not (isinstance(adapters, dict) and all(isinstance(adapters.get(n), dict) for n in training)):
        return "adapters must hold the state of each adapter in training"
    if not (isinstance(errors, dict) and set(errors) <= set(status)):
        return "errors must name adapters of the sweep"
    return None


def _inside(path: Path, rel: object) -> bool:
    """Whether `rel` names a file inside the checkpoint directory `path` (no absolute path, no '..', no link out)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return False
    root = path.resolve()
    return (root / rel).resolve().is_relative_to(root)


def latest_valid(run_dir: Path, say: Callable[[str], None] = print, kind: str = "train") -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; corrupt ones are named and skipped."""
    for path in reversed(_candidates(checkpoints_dir(run_dir))):
        try:
            return path, verify(path, kind)
        except UserError as e:
            say(f"warning: {e}; falling back to the previous checkpoint")
    return None


def resolve(
    resume: str, run_dir: Path, say: Callable[[str], None] = print, kind: str = "train"
) -> tuple[Path, dict] | None:
    """`train.resume`: never | auto (newest valid in this run) | a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_valid(run_dir, say, kind)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(
            f"train.resume={resume} is not a checkpoint directory; use auto, never, or a path like {checkpoints_dir(run_dir)}/step-00000100"
        )
    return path, verify(path, kind)


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {path}: {name} cannot be read ({e})") from e


# ---------------------------------------------------------------------------------- optimizer state


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    # A learning rate held as a tensor (the CUDA-graph step's, train/graphs.py) is saved as the number it holds.
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state(path: Path, meta: dict) -> dict:
    tensors = load_tensors(path, "optimizer.safetensors")
    state: dict = {}
    for key, t in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's generators: Python, NumPy, torch and (where present) CUDA."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert not isinstance(keys, str)  # legacy=True: the (name, keys, pos, has_gauss, cached) tuple
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(
    path: Path, state: dict, rank: int, world: int | None = None, say: Callable[[str], None] = print
) -> None:
    """This rank's generators as saved. A rank the checkpoint has no state for (more ranks now), or a GPU
    count that differs from the saved one, gets states derived from the saved ones and this rank's number:
    distinct on every rank, the same on every resume. `say` (rank 0's print) names what was not restored."""
    saved = state["rng"]
    world = len(saved) if world is None else world
    tensors = load_tensors(path, "rng.safetensors")
    if world != len(saved):
        fate = (
            f"ranks {len(saved)}-{world - 1} start from new states derived from them"
            if world > len(saved)
            else "the others are dropped"
        )
        say(
            f"warning: checkpoint {path} holds the random states of {len(saved)} rank(s), this run has {world}; {fate} "
            f"(resume with {len(saved)} rank(s) for the exact continuation)"
        )
    if rank >= len(saved):
        seed = _derived_seed(tensors[f"rank{rank % len(saved)}.torch"], rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        return
    random.setstate(_python_state(saved[rank]["python"]))
    np.random.set_state(_numpy_state(saved[rank]["numpy"]))
    try:
        torch.set_rng_state(tensors[f"rank{rank}.torch"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise UserError(
            f"checkpoint {path}: rng.safetensors holds no usable torch random state for rank {rank} "
            f"({type(e).__name__}); resume from another checkpoint (train.resume=PATH)"
        ) from e
    cuda = [
        tensors[k]
        for k in sorted(
            (k for k in tensors if k.startswith(f"rank{rank}.cuda")), key=lambda k: int(k.rsplit("cuda", 1)[1])
        )
    ]
    if not torch.cuda.is_available():
        return
    if len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
        return
    say(
        f"warning: checkpoint {path} holds CUDA random states for {len(cuda)} GPU(s) per rank, this node shows "
        f"{torch.cuda.device_count()}; each rank's CUDA generators start from a new state derived from its saved one"
    )
    torch.cuda.manual_seed_all(_derived_seed(tensors[f"rank{rank}.torch"], rank, salt=b"cuda"))


def _python_state(py: list) -> tuple:
    return (py[0], tuple(py[1]), py[2])


def _numpy_state(npy: list) -> tuple:
    return (npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4])


def _derived_seed(saved: torch.Tensor, rank: int, salt: bytes = b"") -> int:
    """A 63-bit seed from a saved generator state and a rank number (sha256: no two ranks alike)."""
    h = hashlib.sha256(saved.numpy().tobytes() + salt + rank.to_bytes(4, "little"))
    return int.from_bytes(h.digest()[:8], "little") >> 1


# ------------------------------------------------------------------------------------------ helpers


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
