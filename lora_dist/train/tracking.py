"""Every side effect of a run that only rank 0 may have: printing, progress, files, metric sinks.

`RunOutput` is what rank 0 gets; every other rank gets `NullOutput`, which has the same methods and does
nothing, so the training loop never asks which rank it is on.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

import yaml
from tqdm import tqdm

from ..config import Config, load_yaml
from ..errors import UserError
from ..files import write_atomic
from ..rank_zero import is_rank_zero
from .provenance import git_info
from .wandb_sink import open_wandb

T = TypeVar("T")

RESULT_FILES = (
    "results.json",
    "metrics.jsonl",
    "checkpoints",
    "adapter",
    "weights",
    "adapter-last",  # train.select: the last step's adapter, beside the selected one
    "weights-last",
    "config.yaml",
    "report.md",
    "plots",
    "splits",
    "wandb",
    "wandb_run_id",
)


class MetricSink(Protocol):
    def log(self, record: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """`metrics.jsonl`: one object per line, appended (a resumed run keeps its history), flushed each line."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class Progress:
    """A tqdm bar on a terminal; a plain line every `every` steps on a file or pipe."""

    def __init__(self, stream: TextIO | None = None, every: int = 10):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every
        self.bar: tqdm | None = None

    def update(self, step: int, total: int, epoch: int, epochs: int, loss: float, ex_per_s: float) -> None:
        if self.tty:
            bar = self.bar
            if bar is None:
                bar = self.bar = tqdm(
                    total=total, initial=step - 1, file=self.stream, unit="step", dynamic_ncols=True, leave=False
                )
            bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{ex_per_s:.1f}", refresh=False)
            bar.update(step - bar.n)
        elif step % self.every == 0 or step == total:
            text = f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss:.4f} {ex_per_s:.1f} ex/s"
            print(text, file=self.stream, flush=True)

    def task(self, what: str, total: int) -> Callable[[], None]:
        """Progress through a long task of `total` batches (the final evaluation): call the result once a batch.
        A bar on a terminal; on a file or pipe a plain line at each quarter."""
        self.clear()
        if self.tty:
            self.bar = tqdm(total=total, file=self.stream, desc=what, unit="batch", dynamic_ncols=True, leave=False)
            return lambda: self.bar.update(1) if self.bar is not None else None
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if 4 * done // max(total, 1) > 4 * (done - 1) // max(total, 1):
                print(f"{what}: {min(done, total)}/{total} batches", file=self.stream, flush=True)

        return tick

    def clear(self) -> None:
        """Take the bar off the screen before other output (it comes back at the next update)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunOutput:
    """Rank 0's view of the run directory, the console and the metric sinks."""

    active = True

    def __init__(self, run_dir: Path, log_every: int = 10):
        self.dir = Path(run_dir)
        self.sinks: list[MetricSink] = []
        self.progress_bar = Progress(every=log_every)
        self.lock: int | None = None

    def claim(self, overwrite: bool, resume: bool) -> None:
        """Lock the run directory for the whole run, and prepare it (`prepare_run_dir`)."""
        self.lock = prepare_run_dir(self.dir, overwrite, resume)

    # -- console
    def print(self, *args: Any) -> None:
        self.progress_bar.clear()
        print(*args, flush=True)

    def progress(self, *, step: int, total: int, epoch: int, epochs: int, loss: float, ex_per_s: float) -> None:
        self.progress_bar.update(step, total, epoch, epochs, loss, ex_per_s)

    def task(self, what: str, total: int) -> Callable[[], None]:
        return self.progress_bar.task(what, total)

    # -- metrics
    def add_sink(self, sink: MetricSink) -> None:
        self.sinks.append(sink)

    def start(self, cfg: Config, info: dict, **wandb_args: Any) -> None:
        """Once the model is built: the W&B run when configured (`wandb_sink.py`; `wandb_args` go to
        wandb.init), then the start record (info + git commit) to every sink."""
        info = {**info, **git_info()}
        sink = open_wandb(cfg, self.dir, info, say=self.print, **wandb_args)
        if sink is not None:
            self.add_sink(sink)
        self.log({"event": "start", **info})

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        for sink in self.sinks:
            sink.log(record)

    # -- files (each written to a temporary name, then renamed: a reader never sees half a file)
    def path(self, name: str) -> Path:
        return self.dir / name

    def write_text(self, name: str, text: str) -> Path:
        return write_atomic(self.dir / name, text)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a file-writing function on rank 0 only (e.g. writing a checkpoint's rank-0 part)."""
        return fn(*args, **kw)

    def close(self) -> None:
        self.progress_bar.clear()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.lock is not None:
            os.close(self.lock)  # releases the run directory's lock
            self.lock = None


class AdapterOutput(RunOutput):
    """Rank 0's output for one adapter of a sweep (`train/sweep.py`): its own run directory, metrics and W&B run
    (one of several open at once), its lines on the console marked with its name, and no progress bar of its
    own (the sweep shows one for all)."""

    def __init__(self, run_dir: Path, name: str):
        super().__init__(run_dir)
        self.name = name

    def print(self, *args: Any) -> None:
        text = " ".join(map(str, args))
        super().print("\n".join(f"[{self.name}] {line}" for line in text.splitlines()))

    def progress(self, *, step: int, total: int, epoch: int, epochs: int, loss: float, ex_per_s: float) -> None:
        pass

    def task(self, what: str, total: int) -> Callable[[], None]:
        return super().task(f"[{self.name}] {what}", total)

    def start(self, cfg: Config, info: dict, **wandb_args: Any) -> None:
        super().start(cfg, info, reinit="create_new", one_line=True, **wandb_args)


class NullOutput:
    """What every rank but 0 gets: RunOutput's methods, each written out (a misspelt one is an AttributeError
    here too), none with an effect. With `quiet`, Python warnings and logging below ERROR are silenced while
    it is open (the same warning from every rank is noise when rank 0 prints it once); `close` puts them back."""

    active = False

    def __init__(self, run_dir: Path, quiet: bool = False):
        self.dir = Path(run_dir)
        self._quieted: tuple[Any, int] | None = None
        if quiet:
            self._quieted = (warnings.filters[:], logging.root.manager.disable)
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)

    def claim(self, overwrite: bool, resume: bool) -> None:
        pass

    def print(self, *args: Any) -> None:
        pass

    def progress(self, *, step: int, total: int, epoch: int, epochs: int, loss: float, ex_per_s: float) -> None:
        pass

    def task(self, what: str, total: int) -> Callable[[], None]:
        return lambda: None

    def add_sink(self, sink: MetricSink) -> None:
        pass

    def start(self, cfg: Config, info: dict, **wandb_args: Any) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_text(self, name: str, text: str) -> None:
        pass

    def write_json(self, name: str, obj: Any) -> None:
        pass

    def call(self, fn: Callable[..., object], *args: Any, **kw: Any) -> None:
        """Rank 0 alone writes: nothing runs here."""

    def close(self) -> None:
        if self._quieted is not None:
            filters, level = self._quieted
            warnings.filters[:] = filters  # type: ignore[index]
            logging.disable(level)
            self._quieted = None


