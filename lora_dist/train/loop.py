"""The one training loop: setup -> train -> finish, for every backend.

    lora-dist train --config configs/gpt2-small-lora.yaml
    torchrun --nproc_per_node=8 -m lora_dist train --config configs/gpt2-small-lora.yaml

Backends differ only in the strategy object (`train/strategy.py`); rank-0 side effects go through `self.out`
(`train/tracking.py`), which is a no-op object on the other ranks.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import adapter as adapters
from ..build import build_model, num_classes, seed_everything
from ..config import Config
from ..data import Batch, inverse_frequency, pad_multiple
from ..device import DistEnv, cpu_threads_text, model_build_device
from ..errors import UserError
from ..lora import adapter_state_dict, count_params
from ..model import GPT2, PADDING_FREE
from ..report import finish_report
from ..token_cache import CachedDataset, RunData, TokenCache, cache_limit, open_cache, run_data, write_split_record
from . import checkpoint as ckpt
from . import selection as selecting
from .backend import Strategy
from .loaders import eval_loader, make_loaders, micro_batch_size
from .registry import make_strategy
from .schedule import lr_at
from .tracking import JsonlSink, output_for


def train_pad_multiple(cfg: Config, strategy: Strategy) -> int:
    """The multiple training batches are padded to (`data.pad_multiple`), for this run's strategy and device."""
    free = cfg.model.causal_mask and cfg.model.pooling in PADDING_FREE
    few_shapes = strategy.use_graphs or cfg.train.compile
    return pad_multiple(cfg.data, strategy.device.type, free, few_shapes)


def read_step(values: list[torch.Tensor | float], width: int = 2) -> list[list[float]]:
    """Device scalars (and plain numbers) as floats, read back in one copy: the step's one host sync.
    Returned in rows of `width` (e.g. [[loss sum, gradient norm], ...] for a sweep's adapters)."""
    tensors = [v.detach().reshape(()).double() for v in values if isinstance(v, torch.Tensor)]
    got = iter(torch.stack(tensors).tolist() if tensors else [])
    flat = [next(got) if isinstance(v, torch.Tensor) else float(v) for v in values]
    return [flat[i : i + width] for i in range(0, len(flat), width)]


class StopRequested:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook): no signal handling
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


EvalPlan = tuple[DataLoader, int]  # (this rank's loader over a split, the forward passes every rank runs)

# Where a run stands: what a checkpoint records and a resumed run takes up again.
PROGRESS = ("step", "epoch", "step_in_epoch", "examples_seen", "tokens_seen", "train_seconds")


