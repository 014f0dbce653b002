"""Weights & Biases from rank 0: one W&B run per job, continued on resume, never fatal to training.

    lora-dist train --config configs/smoke.yaml                              # offline: output_dir/wandb/
    wandb sync runs/smoke/wandb/offline-run-*                                # upload it later
    lora-dist train --config configs/gpt2-small-lora.yaml tracking.wandb.mode=online tracking.wandb.project=spam

`open_wandb` is called once by rank 0 (`RunOutput.start`); no other rank imports wandb, so a job of any
size is one W&B run. The run id is kept in `output_dir/wandb_run_id`: `train.resume=auto` continues that
run (`resume="allow"`). When W&B fails (not installed, no account, no network, a full disk), training
goes on: online falls back to offline, anything else to no W&B, with one warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import string
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..adapter import LAYOUT
from ..config import Config
from ..data import Say
from ..scores import METRICS, scores

RUN_ID_FILE = "wandb_run_id"
# A job id shared by every rank and kept across reruns of the job, most specific first.
GROUP_ENV = ("WANDB_RUN_GROUP", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
INIT_TIMEOUT_S = 30.0  # wandb's own default is 90 s; WANDB_INIT_TIMEOUT overrides either

# metrics.jsonl names -> W&B names (the part before "/" is a section in the W&B UI). Other numeric keys
# pass through unchanged.
KEYS = {
    "train_loss_step": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "examples_per_s": "train/examples_per_s",
    "tokens_per_s": "train/tokens_per_s",
    "allreduce_bytes": "train/allreduce_bytes",
    "step_seconds": "train/step_seconds",
    "gpu_mem_gb": "train/gpu_mem_gb",
    "train_loss": "eval/train_loss",
    "val_loss": "eval/val_loss",
    "train_acc": "eval/train_acc",
    "val_acc": "eval/val_acc",
}
SPLITS = {"train": "train", "validation": "val", "test": "test"}  # results.json confusion key -> key prefix


def resolve_mode(mode: str, env: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(the mode W&B runs in, a warning or None). auto: WANDB_MODE if set, else offline; any mode becomes
    disabled when wandb cannot be imported."""
    if mode == "auto":
        wanted = env.get("WANDB_MODE", "").strip().lower()
        mode = {"dryrun": "offline", "run": "online"}.get(wanted, wanted)
        if mode not in ("online", "offline", "disabled"):
            mode = "offline"
        explicit = False
    else:
        explicit = True
    if mode == "disabled" or _wandb() is not None:
        return mode, None
    note = (
        (
            f"warning: tracking.wandb.mode={mode} but wandb is not installed; training continues without W&B "
            f"(pip install 'lora-dist[wandb]', or set tracking.wandb.mode=disabled)"
        )
        if explicit
        else None
    )
    return "disabled", note


def default_group(env: Mapping[str, str] = os.environ) -> str | None:
    """The launcher's job id: WANDB_RUN_GROUP, else Slurm's job id, else torchrun's run id."""
    for key in GROUP_ENV:
        value = env.get(key, "").strip()
        if value and value != "none":
            return value
    return None


def run_id(run_dir: Path, resume: bool) -> str:
    """The id stored in the run directory when resuming, else a new one (then stored)."""
    path = Path(run_dir) / RUN_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(new + "\n")
    return new