def output_for(rank: int, run_dir: Path, log_every: int) -> RunOutput | NullOutput:
    """Rank 0's `RunOutput`, every other rank's `NullOutput`, which quiets the libraries' warnings and logging on
    its rank until it is closed (DeepSpeed's "Setting accelerator", torch's deprecations). Errors still print."""
    if is_rank_zero(rank):
        return RunOutput(run_dir, log_every)
    return NullOutput(run_dir, quiet=True)


def prepare_run_dir(
    run_dir: Path, overwrite: bool, resume: bool, names: tuple[str, ...] = RESULT_FILES, what: str = "a training run"
) -> int | None:
    """Lock `run_dir` (`lock_run_dir`), then refuse to clobber a finished or started run (what its `names` make)
    unless told to overwrite or resume (rank 0 only). Returns the lock's file descriptor, to be closed when the
    run ends.

    Only a directory that a run (or a sweep, `what`) wrote is replaced or deleted: one whose config.yaml is a
    run's (`what_run_dir_holds`); any other that holds files of those names is refused, overwrite=true or not.

    A run that failed before its first step (missing weights, a bad data file) leaves only its start files
    (config.yaml, a metrics.jsonl without a step, splits/); they are no run, and its rerun replaces them."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file, not a directory; pass another output_dir=...")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"output_dir {run_dir} cannot be created or written ({e.strerror or type(e).__name__}); "
            f"pass an output_dir=... in a writable place, e.g. output_dir=runs/my-run"
        ) from e
    lock = lock_run_dir(run_dir)
    try:
        found = [n for n in names if (run_dir / n).exists()]
        if found:
            held = what_run_dir_holds(run_dir)
            if held is None:
                raise UserError(
                    f"output_dir {run_dir} holds {', '.join(found)}, but no config.yaml that a lora-dist run or sweep "
                    f"wrote: it is not a lora-dist run, and lora-dist replaces or deletes only what it wrote; pass "
                    f"another output_dir=..., or move those files away"
                )
            if held != what:
                raise UserError(
                    f"output_dir {run_dir} holds {held}, not {what} ({', '.join(found)}); pass another output_dir=..."
                )
        if found and names == RESULT_FILES and failed_start(run_dir):
            _remove(run_dir, [n for n in RESULT_FILES if (run_dir / n).exists()])
        found = [n for n in names if (run_dir / n).exists()]
        if found and not (overwrite or resume):
            raise UserError(
                f"output_dir {run_dir} already holds {what} ({', '.join(found)}); pass train.resume=auto to continue "
                f"it, overwrite=true to replace it, or another output_dir=..."
            )
        if found and overwrite and not resume:
            _remove(run_dir, found)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return lock


def what_run_dir_holds(run_dir: Path) -> str | None:
    """ "a training run" or "a sweep" when `run_dir`'s config.yaml is the resolved config one wrote (it is the
    first file a run writes, and holds every section of the config; a sweep's has a sweep: section too), else
    None: the directory is not lora-dist's."""
    try:
        raw = load_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not (isinstance(raw, dict) and {f.name for f in dataclasses.fields(Config)} <= raw.keys()):
        return None
    return "a sweep" if "sweep" in raw else "a training run"