class Trainer:
    def __init__(self, cfg: Config, strategy: Strategy | None = None):
        """`strategy`: the backend (default: the one `dist.strategy` names); a sweep gives each adapter a view of
        its own (`train/sweep.py`)."""
        self.cfg = cfg
        env = DistEnv.from_environ()
        run_dir = Path(cfg.output_dir)
        self.out = output_for(env.rank, run_dir, cfg.tracking.log_every)
        self.strategy = strategy or make_strategy(cfg, env)
        self.rank, self.world = self.strategy.rank, self.strategy.world_size
        self.checkpoints = ckpt.checkpoints_dir(run_dir)
        self.checkpointed_at = -1  # the step of the last checkpoint this process wrote

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, resume: bool = True) -> None:
        """Everything before the first step; then, with `resume`, the run continues from its checkpoint
        (train.resume). A sweep's adapters pass False: the sweep resumes them from its joint checkpoint."""
        cfg = self.cfg
        self._claim()
        # Tokenized once per cache directory (one process prepares, the others wait), then memory-mapped.
        cache = open_cache(cfg.data, cache_limit(cfg.data), say=self.out.print)
        model = self._build_model(cache.label_names)
        data = self._read_data(cache, model.cfg.context_length)
        self._make_loaders(data.datasets)
        if cfg.train.compile:  # in place: the forward is compiled, parameter names keep no `_orig_mod.` prefix
            model.compile()
        self.strategy.prepare(model, self.micro, cfg.train.grad_accum)
        self._announce(data.splits)
        self._start_progress(data.datasets["train"])
        if resume:
            self._resume()

    def _claim(self) -> None:
        """Check that every rank has the same config, claim the run directory (locked until the run ends) and
        mark it a run's (config.yaml, metrics.jsonl); seed every generator."""
        cfg, out, s = self.cfg, self.out, self.strategy
        digests = s.all_gather_object(cfg.digest())
        if len(set(digests)) > 1:
            raise UserError(
                f"ranks started with different configs (hashes {sorted(set(digests))}); "
                f"launch every rank with the same config and overrides"
            )
        out.claim(cfg.overwrite, cfg.train.resume != "never")  # locked until the run ends
        s.barrier()
        out.write_text("config.yaml", cfg.to_yaml())  # first: what marks the directory as a run's (tracking.py)
        out.add_sink(JsonlSink(out.path("metrics.jsonl")))
        seed_everything(cfg.train.seed)

    def _build_model(self, labels: tuple[str, ...]) -> GPT2:
        """The model for the data's labels (`build`), with its parameter counts and adapter tensors' names."""
        self.labels = labels
        self.num_classes = num_classes(self.cfg, self.labels)
        self.build_device = model_build_device(self.strategy.device)
        model, self.lora_modules = self.build()
        self.total_params, self.trainable_params = count_params(model)
        self.adapter_names = list(adapter_state_dict(model))
        return model

    def _read_data(self, cache: TokenCache, context_length: int) -> RunData:
        """The run's splits from the token cache; their record written to splits/ and their fingerprint kept."""
        out = self.out
        data = run_data(self.cfg.data, context_length, say=out.print, cache=cache)
        out.call(write_split_record, data, self.cfg.data, out.path("splits"), out.print)
        self.data_sha256 = data.fingerprint
        self.length = data.length
        return data

    def _make_loaders(self, datasets: dict[str, CachedDataset]) -> None:
        """Each rank's loaders and micro-batch size, the evaluation batch, and the steps per epoch and in all."""
        cfg, s, t = self.cfg, self.strategy, self.cfg.train
        self.micro = micro_batch_size(t.batch_size, self.world, t.grad_accum)
        free = cfg.model.causal_mask and cfg.model.pooling in PADDING_FREE
        self.loaders = make_loaders(
            datasets,
            self.length,
            cfg.data,
            self.micro,
            t.grad_accum,
            self.world,
            self.rank,
            t.seed,
            t.num_workers,
            pin_memory=s.device.type == "cuda",
            multiple=train_pad_multiple(cfg, s),
        )
        # Evaluation batches: as in training where padding could change a prediction; on a GPU, where it
        # cannot, 64 messages a pass (a pass costs about the same for 8 or 64).
        self.eval_batch = max(self.micro, 64) if free and s.device.type == "cuda" else self.micro
        self.steps_per_epoch = self.loaders.sampler.steps
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

    def _announce(self, splits: dict) -> None:
        """The run's header on the console, and its start (what it trains, where, how long) to every sink."""
        cfg, s = self.cfg, self.strategy
        self.out.print(self.header(splits))
        self.out.start(
            cfg,
            {
                "model": cfg.model.name,
                "total_params": self.total_params,
                "trainable_params": self.trainable_params,
                "lora_layers": len(self.lora_modules),
                "world_size": self.world,
                "strategy": s.name,
                "device": str(s.device),
                "precision": s.precision,
                "optimizer": s.optimizer_text(),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "data_sha256": self.data_sha256,
            },
        )

    def _start_progress(self, train: CachedDataset) -> None:
        """Where a new run stands (step 0), its best-so-far record (train.select / train.early_stop) and its
        loss's class weights (data.balance=weight)."""
        self.step, self.epoch, self.step_in_epoch, self.examples_seen, self.tokens_seen = 0, 0, 0, 0, 0
        self.train_seconds = 0.0
        self.stepped = False
        # the best evaluation so far (train/selection.py); None when neither train.select nor train.early_stop is set
        t = self.cfg.train
        self.selection = selecting.Selection(t) if selecting.Selection.wanted(t) else None
        self.class_weights(train)

    def header(self, splits: dict) -> str:
        """The lines a run starts with: model and backend, parameters, data and steps."""
        cfg, s, t, length = self.cfg, self.strategy, self.cfg.train, self.length
        return (
            f"lora-dist: {cfg.model.name} ({cfg.model.weights}), {self.world} process(es), strategy {s.name}, "
            f"device {s.device}{cpu_threads_text(s.device)}, precision {s.precision_text()}, optimizer {s.optimizer_text()}\n"
            f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable "
            f"({self._trained_text()}); pooling {cfg.model.pooling}{'' if cfg.model.causal_mask else ', no causal mask'}\n"
            f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; labels {', '.join(self.labels)}; padding {cfg.data.padding}"
            f"{' (' + str(length) + ' tokens)' if cfg.data.padding != 'batch' else ''}; "
            f"global batch {t.batch_size} = {self.world} x {self.micro} x {t.grad_accum}; {self.total_steps} steps"
        )

    def build(self) -> tuple[GPT2, list[str]]:
        """The model to train, and the names of its LoRA layers."""
        return build_model(self.cfg, self.num_classes, device=self.build_device)

    def _trained_text(self) -> str:
        cfg = self.cfg
        if cfg.train.trainable != "lora":
            return f"train.trainable={cfg.train.trainable}, no LoRA"
        return f"{len(self.lora_modules)} LoRA layers, rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, scaling {cfg.lora.scaling}"

    def _resume(self) -> None:
        found = ckpt.resolve(self.cfg.train.resume, self.out.dir, say=self.out.print)
        if found is None:
            return
        path, state = found
        if state.get("world_size") != self.world and self.strategy.shards_state:
            raise UserError(
                f"checkpoint {path} was written by {state.get('world_size')} {self.strategy.name} ranks, not {self.world}; "
                f"resume with the same world size"
            )
        self._check_resumable(path, state)
        self.restore(path, state)
        ckpt.restore_rng(path, state, self.rank, self.world, say=self.out.print)
        self.out.print(
            f"resumed from {path} (step {self.step}, epoch {self.epoch + 1}, {self.step_in_epoch} steps into it)"
        )
        self.out.log({"event": "resume", "step": self.step, "checkpoint": str(path)})

    def _check_resumable(self, path: Path, state: dict) -> None:
        """A checkpoint continues this run only on the data it was trained on (unless train.resume_other_data
        says otherwise) and only where this run's steps reach."""
        saved = state.get("data_sha256")
        if saved is not None and saved != self.data_sha256:
            if not self.cfg.train.resume_other_data:
                raise UserError(
                    f"checkpoint {path} was trained on other data (splits sha256 {saved[:12]}, now "
                    f"{self.data_sha256[:12]}: data.source's file, data.seed or the fractions changed); resume on "
                    f"the data it was trained on, or pass train.resume_other_data=true to continue on this data"
                )
            self.out.print(
                f"warning: checkpoint {path} was trained on other data (splits sha256 {saved[:12]}, now "
                f"{self.data_sha256[:12]}); continuing on this data, as train.resume_other_data=true says"
            )
        if state["step"] > self.total_steps or state["step_in_epoch"] > self.steps_per_epoch:
            raise UserError(
                f"checkpoint {path} is at step {state['step']} ({state['step_in_epoch']} into an epoch), past this "
                f"run's {self.total_steps} steps of {self.steps_per_epoch} per epoch; raise train.epochs or "
                f"train.max_steps to continue it, or start over with overwrite=true"
            )

    def restore(self, path: Path, state: dict) -> None:
        """The trained tensors, the optimizer's state and the place in the data, as checkpoint `path` (with its
        `state.json` read into `state`) holds them."""
        self.strategy.load_adapter(ckpt.load_tensors(path, "adapter.safetensors"), source=str(path))
        if state.get("optimizer") is not None:
            self.strategy.load_optimizer_state(ckpt.optimizer_state(path, state["optimizer"]))
        self.strategy.load_sharded(path)
        for k in PROGRESS:
            setattr(self, k, state[k])
        if self.selection is not None:
            self.selection.load(state.get("selection"), path, ckpt.load_tensors)

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> bool:
        """Run until done (True) or until a stop signal was honoured (False)."""
        s = self.strategy
        stop = StopRequested()
        s.model.train()
        try:
            for batch, boundary in self.micro_batches():
                loss, grad_norm = s.train_micro(batch.to(s.device), boundary, self.lr())  # a CUDA graph where it can
                self.count(loss, batch)
                if grad_norm is not None and not self.end_step(grad_norm, stop.signal is not None):
                    self.out.print(
                        f"stop signal received: checkpoint saved at step {self.step}; exiting (resume with train.resume=auto)"
                    )
                    return False
        finally:
            stop.restore()
        return True

    def done(self) -> bool:
        stopped = self.selection is not None and self.selection.stopped  # train.early_stop ended it
        return self.epoch >= self.cfg.train.epochs or self.step >= self.total_steps or stopped

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        t = self.cfg.train
        return lr_at(self.step, t.lr, self.total_steps, t.schedule, t.warmup_steps)

    def micro_batches(self) -> Iterator[tuple[Batch, bool]]:
        """The training micro-batches from where the run stands to its end, each with whether it ends an
        optimizer step (the accumulation boundary). The caller runs them through the model and calls `count`
        for each, and `end_step` after each optimizer step: `train` above, or a sweep, which runs the
        micro-batches of many runs as one batch."""
        t = self.cfg.train
        while not self.done():
            if self.step_in_epoch >= self.steps_per_epoch:  # an older checkpoint, of an epoch's last step
                self._next_epoch()
                continue
            sampler = self.loaders.sampler
            sampler.set_epoch(self.epoch)
            sampler.start_step = self.step_in_epoch
            self.window = torch.zeros(4, dtype=torch.float64)  # loss sum, batches, stop flag, non-finite flag
            self.loss_sum = torch.zeros((), device=self.strategy.device)
            self.tick = time.perf_counter()
            for i, batch in enumerate(self.loaders.train):
                yield batch, (i + 1) % t.grad_accum == 0
                if self.done():
                    return

    def count(self, loss: torch.Tensor, batch: Batch) -> None:
        """One micro-batch's loss and tokens, toward its step's record."""
        self.loss_sum += loss.detach()
        self.window[1] += 1
        self.tokens_seen += batch.tokens

    def end_step(
        self, grad_norm: torch.Tensor | float, stop: bool, now: float | None = None, read: list[float] | None = None
    ) -> bool:
        """After an optimizer step: count and log it (evaluating and checkpointing when due), and end the epoch
        where it is over. False when a stop signal (`stop` on any rank) ends the run here, checkpointed.
        `now`: when the step ended (default: now). The loss sum and the gradient norm are read back from the
        device here, in one copy, unless the caller read them already (`read`: both, see `read_step`)."""
        t = self.cfg.train
        self.step += 1
        self.step_in_epoch += 1
        self.examples_seen += t.batch_size
        window = self.window
        loss_sum, grad_norm = read or read_step([self.loss_sum, grad_norm])[0]
        window[0] = loss_sum
        self.loss_sum.zero_()
        window[2] = 1.0 if stop else 0.0
        window[3] = 0.0 if math.isfinite(window[0]) else 1.0
        reduced = self.strategy.all_reduce(window.clone())
        now = time.perf_counter() if now is None else now
        self.train_seconds += now - self.tick
        if reduced[3] > 0:
            raise UserError(
                f"the loss became NaN/inf at step {self.step}; the last good checkpoint is kept in "
                f"{self.checkpoints}; lower train.lr, set train.max_grad_norm, or use fp32/bf16"
            )
        self._after_step(float(reduced[0] / reduced[1]), float(grad_norm), now - self.tick)
        window.zero_()
        if self.step_in_epoch >= self.steps_per_epoch:
            self._next_epoch()
        elif self.step >= self.total_steps or self.done():  # max_steps inside an epoch, or stopped early
            if self.checkpointed_at != self.step:
                self.save_checkpoint()
        self.tick = time.perf_counter()
        if reduced[2] > 0:
            if self.checkpointed_at != self.step:
                self.save_checkpoint()
            return False
        return True

    def _after_step(self, loss: float, grad_norm: float, seconds: float) -> None:
        cfg, out = self.cfg, self.out
        t = cfg.train
        if not self.stepped:  # when this process finished its first step (start-up time, bench/gpu_check.sh)
            self.stepped = True
            out.log({"event": "first_step", "step": self.step})
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "examples_seen": self.examples_seen,
            "train_loss_step": loss,
            "lr": lr_at(self.step - 1, t.lr, self.total_steps, t.schedule, t.warmup_steps),
            "grad_norm": grad_norm,
            "step_seconds": seconds,
            # running averages since step 0; tokens/s is this rank's tokens x world size (an estimate)
            "examples_per_s": self.examples_seen / max(self.train_seconds, 1e-9),
            "tokens_per_s": self.tokens_seen * self.world / max(self.train_seconds, 1e-9),
        }
        if (comm := self.strategy.comm_bytes()) is not None:  # DeepSpeed counts only sampled steps
            record["allreduce_bytes"] = comm
        if self.strategy.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**30
        # The book evaluates after steps 1, 51, 101, ...; and every run is evaluated after its last step, so that
        # one shorter than eval_every is not known by its first step alone.
        last = self.step >= self.total_steps
        if (self.step - 1) % t.eval_every == 0 or last:
            tr, va = self._estimate()
            record |= {"train_loss": tr["loss"], "val_loss": va["loss"]}
            mid_epoch = last and self.step_in_epoch < self.steps_per_epoch  # else the epoch's end gives accuracy
            if mid_epoch:
                record |= {"train_acc": tr["accuracy"], "val_acc": va["accuracy"]}
            out.print(
                f"epoch {self.epoch + 1} step {self.step}: train loss {tr['loss']:.3f}, val loss {va['loss']:.3f}"
                + (
                    f", train accuracy {tr['accuracy'] * 100:.2f}%, validation accuracy {va['accuracy'] * 100:.2f}%"
                    if mid_epoch
                    else ""
                )
                + f" ({self._estimate_text()})"
            )
        out.log(record)
        ex_s = self.examples_seen / max(self.train_seconds, 1e-9)
        out.progress(
            step=self.step, total=self.total_steps, epoch=self.epoch, epochs=t.epochs, loss=loss, ex_per_s=ex_s
        )
        if self.selection is not None and self.selection.due(self.step, t.eval_every, self.total_steps):
            self.select()  # before this step's checkpoint, which holds its outcome
        if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step_in_epoch < self.steps_per_epoch:
            self.save_checkpoint()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self._epoch_end()
        self.save_checkpoint()

    def _estimate(self) -> tuple[dict, dict]:
        """Train and validation loss and accuracy on their first train.eval_batches batches (an estimate), once a
        step: the epoch's end reuses its step's."""
        if getattr(self, "_estimated", (None,))[0] != self.step:
            limit = self.cfg.train.eval_batches * self.cfg.train.batch_size
            self._estimated = (self.step, self.evaluate("train", limit), self.evaluate("validation", limit))
        return self._estimated[1], self._estimated[2]

    def _estimate_text(self) -> str:
        t = self.cfg.train
        return f"estimates on {t.eval_batches} batches of each split"

    def _epoch_end(self) -> None:
        tr, va = self._estimate()
        self.out.print(
            f"epoch {self.epoch}: train accuracy {tr['accuracy'] * 100:.2f}%, validation accuracy "
            f"{va['accuracy'] * 100:.2f}% ({self._estimate_text()})"
        )
        self.out.log(
            {
                "step": self.step,
                "epoch": self.epoch,
                "examples_seen": self.examples_seen,
                "train_acc": tr["accuracy"],
                "val_acc": va["accuracy"],
            }
        )

    # ------------------------------------------------------------------------------------- evaluation
    def eval_plan(self, split: str, limit: int | None = None) -> EvalPlan:
        """(this rank's loader over the split or its first `limit` examples, the number of forward passes)."""
        # `eval_batch`: micro-batches where padding could change a prediction (pooling `last` with padding batch).
        loader = eval_loader(self.loaders, split, self.eval_batch, self.world, self.rank, limit)
        # Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively).
        return loader, int(self.strategy.all_reduce(torch.tensor([len(loader)], dtype=torch.float64), op="max")[0])

    @torch.no_grad()
    def evaluate(
        self, split: str, limit: int | None = None, plan: EvalPlan | None = None, tick: Callable[[], None] | None = None
    ) -> dict:
        """Loss and accuracy over a split (or its first `limit` examples), exact across ranks: counts are
        all-reduced and each example is read by exactly one rank. `tick()`, if given, follows each batch."""
        s = self.strategy
        loader, n_batches = plan or self.eval_plan(split, limit)
        k = self.num_classes
        sums = torch.zeros(2 + k * k, dtype=torch.float64)  # loss sum, count, confusion (true x predicted)
        s.model.eval()
        batches = iter(loader)
        for _ in range(n_batches):
            got = next(batches, None)
            real = got is not None
            # a rank with fewer batches runs stand-in forward passes, not counted
            batch = (got if got is not None else self.loaders.collate([self.loaders.datasets[split][0]])).to(s.device)
            logits = s.forward(batch.ids, batch.last).float()
            if tick is not None:
                tick()
            if not real:
                continue
            sums[0] += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            sums[1] += len(batch)
            pred = logits.argmax(-1)
            sums[2:] += torch.bincount(batch.labels * k + pred, minlength=k * k).double().cpu()
        s.model.train()
        sums = s.all_reduce(sums)
        count = max(1.0, float(sums[1]))
        confusion = sums[2:].view(k, k).long()
        return {
            "loss": float(sums[0]) / count,
            "accuracy": float(confusion.diag().sum()) / count,
            "count": int(sums[1]),
            "confusion": confusion.tolist(),
        }

    # ----------------------------------------------------------- selection, early stopping, class weights
    def select(self) -> None:
        """train.select / train.early_stop: evaluate the validation split (or its first train.select.examples
        messages), keep the adapter if it is the best so far, and stop the run once early stopping says so. Every
        rank takes the same decision: the metric comes from all-reduced counts, the stop flag is all-reduced."""
        sel, s = self.selection, self.strategy
        assert sel is not None
        ev = self.evaluate("validation", sel.examples)
        value = selecting.metric_value(sel.metric, ev, self.labels)
        if sel.observe(self.step, value) and sel.keeps_best:
            sel.best_tensors = s.adapter_state(self.adapter_names)  # every rank: a collective under ZeRO
        flag = torch.tensor([1.0 if sel.should_stop() and self.step < self.total_steps else 0.0], dtype=torch.float64)
        sel.stopped = bool(s.all_reduce(flag, op="max")[0] > 0)
        self.out.log(
            {
                "step": self.step,
                "epoch": self.epoch,
                "examples_seen": self.examples_seen,
                f"select_{sel.metric}": value,
                "select_best_step": sel.best_step,
            }
        )
        self.out.print(
            f"step {self.step}: {sel.metric} {value:.4f} on {ev['count']} validation messages "
            f"(best {sel.best_value:.4f} at step {sel.best_step})"
            if sel.best_value is not None
            else f"step {self.step}: {sel.metric} {value:.4f} on {ev['count']} validation messages"
        )
        if sel.stopped:
            self.out.print(
                f"early stopping at step {self.step}: {sel.metric} has not improved by more than {sel.min_delta:g} "
                f"in {sel.waited} evaluations (best {sel.best_value:.4f} at step {sel.best_step})"
            )
            self.out.log({"event": "early_stop", "step": self.step, "best_step": sel.best_step})

    def stage_selection(self, staging: Path) -> None:
        """Rank 0: the best adapter so far into a checkpoint being written (train.select)."""
        sel = self.selection
        if sel is not None and sel.keeps_best and sel.best_tensors is not None:
            selecting.write_best(staging, sel.best_tensors)

    def take_best(self) -> dict[str, torch.Tensor] | None:
        """train.select, at the end: the last step's tensors (for adapter-last/), with the best step's adapter put
        into the model for the final evaluation; None when nothing is selected (the last step's adapter stays)."""
        sel, s = self.selection, self.strategy
        if sel is None or not sel.keeps_best or sel.best_tensors is None:
            return None
        last = s.adapter_state(self.adapter_names)
        if sel.best_step != self.step:
            selecting.load_into(s, sel.best_tensors)
            self.out.print(
                f"selected step {sel.best_step} ({sel.metric} {sel.best_value:.4f}, best of "
                f"{len(sel.history)} evaluations): its adapter is adapter/, the last step's is beside it"
            )
        return last

    def save_last(self, tensors: dict[str, torch.Tensor]) -> None:
        """Rank 0: the last step's adapter as adapter-last/ (weights-last/), beside the selected one."""
        staging = self.out.dir / ".last"
        shutil.rmtree(staging, ignore_errors=True)
        written = self.save_result(tensors, staging)
        final = self.out.dir / f"{written.name}-last"
        if final.exists():
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)

    def class_weights(self, train: CachedDataset) -> None:
        """data.balance=weight: the loss weights, inverse class frequency over the training split."""
        if self.cfg.data.balance != "weight":
            return
        w = inverse_frequency(train.labels, self.num_classes, self.labels)
        self.strategy.class_weight = w.to(self.strategy.device)
        self.out.print(
            "class weights (inverse frequency): "
            + ", ".join(f"{c} {x:.3f}" for c, x in zip(self.labels, w.tolist(), strict=True))
        )

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        self.checkpointed_at = self.step
        ckpt.save(self.out, self.strategy, self.step, self.cfg.train.keep_checkpoints, self.checkpoint_contents)

    def checkpoint_contents(self, staging: Path) -> ckpt.Contents:
        """Every rank, inside `checkpoint.save`'s sequence: the selected adapter and a sharded strategy's state
        into `staging`, and the tensors, optimizer state and progress that the commit writes."""
        s = self.strategy
        self.out.call(self.stage_selection, staging)
        s.save_sharded(staging)
        return ckpt.Contents(s.adapter_state(self.adapter_names), s.optimizer_state(), self.progress())

    def progress(self) -> dict:
        """Where the run stands, with its config: what a checkpoint's state.json holds beside its files."""
        return {
            **{k: getattr(self, k) for k in PROGRESS},
            "world_size": self.world,
            "strategy": self.strategy.name,
            "config": self.cfg.to_dict(),
            "config_digest": self.cfg.digest(),
            "data_sha256": self.data_sha256,
            **({"selection": self.selection.state()} if self.selection is not None else {}),
        }

    def save_result(self, tensors: dict[str, torch.Tensor], run_dir: Path | None = None) -> Path:
        """adapter/ (LoRA) or weights/ (trained layers), described so they can be used without the run."""
        spec = adapters.AdapterSpec.for_run(
            self.cfg,
            self.labels,
            self.length,
            self.lora_modules,
            adapters.base_of(self.cfg, device_type=self.build_device.type),
        )
        return adapters.save(run_dir or self.out.dir, spec, tensors)

    # ----------------------------------------------------------------------------------------- finish
    def finish(self, started: float) -> dict:
        """The final evaluation of every split, the adapter, results.json and the report. `started`: when `run`
        began (time.perf_counter()), so that wall_seconds counts the whole run, evaluation included."""
        s, out = self.strategy, self.out
        t0 = time.perf_counter()
        last = self.take_best()  # train.select: the best step's adapter in the model; the last step's tensors
        plans = {name: self.eval_plan(name) for name in ("train", "validation", "test")}
        tick = out.task("final evaluation", sum(n for _, n in plans.values()))
        ev = {name: self.evaluate(name, plan=plan, tick=tick) for name, plan in plans.items()}
        eval_seconds = time.perf_counter() - t0
        tokens = int(s.all_reduce(torch.tensor([self.tokens_seen], dtype=torch.float64))[0])
        secs = max(self.train_seconds, 1e-9)
        results = {
            "train_accuracy": ev["train"]["accuracy"],
            "val_accuracy": ev["validation"]["accuracy"],
            "test_accuracy": ev["test"]["accuracy"],
            "train_loss": ev["train"]["loss"],
            "val_loss": ev["validation"]["loss"],
            "test_loss": ev["test"]["loss"],
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "world_size": self.world,
            "strategy": s.name,
            "steps": self.step,
            "epochs": self.epoch,
            "examples_seen": self.examples_seen,
            "wall_seconds": None,  # below, once the adapter is saved
            "train_seconds": self.train_seconds,
            "eval_seconds": eval_seconds,
            "examples_per_second": self.examples_seen / secs,
            "tokens_per_second": tokens / secs,
            "classes": list(self.labels),
            "confusion": {k: v["confusion"] for k, v in ev.items()},
            "data_sha256": self.data_sha256,
        }
        if self.selection is not None:
            results["selection"] = self.selection.summary(self.step)
        if s.class_weight is not None:
            results["class_weights"] = dict(zip(self.labels, s.class_weight.tolist(), strict=True))
        sel = self.selection
        tensors = sel.best_tensors if last is not None and sel is not None else s.adapter_state(self.adapter_names)
        out.call(self.save_result, tensors)
        if last is not None:
            out.call(self.save_last, last)
        results["wall_seconds"] = time.perf_counter() - started
        out.write_json("results.json", results)
        out.log(
            {
                "step": self.step,
                "epoch": self.epoch,
                "examples_seen": self.examples_seen,
                **{f"final_{k}": v for k, v in results.items() if isinstance(v, (int, float))},
            }
        )
        out.call(finish_report, out.dir, out.print)  # report.md and plots/; a failure there is only a warning
        out.print(
            f"done in {results['wall_seconds']:.1f}s (training {self.train_seconds:.1f}s, final evaluation "
            f"{eval_seconds:.1f}s): train {results['train_accuracy'] * 100:.2f}%, validation "
            f"{results['val_accuracy'] * 100:.2f}%, test {results['test_accuracy'] * 100:.2f}% accuracy on the whole "
            f"splits; "
            f"{self.speed_text(results['examples_per_second'])}; results in {out.dir}"
        )
        return results

    def speed_text(self, examples_per_s: float) -> str:
        return f"{examples_per_s:.1f} examples/s"


def run(cfg: Config) -> dict | None:
    """Train with `cfg`; returns results.json's content (None when stopped by a signal)."""
    start = time.perf_counter()
    trainer = Trainer(cfg)
    ok = False
    try:
        trainer.setup()
        results = trainer.finish(start) if trainer.train() else None
        ok = True
        return results
    finally:
        try:
            trainer.strategy.cleanup(ok)
        finally:
            trainer.out.close()  # after the process group is left: its warnings stay quiet on other ranks
