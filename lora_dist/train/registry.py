"""`dist.strategy`'s names and the backends they make: the one place a backend is chosen.

    python -c "from lora_dist.train.registry import STRATEGIES; print(list(STRATEGIES))"

A new backend is a class that meets `train/backend.py`'s `Strategy` protocol, and one line here.
"""

from __future__ import annotations

from ..config import STRATEGY_NAMES, Config
from ..device import DistEnv, pick_device
from ..errors import UserError
from .backend import Strategy
from .deepspeed_strategy import DeepSpeed
from .strategy import DDP, Local

STRATEGIES: dict[str, type[Local]] = {"none": Local, "ddp": DDP, "deepspeed": DeepSpeed}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "config.STRATEGY_NAMES and the registry name the same backends"


def backend_class(name: str, world_size: int) -> type[Local]:
    """The class `dist.strategy=name` makes (auto: DDP under a launcher of several processes, else none)."""
    if name == "auto":
        name = "ddp" if world_size > 1 else "none"
    if name == "none" and world_size > 1:
        raise UserError(
            f"dist.strategy=none, but {world_size} processes were launched; use dist.strategy=ddp or deepspeed (or auto)"
        )
    return STRATEGIES[name]


def make_strategy(cfg: Config, env: DistEnv | None = None) -> Strategy:
    """The backend `dist.strategy` names, on this rank's device."""
    env = env or DistEnv.from_environ()
    kind = backend_class(cfg.dist.strategy, env.world_size)
    return kind(cfg, env, pick_device(cfg.train.device, env.local_rank))
