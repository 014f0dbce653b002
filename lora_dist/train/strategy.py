"""How one training loop runs on one process, under DDP, or under DeepSpeed: a small strategy object.

    lora-dist train --config configs/smoke.yaml                                   # none
    torchrun --nproc_per_node=2 -m lora_dist train --config configs/smoke.yaml    # ddp (gloo on CPU)
    torchrun --nproc_per_node=2 -m lora_dist train --config configs/smoke.yaml \\
        dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.json

The loop only calls what `train/backend.py`'s `Strategy` protocol names, and asks its capabilities there
(`captures_graphs`, `owns_precision`, `owns_optimizer`, `shards_state`), never a backend's name. Only trainable
(adapter) tensors ever reach the optimizer or the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..data import Batch
from ..device import (
    AMP_DTYPES,
    DistEnv,
    autocast,
    init_process_group,
    leave_process_group,
    prefer_attention_kernels,
    resolve_precision,
    restore_tf32,
    set_tf32,
    storage_dtype,
    use_tf32,
)
from ..errors import UserError
from ..lora import cast_adapters_once, cast_frozen, load_adapter_state_dict
from .graphs import GraphedStep, obstacle
from .loss import loss as classification_loss

M = TypeVar("M", bound=nn.Module)


class Local:
    """One process: plain AdamW over the trainable tensors."""

    name: str = "none"  # dist.strategy's name for it (a sweep's adapters report their job's)
    captures_graphs: ClassVar[bool] = True  # train/backend.py says what each capability means
    owns_precision: ClassVar[bool] = False
    owns_optimizer: ClassVar[bool] = False
    shards_state: ClassVar[bool] = False
    class_weight: torch.Tensor | None = None  # data.balance=weight: the loss's per-class weights (train/loss.py)

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.rank, self.world_size = env.rank, env.world_size
        # The model as the backend wraps it (nn.Module, DistributedDataParallel or a DeepSpeed engine) and its
        # optimizer; both set by `prepare`.
        self.model: Any = None
        self.optimizer: Any = None
        if device.type == "cuda":  # first: whatever asks the GPU something below asks this rank's GPU
            torch.cuda.set_device(device)
        self.precision = precision = resolve_precision(cfg.train.precision, device, cpu_bf16=not self.owns_precision)
        self.tf32 = use_tf32(device, precision, cfg.train.tf32)  # train.tf32=false keeps full fp32
        # process-wide flags: set either way on CUDA (so no earlier run's TF32 lingers), put back by cleanup
        self._tf32_before = set_tf32(self.tf32) if self.tf32 or device.type == "cuda" else None
        self.amp_dtype = AMP_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._comm_bytes = 0
        prefer_attention_kernels(device)
        self.init()
        # The whole step as CUDA graphs (train/graphs.py), where it applies; made at the first step, once a
        # resumed run's optimizer state is loaded.
        why = obstacle(cfg, self, device, precision)
        if cfg.train.cuda_graphs and why:
            raise UserError(f"train.cuda_graphs=true, but {why}; drop train.cuda_graphs (null: where it applies)")
        self.use_graphs = cfg.train.cuda_graphs is not False and why is None
        self.graphed: GraphedStep | None = None

    def init(self) -> None:
        pass

    def precision_text(self) -> str:
        """The precision as the first line of a run states it, e.g. "bf16 (auto)" or "fp32 (TF32 matmuls)"."""
        notes = (["auto"] if self.cfg.train.precision == "auto" else []) + (["TF32 matmuls"] if self.tf32 else [])
        return self.precision + (f" ({', '.join(notes)})" if notes else "")

    def optimizer_text(self) -> str:
        """Which optimizer runs, e.g. "torch AdamW (fused)"."""
        return optimizer_text_of(self.optimizer)

    # ---------------------------------------------------------------------------------------- model
    @property
    def module(self) -> nn.Module:
        """The bare model (no DDP or DeepSpeed wrapper)."""
        return self.model

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def prepare(self, model: nn.Module, micro: int, accum: int) -> None:
        self.accum = accum
        self.model = self.place(model)
        self.optimizer = self._adamw(self.trainable())

    def place(self, model: M) -> M:
        """The model on this rank's device, its frozen Linear weights stored as `device.storage_dtype` says;
        adapters, head, norms, embeddings and optimizer state stay fp32."""
        model = model.to(self.device)
        if (dtype := storage_dtype(self.device, self.precision)) is not None:
            self.store_low(model, dtype)
        return model

    def store_low(self, model: nn.Module, dtype: torch.dtype) -> None:
        """What `place` does on a GPU under bf16/fp16 autocast: the frozen Linear weights stored in `dtype`; with
        `train.lora_cast_once`, every adapter's A and B cast for a pass all at once (`lora.cast_adapters_once`;
        not with compile or activation checkpointing, whose recomputed forward it was not made for)."""
        cast_frozen(model, dtype)
        t = self.cfg.train
        if t.lora_cast_once and not t.compile and not self.cfg.model.activation_checkpointing:
            cast_adapters_once(model, dtype)

    def _adamw(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        t = self.cfg.train
        # The fused kernel: one pass over all adapter tensors. On the CPU torch would otherwise loop over
        # them one op at a time (about 8 ms a step for gpt2-small's 146 adapter tensors, against 2 fused).
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(
            params, lr=t.lr, weight_decay=t.weight_decay, betas=(t.betas[0], t.betas[1]), fused=fused
        )

    def train_micro(self, batch: Batch, boundary: bool, lr: float) -> tuple[torch.Tensor, torch.Tensor | float | None]:
        """One micro-batch (on the device): forward and backward, and at the accumulation boundary the
        optimizer step at learning rate `lr`. Returns the loss (detached) and, at a boundary, the gradient norm
        before clipping, both left on the device (no host sync: the loop reads them back once a step)."""
        if self.use_graphs:
            self.graphed = self.graphed or GraphedStep(self)
            return self.graphed.step(batch, lr)
        with self.micro_step(boundary):
            logits = self.forward(batch.ids, batch.last)
            loss = classification_loss(logits.float(), batch.labels, self.class_weight)
            self.backward(loss, boundary)
        return loss.detach(), self.step(lr) if boundary else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's precision context; none where the backend applies bf16/fp16 itself."""
        return contextlib.nullcontext() if self.owns_precision else autocast(self.device, self.precision)

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(ids, last)

    def micro_step(self, boundary: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's forward and backward; gradients are synchronised only at the
        accumulation boundary (DDP's no_sync must cover the forward pass too)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def step(self, lr: float) -> torch.Tensor | float:
        """Clip, update, zero the gradients; returns the gradient norm before clipping (a device tensor: reading
        it is the caller's one host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of `params` over the ranks, in one all-reduce: a sweep's adapters, whose model
        no DDP wraps (`train/sweep.py`). Nothing to do on one process."""

    def comm_bytes(self) -> int | None:
        """Gradient bytes all-reduced since the last call."""
        out, self._comm_bytes = self._comm_bytes, 0
        return out

    # ---------------------------------------------------------------------------------- collectives
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    # ---------------------------------------------------------------------------------------- state
    def adapter_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in names}

    def load_adapter(self, state: dict[str, torch.Tensor], source: str) -> None:
        load_adapter_state_dict(self.module, state, source=source)

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)

    def save_sharded(self, path: str | Path) -> None:
        """State that each rank writes itself (DeepSpeed's ZeRO shards); nothing here."""

    def load_sharded(self, path: str | Path) -> None:
        pass

    def cleanup(self, ok: bool = True) -> None:
        if self._tf32_before is not None:
            restore_tf32(self._tf32_before)


