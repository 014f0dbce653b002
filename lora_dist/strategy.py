"""How one training loop runs on one process, under DDP, or under DeepSpeed: a small strategy object.

    lora-dist train --config configs/smoke.yaml                                   # none
    torchrun --nproc_per_node=2 -m lora_dist train --config configs/smoke.yaml    # ddp (gloo on CPU)
    torchrun --nproc_per_node=2 -m lora_dist train --config configs/smoke.yaml \\
        dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.json

The loop only calls: prepare, forward, backward, step, all_reduce, all_gather_object, barrier and the
state methods. Only trainable (adapter) tensors ever reach the optimizer or the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import Config
from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use train.device=auto or cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16), where they run at about
    twice the fp32 rate. Elsewhere bf16 on the CPU is emulated and no faster than fp32."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False  # not Linux: no cheap way to tell, so take fp32
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 or newer (A100, A10, L4/L40, H100, B200): bf16 tensor cores. Older GPUs
    (V100 7.0, T4 7.5) only emulate bf16, which `torch.cuda.is_bf16_supported()` counts as support. Asked of
    `device` itself, after `set_device`, so that no rank creates a context on cuda:0."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device, strategy: str = "none") -> str:
    """`train.precision=auto` -> bf16 autocast where the hardware runs it natively (CUDA compute capability
    >= 8.0, CPUs with AVX512-BF16/AMX), fp32 elsewhere (MPS, V100/T4 and older CPUs, and DeepSpeed on the
    CPU). Adapters, optimizer state and gradients stay fp32 either way. Other values are kept as they are."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp32"
    if device.type == "cpu" and strategy != "deepspeed":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def make_strategy(cfg: Config, env: DistEnv | None = None) -> "Local":
    env = env or DistEnv.from_environ()
    kind = cfg.dist.strategy
    if kind == "auto":
        kind = "ddp" if env.world_size > 1 else "none"
    if kind == "none" and env.world_size > 1:
        raise UserError(f"dist.strategy=none, but {env.world_size} processes were launched; use dist.strategy=ddp or deepspeed (or auto)")
    device = pick_device(cfg.train.device, env.local_rank)
    if kind == "deepspeed":
        from .deepspeed_strategy import DeepSpeed  # imports deepspeed only when asked for

        return DeepSpeed(cfg, env, device)
    return {"none": Local, "ddp": DDP}[kind](cfg, env, device)


class Local:
    """One process: plain AdamW over the trainable tensors."""

    name = "none"

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.rank, self.world_size = env.rank, env.world_size
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if device.type == "cuda":  # first: whatever asks the GPU something below asks this rank's GPU
            torch.cuda.set_device(device)
        self.precision = precision = resolve_precision(cfg.train.precision, device, self.name)
        # TF32 tensor cores for fp32 matmuls and convolutions (A100 and newer): about 8x the fp32 rate at a
        # 10-bit mantissa, which LoRA fine-tuning does not notice. train.tf32=false keeps full fp32.
        self.tf32 = device.type == "cuda" and precision == "fp32" and cfg.train.tf32
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if precision == "fp16" and device.type == "cpu":
            raise UserError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._comm_bytes = 0
        self.init()

    def init(self) -> None:
        pass

    def precision_text(self) -> str:
        """The precision as the first line of a run states it, e.g. "bf16 (auto)" or "fp32 (TF32 matmuls)"."""
        notes = (["auto"] if self.cfg.train.precision == "auto" else []) + (["TF32 matmuls"] if self.tf32 else [])
        return self.precision + (f" ({', '.join(notes)})" if notes else "")

    def optimizer_text(self) -> str:
        """Which optimizer runs, e.g. "torch AdamW (fused)"."""
        return _optimizer_text(self.optimizer)

    # ---------------------------------------------------------------------------------------- model
    @property
    def module(self) -> nn.Module:
        """The bare model (no DDP or DeepSpeed wrapper)."""
        return self.model

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def prepare(self, model: nn.Module, micro: int, accum: int) -> None:
        self.accum = accum
        self.model = model.to(self.device)
        self.optimizer = self._adamw(self.trainable())

    def _adamw(self, params) -> torch.optim.Optimizer:
        t = self.cfg.train
        # The fused kernel: one pass over all adapter tensors. On the CPU torch would otherwise loop over
        # them one op at a time (about 8 ms a step for gpt2-small's 146 adapter tensors, against 2 fused).
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), fused=fused)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(ids, last)

    def micro_step(self, boundary: bool):
        """Context for one micro-batch's forward and backward; gradients are synchronised only at the
        accumulation boundary (DDP's no_sync must cover the forward pass too)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def step(self, lr: float) -> float:
        """Clip, update, zero the gradients; returns the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def comm_bytes(self) -> int:
        """Gradient bytes all-reduced since the last call."""
        out, self._comm_bytes = self._comm_bytes, 0
        return out

    # ---------------------------------------------------------------------------------- collectives
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    # ---------------------------------------------------------------------------------------- state
    def adapter_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in names}

    def load_adapter(self, state: dict[str, torch.Tensor], source: str) -> None:
        from .lora import load_adapter_state_dict

        load_adapter_state_dict(self.module, state, source=source)

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)

    def save_sharded(self, path) -> None:
        """State that each rank writes itself (DeepSpeed's ZeRO shards); nothing here."""

    def load_sharded(self, path) -> None:
        pass

    def cleanup(self, ok: bool = True) -> None:
        pass


