"""Model selection and early stopping: `train.select` and `train.early_stop`.

    lora-dist train --config configs/smoke.yaml train.select.metric=val_macro_f1 train.early_stop.patience=3

At every `train.eval_every` step (1, 51, 101, ...) and at the last step, the run evaluates the whole validation
split (or its first `train.select.examples` messages, a fixed subset), not the 5-batch estimate. With
`train.select` the adapter of the best evaluation is what the run writes to `adapter/` (HF Trainer's
`load_best_model_at_end`); the last step's goes to `adapter-last/`. With `train.early_stop` the run ends,
checkpointed, after `patience` evaluations without an improvement of more than `min_delta` (HF's
`EarlyStoppingCallback`). Every rank computes the metric from the same all-reduced counts, and the stop flag is
all-reduced too, so all ranks stop at the same step. The state here (and the best adapter's tensors) is part of
every checkpoint, so a resumed run picks the same step as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import TrainConfig
from ..scores import scores
from .backend import Strategy
from .deepspeed_strategy import import_deepspeed

BEST_FILE = "best.safetensors"  # in a checkpoint (or a sweep's adapter directory in one): the best adapter so far


def metric_value(metric: str, ev: dict, labels: Sequence[str]) -> float:
    """`metric` (val_loss, val_accuracy or val_macro_f1) of an evaluation (`Trainer.evaluate`'s dict)."""
    if metric == "val_loss":
        return float(ev["loss"])
    if metric == "val_accuracy":
        return float(ev["accuracy"])
    return float(scores(ev["confusion"], list(labels))["macro"]["f1"])


class Selection:
    """The best evaluation so far, the evaluations without improvement, and whether the run stopped early."""

    def __init__(self, t: TrainConfig):
        self.keeps_best = t.select is not None
        self.metric = t.select.metric if t.select else "val_loss"
        self.mode = t.select.direction if t.select else "min"
        self.examples = t.select.examples if t.select else None
        self.patience = t.early_stop.patience if t.early_stop else None
        self.min_delta = t.early_stop.min_delta if t.early_stop else 0.0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.waited = 0  # evaluations since the last improvement of more than min_delta
        self.stopped = False  # early stopping ended the run
        self.history: list[dict] = []  # {"step", metric: value}
        self.best_tensors: dict[str, torch.Tensor] | None = None  # the best adapter (rank 0's copy matters)

    @staticmethod
    def wanted(t: TrainConfig) -> bool:
        return t.select is not None or t.early_stop is not None

    def due(self, step: int, eval_every: int, total_steps: int) -> bool:
        return (step - 1) % eval_every == 0 or step >= total_steps

    def _gain(self, value: float, reference: float) -> float:
        """How much better `value` is than `reference` (positive: better)."""
        return reference - value if self.mode == "min" else value - reference

    def observe(self, step: int, value: float) -> bool:
        """Take an evaluation's value; True when it is the new best (strictly better, as HF's Trainer)."""
        self.history.append({"step": step, self.metric: value})
        if not math.isfinite(value):
            improved = False
        elif self.best_value is None:
            improved = True
        else:
            improved = self._gain(value, self.best_value) > 0
        if self.best_value is None or improved and self._gain(value, self.best_value) > self.min_delta:
            self.waited = 0
        else:
            self.waited += 1
        if improved:
            self.best_value, self.best_step = value, step
        return improved

    def should_stop(self) -> bool:
        return self.patience is not None and self.waited >= self.patience

    # -------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """What a checkpoint's state.json holds of it."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "waited": self.waited,
            "stopped": self.stopped,
            "history": self.history,
        }

    def load(
        self, state: dict | None, directory: Path, load_tensors: Callable[[Path, str], dict[str, torch.Tensor]]
    ) -> None:
        """The state a checkpoint (`directory`, its `state.json` part `state`) holds; nothing if it has none."""
        if not state:
            return
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        self.waited, self.stopped = int(state.get("waited", 0)), bool(state.get("stopped", False))
        self.history = list(state.get("history", []))
        if self.keeps_best and (Path(directory) / BEST_FILE).is_file():
            self.best_tensors = load_tensors(directory, BEST_FILE)

    def summary(self, last_step: int) -> dict:
        """results.json's `selection`: what was chosen, and why."""
        last = self.history[-1] if self.history else None
        chosen = self.best_step if self.keeps_best and self.best_step is not None else last_step
        return {
            "metric": self.metric,
            "mode": self.mode,
            "examples": self.examples,  # null: the whole validation split
            "kept": "best" if self.keeps_best else "last",
            "chosen_step": chosen,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "last_step": last_step,
            "last_value": last[self.metric] if last and last["step"] == last_step else None,
            "early_stop": None
            if self.patience is None
            else {"patience": self.patience, "min_delta": self.min_delta, "stopped": self.stopped},
            "evaluations": self.history,
        }


def write_best(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The best adapter so far, into a checkpoint being written (hashed with its other files)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(directory) / BEST_FILE))


def load_into(strategy: Strategy, tensors: dict[str, torch.Tensor]) -> None:
    """Put `tensors` (an adapter of this run) into the model that evaluates, on every rank. DeepSpeed keeps its
    trained tensors in its engine (partitioned under ZeRO-3): they are gathered, set on every rank and
    partitioned again; training is over, so its optimizer's master copy is left as it is."""
    if strategy.name != "deepspeed":
        strategy.load_adapter(tensors, source="the best evaluation (train.select)")
        return
    deepspeed = import_deepspeed()
    params = dict(strategy.module.named_parameters())
    chosen = [params[n] for n in tensors]
    with deepspeed.zero.GatheredParameters(chosen, modifier_rank=0), torch.no_grad():
        for name, p in zip(tensors, chosen, strict=True):
            p.data.copy_(tensors[name].to(p.device, p.dtype))
