"""Many adapters trained in one job over one frozen base: `lora-dist sweep`.

    lora-dist sweep --config configs/sweep-smoke.yaml
    torchrun --nproc_per_node=2 -m lora_dist sweep --config configs/sweep-smoke.yaml

The base is loaded once. Each adapter is a `Trainer` of its own (`AdapterRun`): its data, order, evaluation,
checkpointed state, epochs and run directory are what `lora-dist train` would give it, and its bookkeeping is
the one loop's (`Trainer.micro_batches`, `count`, `end_step`, `finish`). What the sweep adds is the step: the
micro-batches of every adapter in training side by side as one batch, laid out in blocks (`model.Packed`, each
adapter's micro-batch at its own width), the base's matmuls once over all of it and each adapter's LoRA and
head over its own rows (`multi_lora.GroupedLoRALinear`); then one gradient all-reduce for all adapters (DDP)
and each adapter's own clip and optimizer step. Checkpoints are joint (`sweep_state.py`): kill -9 and resume
give the same adapters. `sweep.max_concurrent` adapters train at once; the rest wait for a free slot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..build import add_trainable, build_base, shared_copy
from ..config import Config
from ..data import Batch
from ..device import DistEnv, cpu_threads_text, model_build_device
from ..errors import UserError
from ..model import GPT2, Packed
from ..multi_lora import Rows, attach, detach, group_layers
from ..sweep_report import best_line, write_summary
from . import checkpoint as ckpt
from . import sweep_state
from .backend import Strategy
from .loop import EvalPlan, StopRequested, Trainer, read_step
from .loss import loss as classification_loss
from .registry import make_strategy
from .selection import metric_value
from .strategy import Local
from .sweep_config import AdapterPlan, SweepPlan
from .sweep_memory import check_memory, prepare_data
from .tracking import AdapterOutput, JsonlSink, output_for


class OwnRNG:
    """An adapter's own torch random state (CPU, and the GPU's on CUDA). What happens under it (the adapter's
    initial tensors, its dropout masks, its loaders' seeds) draws what a run of its own would draw. Re-entrant."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.state: list[torch.Tensor] | None = None  # None until first used: then the state it found
        self.depth = 0

    def _get(self) -> list[torch.Tensor]:
        return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if self.cuda else [])

    def _set(self, state: list[torch.Tensor]) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1])

    def __enter__(self) -> OwnRNG:
        self.depth += 1
        if self.depth == 1:
            self.outer = self._get()
            if self.state is not None:
                self._set(self.state)
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.state = self._get()
            self._set(self.outer)


class OwnRNGDropout(nn.Dropout):
    """nn.Dropout drawing its masks from its adapter's `OwnRNG`."""

    def __init__(self, p: float, rng: OwnRNG):
        super().__init__(p)
        self.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        with self.rng:
            return super().forward(x)


class AdapterStrategy(Local):
    """One adapter's share of the sweep's backend: its own optimizer (its lr, weight decay, betas), its own
    gradient clip and its own model (the shared base under its LoRA and head); collectives go to the job's."""

    def __init__(self, cfg: Config, job: Strategy):
        self.job = job
        super().__init__(cfg, job.env, job.device)
        self.name = job.name

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.job.all_reduce(t, op)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.job.all_gather_object(obj)

    def barrier(self) -> None:
        self.job.barrier()

    def synced(self) -> None:
        """Its gradients were all-reduced (in the sweep's one bucket): count their bytes as its own."""
        if self.world_size > 1:
            self._comm_bytes += sum(p.numel() * p.element_size() for p in self.trainable())


class StopEvaluation(Exception):
    """A stop signal during an adapter's final evaluation: it is left unfinished, for resume to finish."""


