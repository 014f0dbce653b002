"""What the training loop, the sweep and CUDA graphs ask of a backend: the `Strategy` protocol.

    python -c "from lora_dist.train.registry import STRATEGIES as S; print({k: (v.captures_graphs, v.shards_state) for k, v in S.items()})"

Callers are typed against this protocol, never against a backend class, and ask a backend's capabilities
(class attributes, so they can be read before a backend exists) instead of comparing its name:

- `captures_graphs`: its whole step is one process's own forward, backward and optimizer step, which a CUDA
  graph can hold (`train/graphs.py`).
- `owns_precision`: it applies bf16/fp16 itself (no autocast around its forward); `auto` precision on the CPU
  is then fp32 (`device.resolve_precision`).
- `owns_optimizer`: it builds one optimizer (and one gradient clip) over every trained tensor itself, so a
  sweep cannot give each adapter its own (`train/sweep_config.py`).
- `shards_state`: each rank writes its own shard of the training state, so a checkpoint resumes only at the
  world size that wrote it (`train/loop.py`).

The backends are `train/strategy.py`'s `Local` and `DDP` and `train/deepspeed_strategy.py`'s `DeepSpeed`;
`train/registry.py` maps `dist.strategy`'s names to them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from ..config import Config
from ..data import Batch
from ..device import DistEnv

M = TypeVar("M", bound=nn.Module)


class Strategy(Protocol):
    name: str  # dist.strategy's name for it
    captures_graphs: ClassVar[bool]
    owns_precision: ClassVar[bool]
    owns_optimizer: ClassVar[bool]
    shards_state: ClassVar[bool]

    cfg: Config
    env: DistEnv
    device: torch.device
    rank: int
    world_size: int
    precision: str  # resolved: fp32, bf16 or fp16
    use_graphs: bool  # this run's step is a CUDA graph per batch shape (captures_graphs, on CUDA, nothing against)
    class_weight: torch.Tensor | None  # data.balance=weight: the loss's per-class weights (train/loss.py)
    model: Any  # as the backend wraps it (nn.Module, DistributedDataParallel, a DeepSpeed engine), after prepare
    optimizer: Any

    @property
    def module(self) -> nn.Module: ...  # the bare model

    def precision_text(self) -> str: ...
    def optimizer_text(self) -> str: ...
    def trainable(self) -> list[nn.Parameter]: ...
    def place(self, model: M) -> M: ...  # on this rank's device, in the backend's storage precision
    def prepare(self, model: nn.Module, micro: int, accum: int) -> None: ...
    def train_micro(
        self, batch: Batch, boundary: bool, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor | float | None]: ...
    def autocast(self) -> AbstractContextManager[Any]: ...
    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor: ...
    def micro_step(self, boundary: bool) -> AbstractContextManager[Any]: ...
    def backward(self, loss: torch.Tensor, boundary: bool) -> None: ...
    def step(self, lr: float) -> torch.Tensor | float: ...
    def sync_grads(self, params: list[torch.Tensor]) -> None: ...
    def comm_bytes(self) -> int | None: ...
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...
    def adapter_state(self, names: list[str]) -> dict[str, torch.Tensor]: ...
    def load_adapter(self, state: dict[str, torch.Tensor], source: str) -> None: ...
    def optimizer_state(self) -> dict[str, Any] | None: ...
    def load_optimizer_state(self, sd: dict[str, Any]) -> None: ...
    def save_sharded(self, path: str | Path) -> None: ...
    def load_sharded(self, path: str | Path) -> None: ...
    def cleanup(self, ok: bool = True) -> None: ...