class DDP(Local):
    """torch DistributedDataParallel, wrapped after LoRA injection and freezing: its buckets hold only the
    adapter gradients, and a communication hook counts the bytes it all-reduces."""

    name = "ddp"

    def init(self) -> None:
        super().init()
        backend = self.cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl" and self.device.type != "cuda":
            raise UserError("dist.backend=nccl needs a CUDA GPU on every rank; use dist.backend=gloo (or auto) on CPU")
        if self.world_size > 1 and "MASTER_ADDR" not in os.environ:
            raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun or launcher/launch.py")
        self._set_env: list[str] = []
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:  # a plain process: a world of one, set up as torchrun would
                self._set_env = _world_of_one_env()
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=self.cfg.dist.timeout_s),
                                    device_id=self.device if backend == "nccl" else None)
        self.backend = backend
        self.reduced_params: set[int] = set()

    def prepare(self, model: nn.Module, micro: int, accum: int) -> None:
        self.accum = accum
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model.register_comm_hook(self, _counting_allreduce_hook)
        self.optimizer = self._adamw(self.trainable())

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def forward(self, ids, last):
        with self.autocast():
            return self.model(ids, last)

    def micro_step(self, boundary: bool):
        return contextlib.nullcontext() if boundary else self.model.no_sync()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dev = t.device
        work = t.to(self.device) if self.backend == "nccl" else t.cpu()
        dist.all_reduce(work, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return work.to(dev)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def cleanup(self, ok: bool = True) -> None:
        if dist.is_initialized():
            if ok:  # every rank is done with its collectives before any tears the group down
                dist.barrier()
            dist.destroy_process_group()
        for key in self._set_env:
            os.environ.pop(key, None)


def _world_of_one_env() -> list[str]:
    """The environment torchrun gives a single worker (rank 0 of 1, a free port on the loopback), for
    `dist.strategy=ddp|deepspeed` in a plain process; returns the keys it set."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wanted = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    return added


def _optimizer_text(opt) -> str:
    kind = type(opt)
    if kind.__module__.startswith("torch."):
        fused = " (fused)" if opt.defaults.get("fused") else " (foreach)" if opt.defaults.get("foreach") else ""
        return f"torch {kind.__name__}{fused}"
    return f"{kind.__module__.split('.')[0]} {kind.__name__}"


def _counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP's default all-reduce (average), counting what crosses the wire and which tensors."""
    buf = bucket.buffer()
    state._comm_bytes += buf.numel() * buf.element_size()
    state.reduced_params.update(id(p) for p in bucket.parameters())
    buf.div_(state.world_size)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])