class AdapterRun(Trainer):
    """One adapter of a sweep: a `Trainer` over a view of the shared base, whose checkpoints are the sweep's."""

    strategy: AdapterStrategy
    batches: Iterator[tuple[Batch, bool]]  # its micro-batches (`Trainer.micro_batches`), once in training

    def __init__(self, plan: AdapterPlan, number: int, sweep: Sweep):
        self.plan, self.number, self.sweep = plan, number, sweep
        super().__init__(plan.cfg, AdapterStrategy(plan.cfg, sweep.job))
        if self.out.active:
            self.out = AdapterOutput(self.out.dir, plan.name)
        self.checkpoints = ckpt.checkpoints_dir(sweep.out.dir)
        self.rng = OwnRNG(sweep.job.device)
        self.started = time.perf_counter()

    def build(self) -> tuple[GPT2, list[str]]:
        model = shared_copy(self.sweep.base)  # the base's tensors, this adapter's own head and LoRA
        layers = add_trainable(model, self.cfg, self.num_classes)
        for m in model.modules():
            if hasattr(m, "dropout") and isinstance(m.dropout, nn.Dropout) and m.dropout.p > 0:
                m.dropout = OwnRNGDropout(m.dropout.p, self.rng)
        return model, layers

    def evaluate(
        self, split: str, limit: int | None = None, plan: EvalPlan | None = None, tick: Callable[[], None] | None = None
    ) -> dict:
        """`Trainer.evaluate`; the final evaluation (`plan` given) stops at a batch boundary once a stop signal
        reached any rank (`StopEvaluation`): what is left to evaluate is resumed."""
        if plan is not None:
            inner = tick

            def tick() -> None:
                if inner is not None:
                    inner()
                if self.sweep.stopping():
                    raise StopEvaluation

        return super().evaluate(split, limit, plan, tick)

    def header(self, splits: dict) -> str:
        """One line (the sweep's own says model, backend and device): what this adapter trains, on what."""
        cfg, t = self.cfg, self.cfg.train
        return (
            f"{self.trainable_params:,} trainable ({self._trained_text()}); data: "
            f"{', '.join(f'{k} {len(v)}' for k, v in splits.items())}; labels {', '.join(self.labels)}; "
            f"batch {t.batch_size}, lr {t.lr:g}; {self.total_steps} steps"
            + ("" if cfg.model.causal_mask else "; no causal mask")
        )

    def speed_text(self, examples_per_s: float) -> str:
        return f"its share of the sweep's throughput {examples_per_s:.1f} examples/s"

    def save_checkpoint(self) -> None:
        self.checkpointed_at = self.step
        self.sweep.due = True  # the sweep writes one checkpoint for all its adapters, at the end of the step