def lock_run_dir(run_dir: Path) -> int | None:
    """An exclusive `flock` on the directory itself, held by this process until it closes the returned file
    descriptor or dies (the kernel releases it then: a killed run leaves no stale lock, and no lock file). A second
    training into the same output_dir is refused while the first runs. None where the file system has no locks."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise UserError(
            f"output_dir {run_dir} is in use by another lora-dist training, which holds its lock; wait for that run "
            f"to end (train.resume=auto then continues it), or pass another output_dir=..."
        ) from e
    except OSError:  # no flock here (some network file systems): run unlocked, as before
        os.close(fd)
        return None
    return fd


# What a start that failed before step 1 leaves behind; anything else (results, adapter, checkpoints, a
# report, a logged step) is a run worth keeping.
START_FILES = ("metrics.jsonl", "config.yaml", "splits", "wandb", "wandb_run_id")


def failed_start(run_dir: Path) -> bool:
    """Whether `run_dir` holds only what a run that never took a step leaves: a metrics.jsonl without any
    step record, and nothing but start files beside it."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    if any((run_dir / n).exists() for n in RESULT_FILES if n not in START_FILES):
        return False
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return False
    return all(isinstance(r, dict) and "step" not in r for r in records)


def _remove(run_dir: Path, names: list[str]) -> None:
    for n in names:
        p = run_dir / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
