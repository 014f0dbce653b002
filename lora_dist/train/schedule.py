"""Learning-rate schedules as pure functions of the step, so resuming needs nothing but the step.

python -c "from lora_dist.schedule import lr_at; print([lr_at(s, 1e-3, 100, 'cosine', 10) for s in (0, 10, 100)])"
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warm-up, then constant/cosine/linear."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")