def wandb_record(record: dict) -> dict:
    """A metrics.jsonl record as W&B history: renamed keys, numbers only, no wall-clock time or step."""
    return {
        KEYS.get(k, k): v
        for k, v in record.items()
        if k not in ("time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def summary_of(results: dict) -> dict:
    """W&B summary values from results.json (or the loop's final record), under `final/`: per split
    accuracy, loss and, where the confusion matrix is known, precision, recall and F1 per class (by label
    name, e.g. `final/test_spam_f1`) and macro (`final/test_macro_f1`); and the run's totals (parameters,
    time, throughput)."""
    out = {f"final/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    classes = results.get("classes")
    for split, matrix in (results.get("confusion") or {}).items():
        s = scores(matrix, classes)
        prefix = f"final/{SPLITS.get(split, split)}"
        out |= {f"{prefix}_macro_{m}": s["macro"][m] for m in METRICS}
        out |= {f"{prefix}_{name}_{m}": v[m] for name, v in s["per_class"].items() for m in METRICS}
    return out


def open_wandb(
    cfg: Config, run_dir: Path, info: dict, say: Say = print, one_line: bool = False, **wandb_args: Any
) -> WandbSink | None:
    """Start (or continue) the W&B run for this output_dir; None when W&B is disabled or cannot start.
    `wandb_args` go to wandb.init (a sweep's adapters: reinit="create_new", one run each, open together).
    `one_line`: W&B itself prints nothing; one line through `say` says where the run goes (a sweep's adapters,
    whose lines carry their name)."""
    w = cfg.tracking.wandb
    mode, note = resolve_mode(w.mode)
    if note:
        say(note)
    if mode == "disabled":
        return None
    wandb = _wandb()
    run_dir = Path(run_dir)
    try:
        kwargs = dict(
            project=w.project,
            entity=w.entity,
            name=w.name or run_dir.resolve().name,
            group=w.group or default_group(),
            tags=list(w.tags) or None,
            job_type="train",
            config={**cfg.to_dict(), "run": info},
            id=run_id(run_dir, cfg.train.resume != "never"),
            resume="allow",
            dir=str(run_dir),
            **wandb_args,
        )
        # quiet: W&B says where the run goes when it starts, but prints no 30-line history and summary at the end
        settings = {"quiet": True} | ({} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": INIT_TIMEOUT_S})
        settings |= {"silent": True} if one_line else {}
        kwargs["settings"] = wandb.Settings(**settings)
    except Exception as e:  # noqa: BLE001
        say(f"warning: W&B could not start ({_line(e)}); training continues without W&B")
        return None
    try:
        return _opened(WandbSink(wandb.init(mode=mode, **kwargs), run_dir, say), mode, one_line)
    except Exception as e:  # noqa: BLE001 - W&B must never stop a training run
        if mode != "online":
            say(f"warning: W&B could not start ({_line(e)}); training continues without W&B")
            return None
        say(
            f"warning: W&B online could not start ({_line(e)}); logging offline to {run_dir / 'wandb'} instead "
            f"(upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*)"
        )
    _teardown(wandb)
    try:
        return _opened(WandbSink(wandb.init(mode="offline", **kwargs), run_dir, say), "offline", one_line)
    except Exception as e:  # noqa: BLE001
        say(f"warning: W&B could not start offline either ({_line(e)}); training continues without W&B")
        return None


def _opened(sink: WandbSink, mode: str, one_line: bool) -> WandbSink:
    """The sink, after the one line that says where its run goes (`one_line`; W&B's own lines are off)."""
    if one_line:
        url = getattr(sink.run, "url", None) if mode == "online" else None
        sink.say(f"W&B: {mode} run {getattr(sink.run, 'id', '?')}, " + (url or f"in {sink.dir / 'wandb'}"))
    return sink


class WandbSink:
    """A metric sink (`tracking.MetricSink`) that writes to one W&B run. Any W&B error turns it off with
    one warning."""

    def __init__(self, run: Any, run_dir: Path, say: Say = print):
        self.run, self.dir, self.say = run, Path(run_dir), say
        self.finished = False  # the loop's final record arrived: publish the results at close
        self.noted_old_steps = False

    def log(self, record: dict) -> None:
        if self.run is None or "event" in record:  # start / resume / checkpoint events are not metrics
            return
        try:
            final = {k[len("final_") :]: v for k, v in record.items() if k.startswith("final_")}
            if final:
                self.run.summary.update(summary_of(final))
                self.finished = True
                return
            step = int(record["step"])
            if step < self.run.step:  # a resumed run: W&B already holds these steps; never overwrite them
                if not self.noted_old_steps:
                    self.say(f"note: W&B already holds steps up to {self.run.step}; earlier steps are not logged again")
                    self.noted_old_steps = True
                return
            self.run.log(wandb_record(record), step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        if self.run is None:
            return
        failed = sys.exc_info()[0] is not None  # close() runs in the loop's `finally`
        if self.finished:
            try:
                self._publish()
            except Exception as e:  # noqa: BLE001
                self.say(f"warning: W&B: could not upload the results ({_line(e)})")
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # noqa: BLE001
            self.say(f"warning: W&B: could not finish the run ({_line(e)})")

    def _publish(self) -> None:
        """Summary scores, the plots, and the adapter as a `model` artifact."""
        wandb = _wandb()
        results_path = self.dir / "results.json"
        if results_path.is_file():
            self.run.summary.update(summary_of(json.loads(results_path.read_text())))
        plots = sorted((self.dir / "plots").glob("*.png"))
        if plots:
            self.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        for sub, tensors, desc in LAYOUT.values():  # adapter/ (LoRA) or weights/ (trained layers)
            folder = self.dir / sub
            if not (folder / tensors).is_file():
                continue
            meta = json.loads((folder / desc).read_text()) if (folder / desc).is_file() else {}
            artifact = wandb.Artifact(
                f"{sub}-{self.run.id}",
                type="model",
                metadata=meta,
                description=f"{sub}/: {tensors} + {desc} (lora-dist adapter info describes it)",
            )
            with _data_dir(self.dir / "wandb"):  # wandb copies the files to stage them: keep that copy in the run
                for f in sorted(folder.iterdir()):  # add_dir would print a line of its own
                    artifact.add_file(str(f), name=f.name)
            self.run.log_artifact(artifact)

    def _fail(self, e: Exception) -> None:
        self.say(f"warning: W&B logging failed ({_line(e)}); training continues, W&B logging stops here")
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001
            pass


def _wandb() -> Any:
    try:
        import wandb
    except Exception:  # noqa: BLE001 - missing or broken install
        return None
    return wandb


@contextlib.contextmanager
def _data_dir(path: Path) -> Iterator[None]:
    """WANDB_DATA_DIR (where wandb stages artifact files until they are uploaded) = `path`, unless set."""
    if "WANDB_DATA_DIR" in os.environ:
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(path)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


def _teardown(wandb: Any) -> None:
    """Forget a run that failed to start, so the same id can start again offline."""
    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001
        pass


def _line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