class Sweep:
    def __init__(self, plan: SweepPlan):
        self.plan = plan
        env = DistEnv.from_environ()
        cfg = plan.cfg
        self.out = output_for(env.rank, plan.run_dir, cfg.tracking.log_every)
        self.job = make_strategy(cfg, env)
        self.rank, self.world = self.job.rank, self.job.world_size
        n = len(plan.adapters)
        self.status = ["queued"] * n  # queued | training | done | failed | pruned
        self.errors: dict[int, str] = {}
        self.runs: dict[int, AdapterRun] = {}  # the adapters in training, by number
        self.step, self.due, self.examples, self.seconds = 0, False, 0, 0.0
        self.stop: StopRequested | None = None  # while training: the stop signals' flag
        self.stopped = False  # a stop signal ended the sweep's work at a final evaluation
        self.rungs: dict[str, dict[str, float]] = {}  # sweep.prune: rung step -> {adapter: its metric there}
        self.pruned: dict[int, dict] = {}  # sweep.prune: adapter number -> where and why it stopped

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        plan, out, job = self.plan, self.out, self.job
        cfg = plan.cfg
        digests = job.all_gather_object(plan.digest())
        if len(set(digests)) > 1:
            raise UserError(
                f"ranks started with different sweep configs (hashes {sorted(set(digests))}); launch every rank alike"
            )
        out.print(f"sweep: {len(plan.adapters)} adapters to set up (the base, then each one's data)")
        self.build_device = model_build_device(job.device)
        # on the job's device, frozen weights stored as the job stores them (bf16 under autocast on a GPU), once:
        # every adapter's copy shares these tensors
        self.base = job.place(build_base(cfg, device=self.build_device).requires_grad_(False))
        # every adapter's data, checked before anything is written
        data = prepare_data(plan, self.base.cfg.context_length, self.world, self.rank)
        self.concurrent = check_memory(self.base, plan, data, job, say=out.print)
        self.total_steps = schedule_steps([d.steps for d in data], self.concurrent)
        out.call(sweep_state.prepare_dir, out.dir, cfg.overwrite, cfg.train.resume != "never")
        job.barrier()
        out.write_text("config.yaml", yaml.safe_dump(plan.resolved, sort_keys=False))  # first: marks it a sweep's
        out.add_sink(JsonlSink(out.path("metrics.jsonl")))
        self.rows = Rows()
        self.model = shared_copy(self.base)  # the base once, every adapter's LoRA and head routed over it
        self.model.pooling = cfg.model.pooling
        self.model.activation_checkpointing = cfg.model.activation_checkpointing
        group_layers(self.model, self.rows)
        self.model.train()
        out.print(
            f"sweep: {len(plan.adapters)} adapters over {cfg.model.name} ({cfg.model.weights}), {self.concurrent} at a "
            f"time; {self.world} process(es), strategy {job.name}, device {job.device}{cpu_threads_text(job.device)}, "
            f"precision {job.precision_text()}"
        )
        out.log(
            {"event": "start", "adapters": len(plan.adapters), "concurrent": self.concurrent, "world_size": self.world}
        )
        sweep_state.resume(self)
        self.settle()

    def start(self, number: int) -> AdapterRun:
        """Set adapter `number` up (its run directory, data, head and LoRA) and put it into training."""
        a = AdapterRun(self.plan.adapters[number], number, self)
        with a.rng:
            a.setup(resume=False)  # the sweep resumes it from its joint checkpoint (sweep_state.resume)
        attach(self.model, number, a.strategy.model, a.lora_modules)
        a.batches = a.micro_batches()
        self.runs[number] = a
        self.status[number] = "training"
        return a

    def settle(self) -> bool:
        """Finish the adapters that are through, and start queued ones in the free slots; whether any did."""
        through = [a for a in self.runs.values() if a.done()]
        finished = False
        for a in through:
            if self.stopping():  # a stop signal: no more final evaluations; resume does them
                self.stopped = True
                break
            try:
                with a.rng:
                    a.finish(a.started)
            except StopEvaluation:
                self.stopped = True
                break
            self._drop(a, "done")
            finished = True
        if self.stopped:
            return finished
        queued = [i for i, s in enumerate(self.status) if s == "queued"]
        started = queued[: max(0, self.concurrent - len(self.runs))]
        for number in started:
            self.start(number)
        return bool(finished or started)

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> bool:
        """Run every adapter to its end (True), or until a stop signal was honoured (False)."""
        stop = self.stop = StopRequested()
        try:
            while self.runs:
                if not self._step(stop.signal is not None):
                    self.out.print(
                        f"stop signal received: checkpoint saved at sweep step {self.step}; exiting "
                        f"(resume with train.resume=auto)"
                    )
                    return False
        finally:
            stop.restore()
            self.stop = None
        return True

    def stopping(self) -> bool:
        """Whether a stop signal reached any rank while training; every rank asks at the same points (between
        final evaluations and after each of their batches), so they agree."""
        if self.stop is None:
            return False
        flag = torch.tensor([0.0 if self.stop.signal is None else 1.0], dtype=torch.float64)
        return bool(self.job.all_reduce(flag)[0] > 0)

    def _step(self, stop: bool) -> bool:
        """One optimizer step of every adapter in training, as one batch; False when stopped by a signal."""
        tick = time.perf_counter()
        runs = list(self.runs.values())
        accum = self.plan.cfg.train.grad_accum
        for _ in range(accum):
            batches = []
            for a in runs:
                with a.rng:
                    batch, _boundary = next(a.batches)
                batches.append(batch.to(self.job.device))
            losses = [
                classification_loss(z.float(), b.labels, a.strategy.class_weight)
                for a, z, b in zip(runs, self.forward(runs, batches), batches, strict=True)
            ]
            # each adapter's gradient: its own loss's. One backward over every adapter's loss, not each adapter's
            # `strategy.backward` (its own loss scale, its own accumulation): the losses share one graph through
            # the grouped layers, and with fp16 refused for sweeps (sweep_config.py) no loss scale is needed.
            (torch.stack(losses).sum() / accum).backward()
            for a, loss, b in zip(runs, losses, batches, strict=True):
                a.count(loss, b)
        self.job.sync_grads([p for a in runs for p in a.strategy.trainable()])
        norms = []
        for a in runs:
            a.strategy.synced()
            with a.rng:
                norms.append(a.strategy.step(a.lr()))
        # every adapter's loss sum and gradient norm in one copy: the step's one host sync, which also makes the
        # step's time the GPU's (as a run alone waits for its loss)
        read = read_step([t for a, norm in zip(runs, norms, strict=True) for t in (a.loss_sum, norm)])
        now = time.perf_counter()
        self.step += 1
        self.examples += sum(a.cfg.train.batch_size for a in runs)
        self.seconds += now - tick
        stopped = False
        for a, norm, got in zip(runs, norms, read, strict=True):
            with a.rng:
                try:
                    stopped |= not a.end_step(norm, stop, now, got)
                except UserError as e:  # the loss became NaN/inf: this adapter ends here, the others go on
                    self._drop(a, "failed", str(e))
        if self.plan.sweep.prune is not None:
            self.prune([a for a in runs if a.number in self.runs])
        for a in runs:
            a.tick = time.perf_counter()  # its next step's time starts here, after every adapter's evaluation
        self._record(runs, now - tick)
        if stopped:
            sweep_state.save(self)
            return False
        if self.settle() or self.due or self.stopped:
            sweep_state.save(self)
        return not self.stopped

    def prune(self, runs: list[AdapterRun]) -> None:
        """sweep.prune (successive halving, asynchronous as ASHA): the adapters at one of their rungs are evaluated
        on the validation split; each one not in the best max(1, n // eta) of the n adapters recorded at that rung
        so far (those judged with it at this step included) stops here, its adapter saved and marked pruned. Every
        rank decides alike: the metric comes from all-reduced counts. Evaluation draws no random numbers, so the
        adapters that go on train as they would alone."""
        p = self.plan.sweep.prune
        assert p is not None
        judged = [a for a in runs if not a.done() and a.step in p.rungs(a.total_steps)]
        values = {}
        for a in judged:
            with a.rng:
                ev = a.evaluate("validation", p.examples)
            values[a.number] = metric_value(p.metric, ev, a.labels)
            self.rungs.setdefault(str(a.step), {})[a.plan.name] = values[a.number]
            a.out.log({"step": a.step, "event": "rung", f"rung_{p.metric}": values[a.number]})
        number = {q.name: i for i, q in enumerate(self.plan.adapters)}
        sign = 1.0 if p.direction == "min" else -1.0
        for a in judged:
            rung = self.rungs[str(a.step)]
            order = sorted(rung, key=lambda n: (math.isnan(rung[n]), sign * rung[n], number[n]))
            keep = max(1, len(rung) // p.eta)
            if a.plan.name in order[:keep]:
                continue
            v = values[a.number]
            self.pruned[a.number] = {"step": a.step, p.metric: v, "rank": order.index(a.plan.name) + 1, "of": len(rung)}
            a.out.print(
                f"pruned at step {a.step}: {p.metric} {v:.4f} is not in the best {keep} of the {len(rung)} adapters "
                f"at this rung; its adapter is kept"
            )
            a.out.log({"step": a.step, "event": "pruned", p.metric: v})
            with a.rng:
                a.finish(a.started)
            self._drop(a, "pruned")

    def forward(self, runs: list[AdapterRun], batches: list[Batch]) -> list[torch.Tensor]:
        """Each adapter's logits for its micro-batch, all computed as one batch: rows side by side, each
        micro-batch a block at its own width, so each computes what it computes alone."""
        width = max(b.ids.shape[1] for b in batches)
        ids = torch.cat([F.pad(b.ids, (0, width - b.ids.shape[1])) for b in batches])  # (B, T)
        last = torch.cat([b.last for b in batches])  # (B,)
        blocks = [(len(b), b.ids.shape[1]) for b in batches]
        numbers = [a.number for a, b in zip(runs, batches, strict=True) for _ in range(len(b))]
        self.rows.set(torch.tensor(numbers), [w for r, w in blocks for _ in range(r)])
        with self.job.autocast():
            return self.model(ids, last, Packed(last + 1, width, blocks))

    def _drop(self, a: AdapterRun, status: str, error: str | None = None) -> None:
        """An adapter leaves training: done, or failed with `error`."""
        self.status[a.number] = status
        if error:
            self.errors[a.number] = error
            a.out.print(f"error: {error}; the other adapters go on")
        a.out.close()
        detach(self.model, a.number)
        del self.runs[a.number]
        self.due = True
        self.out.call(self.write_summary)

    def _record(self, runs: list[AdapterRun], seconds: float) -> None:
        rate = self.examples / max(self.seconds, 1e-9)
        record = {
            "step": self.step,
            "adapters": [a.plan.name for a in runs],
            "step_seconds": seconds,
            "examples_per_s": rate,  # summed over the adapters, since the start (or resume)
        }
        if self.job.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.job.device) / 2**30
        self.out.log(record)
        every = self.plan.cfg.tracking.log_every
        if self.step % every == 0 or not self.runs or self.step == self.total_steps:
            counts = {s: self.status.count(s) for s in ("training", "done", "queued", "failed")}
            self.out.print(
                f"sweep step {self.step}/{self.total_steps}: {counts['training']} training, {counts['done']} done, "
                f"{counts['queued']} queued"
                + (f", {counts['failed']} failed" if counts["failed"] else "")
                + f"; {rate:.1f} examples/s over all adapters"
            )

    # ----------------------------------------------------------------------------------------- finish
    def write_summary(self) -> Path:
        """sweep.json and sweep.md (rank 0): every adapter, its settings and its figures."""
        entries = [
            {
                "name": p.name,
                "run_dir": p.cfg.output_dir,
                "status": self.status[i],
                **({"error": self.errors[i]} if i in self.errors else {}),
                **({"pruned": self.pruned[i]} if i in self.pruned else {}),
                "overrides": list(p.overrides),
                "settings": p.settings,
            }
            for i, p in enumerate(self.plan.adapters)
        ]
        return write_summary(self.out.dir, entries)

    def finish(self) -> None:
        path = self.out.call(self.write_summary)
        failed = [self.plan.adapters[i].name for i in self.errors]
        self.out.print(
            f"sweep done: {self.status.count('done')} adapters trained"
            + (f", {self.status.count('pruned')} pruned" if self.pruned else "")
            + (f", {len(failed)} failed ({', '.join(failed)})" if failed else "")
            + f"; {self.examples / max(self.seconds, 1e-9):.1f} examples/s over all adapters"
            + (f"; {best_line(path.parent)}" if path is not None else "")
            + f"; summary in {path}"
        )


def schedule_steps(steps: list[int], concurrent: int) -> int:
    """Sweep steps to train adapters of `steps` steps each, `concurrent` at a time, each queued one starting in
    the first slot that frees (as `Sweep.settle` starts them): the sweep's length, where none fails."""
    slots = [0] * max(1, min(concurrent, len(steps)))
    for n in steps:
        i = slots.index(min(slots))
        slots[i] += n
    return max(slots, default=0)


def run(plan: SweepPlan) -> bool:
    """Train every adapter of `plan`; False when stopped by a signal (resume with train.resume=auto)."""
    sweep = Sweep(plan)
    ok = False
    try:
        sweep.setup()
        done = sweep.train()
        if done:
            sweep.finish()
        ok = True
        return done
    finally:
        for a in sweep.runs.values():
            a.out.close()
        sweep.job.cleanup(ok)
        sweep.out.close()
