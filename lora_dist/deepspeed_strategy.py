"""DeepSpeed ZeRO (stages 0-3, optimizer CPU offload) behind the same strategy interface as DDP.

    torchrun --nproc_per_node=2 -m lora_dist train --config configs/smoke.yaml \\
        dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero3.json

The DeepSpeed file says how to shard; the project config says what to train. Batch sizes, learning rate,
betas, weight decay, clipping and precision are filled from the project config ("auto" in the file), and a
file that sets them to something else is refused, so the two never disagree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import yaml
from torch import nn

from .errors import UserError
from .strategy import DDP

TAG = "state"


def deepspeed_config(cfg, micro: int, accum: int, world: int, device_type: str = "cuda", precision: str | None = None) -> dict:
    """The DeepSpeed config dict: the user's file with the project's values filled in."""
    path = cfg.dist.deepspeed_config
    user: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"dist.deepspeed_config={path} not found; use one of configs/deepspeed/*.json")
        try:
            user = yaml.safe_load(p.read_text()) or {}  # JSON is YAML
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid JSON/YAML ({str(e).splitlines()[0]})")
    t = cfg.train
    precision = precision or t.precision  # the resolved precision (train.precision may say "auto")
    ours = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if device_type == "cpu":  # torch's AdamW: no C++ op to compile, and the same update as the DDP path
        ours["optimizer"]["params"]["torch_adam"] = True
    merged = _fill(user, ours, path or "the DeepSpeed config")
    merged.setdefault("zero_optimization", {"stage": 0})
    merged.setdefault("steps_per_print", 10**9)
    merged.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's own counters of every collective's size, read after each step (allreduce_bytes metric).
    merged.setdefault("comms_logger", {"enabled": True, "verbose": False, "prof_all": True, "debug": False})
    merged.setdefault("zero_allow_untested_optimizer", True)
    return merged


def _fill(user: dict, ours: dict, source: str, prefix: str = "") -> dict:
    out = dict(user)
    for k, v in ours.items():
        have = user.get(k, "auto")
        if isinstance(v, dict):
            out[k] = _fill(have if isinstance(have, dict) else {}, v, source, prefix + k + ".")
        elif have == "auto":
            out[k] = v
        elif have != v:
            raise UserError(
                f"{source} sets {prefix}{k}={have!r} but the project config gives {v!r}; "
                f"write \"auto\" there and set it in the project config (train.*)"
            )
    return out


class DeepSpeed(DDP):
    name = "deepspeed"

    def prepare(self, model: nn.Module, micro: int, accum: int) -> None:
        import deepspeed

        self.accum = accum
        self.ds_config = deepspeed_config(self.cfg, micro, accum, self.world_size, self.device.type, self.precision)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        model = model.to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config, dist_init_required=False
        )
        self._logged_bytes = _reduced_bytes()

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def forward(self, ids, last):
        return self.model(ids, last)  # DeepSpeed applies its own bf16/fp16

    def micro_step(self, boundary: bool):
        return contextlib.nullcontext()  # DeepSpeed knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not boundary:
            self.model.step()  # counts the micro-step; no update before the boundary

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        now = _reduced_bytes()
        self._comm_bytes += now - self._logged_bytes
        self._logged_bytes = now
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def adapter_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full tensors, gathered from their ZeRO-3 partitions (every rank must call this)."""
        import deepspeed

        params = dict(self.module.named_parameters())
        chosen = [params[n] for n in names]
        with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None, enabled=self.stage == 3):
            return {n: p.detach().float().cpu().clone() for n, p in zip(names, chosen)}

    def load_adapter(self, state, source: str) -> None:
        """Nothing to do: `load_sharded` restores every trainable tensor from DeepSpeed's own module state
        (partitioned under ZeRO-3), and frozen tensors are rebuilt identically from the seed."""

    def optimizer_state(self) -> dict | None:
        return None  # sharded: see save_sharded

    def save_sharded(self, path) -> None:
        self.model.save_checkpoint(str(Path(path) / "deepspeed"), tag=TAG, exclude_frozen_parameters=True)

    def load_sharded(self, path) -> None:
        load_path, _ = self.model.load_checkpoint(str(Path(path) / "deepspeed"), tag=TAG, load_module_strict=False)
        if load_path is None:
            raise UserError(f"checkpoint {path} has no DeepSpeed state; resume it with the strategy it was written with")


def _reduced_bytes() -> int:
    """Bytes of all reduce-type collectives so far (all-reduce, reduce-scatter, reduce), from DeepSpeed's
    comms logger; parameter all-gathers (ZeRO-3) are not gradient traffic and are left out."""
    from deepspeed.comm.comm import comms_logger

    return sum(size * rec[0] for name, sizes in comms_logger.comms_dict.items() if "reduce" in name
               for size, rec in sizes.items())

