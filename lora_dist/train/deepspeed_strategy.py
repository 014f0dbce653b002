"""DeepSpeed ZeRO (stages 0-3, optimizer CPU offload) behind the strategy protocol (`train/backend.py`).

    torchrun --nproc_per_node=2 -m lora_dist train --config configs/smoke.yaml \\
        dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero3.json

The DeepSpeed file says how to shard; the project config says what to train. Batch sizes, learning rate,
betas, weight decay, clipping and precision are filled from the project config ("auto" in the file), and a
file that sets them to something else is refused, so the two never disagree.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..config import Config
from ..errors import UserError
from .strategy import Distributed, optimizer_text_of

TAG = "state"
COMMS_SAMPLE_EVERY = 10  # steps 1, 11, 21, ... count their collectives


def deepspeed_config(
    cfg: Config, micro: int, accum: int, world: int, device_type: str = "cuda", precision: str | None = None
) -> dict:
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
            raise UserError(f"{path} is not valid JSON/YAML ({str(e).splitlines()[0]})") from e
    t = cfg.train
    precision = precision or t.precision  # the resolved precision (train.precision may say "auto")
    ours: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if cfg.dist.deepspeed_optimizer == "torch":
        # torch's AdamW, fused, as the DDP path runs it: nothing to compile. DeepSpeed's FusedAdam would be
        # JIT-built at first use and needs nvcc of torch's CUDA version (MissingCUDAException, or
        # CUDAMismatchException beside a `module load cuda` of another version).
        ours["optimizer"]["params"] |= {"torch_adam": True, "fused": True}
    merged = _fill(user, ours, path or "the DeepSpeed config")
    merged.setdefault("zero_optimization", {"stage": 0})
    merged.setdefault("steps_per_print", 10**9)
    merged.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's own counters of every collective's size (allreduce_bytes metric). The logger synchronises
    # the GPU after each collective while it is enabled, so it is enabled for one step in COMMS_SAMPLE_EVERY.
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
                f'write "auto" there and set it in the project config (train.*)'
            )
    return out


def import_deepspeed() -> Any:
    """The deepspeed module, or one error line that says how to install it (every rank raises the same)."""
    quiet_deepspeed()
    try:
        import deepspeed
    except ImportError as e:
        missing = "it is not installed" if e.name in (None, "deepspeed") else f"its dependency {e.name} is missing"
        raise UserError(
            f"dist.strategy=deepspeed needs DeepSpeed, and {missing}: .venv/bin/pip install -e '.[deepspeed]' "
            f"(make setup installs it), or use dist.strategy=ddp"
        ) from e
    return deepspeed


def quiet_deepspeed() -> None:
    """Two lines no user acts on, which rank 0 printed (more than once): DeepSpeed's "Setting accelerator to CPU"
    on a machine without a GPU, and torch's FutureWarning that ZeRO's all_gather_into_tensor is deprecated."""
    if not torch.cuda.is_available():  # DeepSpeed's logger, named before DeepSpeed is imported (its import logs it)
        logging.getLogger("DeepSpeed").addFilter(lambda r: "Setting accelerator to CPU" not in r.getMessage())
    warnings.filterwarnings(
        "ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated", category=FutureWarning
    )


class DeepSpeed(Distributed):
    """DeepSpeed's engine owns the optimizer, the mixed precision and (under ZeRO) the sharded state."""

    name = "deepspeed"
    owns_precision = True
    owns_optimizer = True
    shards_state = True

    def init(self) -> None:
        import_deepspeed()  # before the process group, the data and the model: a missing DeepSpeed fails at once
        super().init()

    def prepare(self, model: nn.Module, micro: int, accum: int) -> None:
        deepspeed = import_deepspeed()
        if self.device.type == "cpu":
            _skip_shm_kernel(deepspeed)
        self.accum = accum
        self.ds_config = deepspeed_config(self.cfg, micro, accum, self.world_size, self.device.type, self.precision)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        model = model.to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config, dist_init_required=False
        )
        self._steps = 0
        self._sampled_bytes: int | None = None
        self._counting = False
        _count_collectives(False)
        self._count_next = True

    def optimizer_text(self) -> str:
        return optimizer_text_of(self.model.basic_optimizer)

    def micro_step(self, boundary: bool) -> contextlib.AbstractContextManager[Any]:
        if self._count_next and not self._counting:  # a sampled step: count from its first micro-batch on
            self._counting = True
            self._logged_bytes = _reduced_bytes()
            _count_collectives(True)
        return contextlib.nullcontext()  # DeepSpeed knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not boundary:
            self.model.step()  # counts the micro-step; no update before the boundary

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        self._steps += 1
        if self._counting:
            _count_collectives(False)
            self._counting = False
            self._sampled_bytes = _reduced_bytes() - self._logged_bytes
        self._count_next = self._steps % COMMS_SAMPLE_EVERY == 0
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def comm_bytes(self) -> int | None:
        """Bytes reduced in the last sampled step (steps 1, 11, 21, ...), None on the steps between."""
        out, self._sampled_bytes = self._sampled_bytes, None
        return out

    def adapter_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full fp32 tensors: under bf16/fp16 the optimizer's fp32 master weights, not the module's 16-bit
        copy; under ZeRO-3 gathered from their partitions. Every rank must call this."""
        from deepspeed.utils import safe_get_full_fp32_param

        deepspeed = import_deepspeed()

        params = dict(self.module.named_parameters())
        chosen = [params[n] for n in names]
        out = {}
        for n, p in zip(names, chosen, strict=True):
            master = safe_get_full_fp32_param(p)  # collective under ZeRO; None where no master copy exists
            if master is not None:
                out[n] = master.detach().float().cpu().clone()
        rest = [(n, p) for n, p in zip(names, chosen, strict=True) if n not in out]
        # ZeRO stage 0 with fp16 keeps no mapping. Every rank warns; only rank 0's output shows it (tracking.output_for)
        if rest and self.precision != "fp32":
            warnings.warn(
                f"DeepSpeed exposes no fp32 master copy of {rest[0][0]} (and {len(rest) - 1} more) under "
                f"ZeRO stage {self.stage} with {self.precision}; saving the {self.precision} copy. "
                f"ZeRO stage 1-3, or bf16, save fp32.",
                stacklevel=2,
            )
        with deepspeed.zero.GatheredParameters(
            [p for _, p in rest], modifier_rank=None, enabled=self.stage == 3 and bool(rest)
        ):
            out |= {n: p.detach().float().cpu().clone() for n, p in rest}
        return {n: out[n] for n in names}

    def load_adapter(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Nothing to do: `load_sharded` restores every trainable tensor from DeepSpeed's own module state
        (partitioned under ZeRO-3), and frozen tensors are rebuilt identically from the seed."""

    def optimizer_state(self) -> dict | None:
        return None  # sharded: see save_sharded

    def save_sharded(self, path: str | Path) -> None:
        self.model.save_checkpoint(str(Path(path) / "deepspeed"), tag=TAG, exclude_frozen_parameters=True)

    def load_sharded(self, path: str | Path) -> None:
        load_path, _ = self.model.load_checkpoint(str(Path(path) / "deepspeed"), tag=TAG, load_module_strict=False)
        if load_path is None:
            raise UserError(
                f"checkpoint {path} has no DeepSpeed state; resume it with the strategy it was written with"
            )


def _skip_shm_kernel(deepspeed: Any) -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce kernel with gcc when it starts (one to three
    minutes on a first run, and it needs a compiler). Only DeepSpeed's inference all-reduce uses it; ZeRO
    training reduces through torch.distributed (gloo), so marking it unavailable changes no number."""
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False  # ShareMemCommBuilder.NAME


def _count_collectives(on: bool) -> None:
    """DeepSpeed's comms logger on or off. While on it synchronises the GPU after every collective (which
    removes the overlap of communication with compute, ZeRO-3's prefetch above all), so it is on only for
    the sampled steps."""
    from deepspeed.comm.comm import comms_logger

    comms_logger.enabled = on


def _reduced_bytes() -> int:
    """Bytes of all reduce-type collectives so far (all-reduce, reduce-scatter, reduce), from DeepSpeed's
    comms logger; parameter all-gathers (ZeRO-3) are not gradient traffic and are left out."""
    from deepspeed.comm.comm import comms_logger

    return sum(
        size * rec[0]
        for name, sizes in comms_logger.comms_dict.items()
        if "reduce" in name
        for size, rec in sizes.items()
    )