class Distributed(Local):
    """What every backend of several processes shares: the process group, the bare model inside the wrapper,
    and the collectives."""

    captures_graphs = False

    def init(self) -> None:
        super().init()
        self.backend, self._set_env = init_process_group(
            self.device, self.cfg.dist.timeout_s, self.cfg.dist.backend, self.env
        )
        self.reduced_params: set[int] = set()

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dev = t.device
        work = t.to(self.device) if self.backend == "nccl" else t.cpu()
        dist.all_reduce(work, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return work.to(dev)

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        """As DDP's hook does it (divide, then sum), in one bucket; a missing gradient counts as zeros."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        self._comm_bytes += flat.numel() * flat.element_size()
        flat = self.all_reduce(flat.div_(self.world_size))
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))  # type: ignore[union-attr]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def cleanup(self, ok: bool = True) -> None:
        leave_process_group(self._set_env, barrier=ok)  # on success every rank is done with its collectives
        super().cleanup(ok)


class DDP(Distributed):
    """torch DistributedDataParallel, wrapped after LoRA injection and freezing: its buckets hold only the
    adapter gradients, and a communication hook counts the bytes it all-reduces."""

    name = "ddp"

    def prepare(self, model: nn.Module, micro: int, accum: int) -> None:
        self.accum = accum
        model = self.place(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model.register_comm_hook(self, _counting_allreduce_hook)
        self.optimizer = self._adamw(self.trainable())

    def micro_step(self, boundary: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if boundary else self.model.no_sync()


def optimizer_text_of(opt: torch.optim.Optimizer) -> str:
    kind = type(opt)
    if kind.__module__.startswith("torch."):
        fused = " (fused)" if opt.defaults.get("fused") else " (foreach)" if opt.defaults.get("foreach") else ""
        return f"torch {kind.__name__}{fused}"
    return f"{kind.__module__.split('.')[0]} {kind.__name__}"


def _counting_allreduce_hook(state, bucket):  # type: (Distributed, dist.GradBucket) -> torch.futures.Future[torch.Tensor]
    # (a type comment: DDP checks the annotations of a hook, and this module's would be strings)
    """DDP's default all-reduce (average), counting what crosses the wire and which tensors."""
    buf = bucket.buffer()
    state._comm_bytes += buf.numel() * buf.element_size()
    state.reduced_params.update(id(p) for p in bucket.parameters())
    buf.div_(state.world_size)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
