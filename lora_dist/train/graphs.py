"""The training step as a CUDA graph: forward, loss, backward, clipping and AdamW, captured once per batch
shape and replayed.

    lora-dist train --config configs/gpt2-small-lora.yaml          # on a GPU: on by default where it applies

At batch 8 a gpt2-small step launches about a thousand kernels of a few microseconds each, and the GPU waits
on Python between them (measured on an H200: busy 4.4 ms of a 53-81 ms step). A replayed graph launches them
all at once. A graph is made for each batch shape, which `data.pad_multiple` keeps to a handful.

What a graph needs, and where it gets it:
- Fixed addresses: each batch is copied into buffers the graph reads; the loss and the gradient norm land in
  tensors the graph writes.
- No host synchronisation inside: AdamW is fused and `capturable` (its step counts live on the GPU), its
  learning rate is a GPU tensor filled before each replay, and gradient clipping stays on the GPU.
- Memory made outside the graph: the gradients come from a warm-up forward and backward (which trains
  nothing: they are zeroed at the start of every replay), and AdamW's state from a step that changes nothing
  (zero gradients, learning rate 0), its step count then set back to 0.

`new_graph` makes a `torch.cuda.CUDAGraph`; tests put `EagerGraph` in its place, which runs the same step
without capturing it, to check on the CPU that the captured step computes what the plain step computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..config import Config
from ..data import Batch
from ..device import autocast
from .backend import Strategy
from .loss import loss as classification_loss

WARMUP = 2  # forward and backward passes before a capture (the docs' example takes 3 with optimizer steps)
# At most this many batch shapes are captured; a batch of any other shape runs the same step eagerly. With
# `data.pad_multiple` 64 the SMS data has 2-3 shapes; where padding is not free (pooling `last` with `padding:
# batch`) every length is a shape, about 55 an epoch, each a warm-up, a capture and its memory.
MAX_GRAPHS = 16


def obstacle(cfg: Config, backend: type[Strategy] | Strategy, device: torch.device, precision: str) -> str | None:
    """Why the step cannot be captured here, or None when it can. `backend`: the strategy, or its class."""
    t = cfg.train
    if device.type != "cuda":
        return f"it runs on {device.type}, and CUDA graphs need a CUDA GPU"
    if not backend.captures_graphs:
        return f"dist.strategy is {backend.name} (graphs capture a single process's step)"
    if precision == "fp16":
        return "fp16's loss scaler synchronises with the host every step (use bf16)"
    if t.grad_accum != 1:
        return f"train.grad_accum={t.grad_accum} (a graph holds one whole step)"
    if t.compile:
        return "train.compile=true (compile's own graphs would nest)"
    if cfg.model.activation_checkpointing:
        return "model.activation_checkpointing=true"
    return None


class CudaGraph:
    def __init__(self, pool: torch.cuda._POOL_HANDLE | None) -> None:
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn: Callable[[], None]) -> None:
        # thread_local: a DataLoader's pin-memory thread may allocate page-locked memory during the capture
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """Runs the step at each replay instead of capturing it: the same code path, on any device."""

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def new_graph(pool: torch.cuda._POOL_HANDLE | None) -> CudaGraph | EagerGraph:
    return CudaGraph(pool)


class GraphedStep:
    """A whole training step of a strategy that `captures_graphs`, on CUDA, one graph per batch shape."""

    def __init__(self, strategy: Strategy):
        s = self.s = strategy
        self.params = s.trainable()
        self.max_norm = s.cfg.train.max_grad_norm or float("inf")
        self.loss = torch.zeros((), device=s.device)  # what the last replay computed
        self.norm = torch.zeros((), device=s.device)
        # AdamW's CUDA kernel reads a tensor learning rate as fp32 (a relative 6e-8 from the float the plain step
        # uses); elsewhere it is read as a double, as the plain step's float is.
        self.lr = torch.zeros((), device=s.device, dtype=torch.float32 if s.device.type == "cuda" else torch.float64)
        self.pool = torch.cuda.graph_pool_handle() if s.device.type == "cuda" else None  # shared by the shapes
        self.graphs: dict[tuple[int, ...], tuple[CudaGraph | EagerGraph, Batch]] = {}
        self._prepare_optimizer()

    def _prepare_optimizer(self) -> None:
        """AdamW made capturable: learning rate on the GPU, state made outside any graph (a resumed run's
        state is kept as it was loaded)."""
        opt = self.s.optimizer
        for group in opt.param_groups:
            group["lr"], group["capturable"] = self.lr, True
        fresh = [p for p in self.params if not opt.state.get(p)]
        if fresh:
            grads = [p.grad for p in fresh]
            for p in fresh:
                p.grad = torch.zeros_like(p)
            self.lr.zero_()
            opt.step()  # with lr 0 and zero gradients: moments stay 0, weights stay as they are
            for p, g in zip(fresh, grads, strict=True):
                opt.state[p]["step"].zero_()
                p.grad = g
        for p in self.params:
            st = opt.state[p]
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32, device=p.device)

    def step(self, batch: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, gradient norm before clipping) of one step on `batch` (already on the device)."""
        key = tuple(batch.ids.shape)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:  # one shape too many: this batch's step runs uncaptured
                self.lr.fill_(lr)
                self._whole_step(batch)
                return self.loss, self.norm
            self.graphs[key] = self._capture(batch)
        graph, static = self.graphs[key]
        static.ids.copy_(batch.ids, non_blocking=True)
        static.last.copy_(batch.last, non_blocking=True)
        static.labels.copy_(batch.labels, non_blocking=True)
        self.lr.fill_(lr)
        graph.replay()
        return self.loss, self.norm

    def _capture(self, batch: Batch) -> tuple[CudaGraph | EagerGraph, Batch]:
        static = Batch(batch.ids.clone(), batch.last.clone(), batch.labels.clone(), batch.tokens)
        cuda = self.s.device.type == "cuda"
        side = torch.cuda.Stream() if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(WARMUP):  # trains nothing: every replay zeroes the gradients first
                self._loss(static).backward()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        graph = new_graph(self.pool)
        graph.capture(lambda: self._whole_step(static))
        return graph, static

    def _loss(self, b: Batch) -> torch.Tensor:
        with autocast(self.s.device, self.s.precision, cache=False):  # autocast's weight cache and graphs clash
            logits = self.s.model(b.ids, b.last)
        return classification_loss(logits.float(), b.labels, self.s.class_weight)

    def _whole_step(self, b: Batch) -> None:
        torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        loss = self._loss(b)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)  # as the plain step: foreach on a GPU
        self.s.optimizer.step()
        self.loss.copy_(loss.detach())
        self.norm.copy_(norm)
