"""Export an adapter to the Hugging Face ecosystem, and read PEFT adapters back.

    lora-dist export runs/smoke --format peft --out exports/smoke-peft
    lora-dist export runs/smoke --format merged --out exports/smoke-merged
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def is_peft_dir(path) -> bool:
    """Whether PATH is a PEFT adapter directory (adapter_config.json with a peft_type)."""
    f = Path(path) / "adapter_config.json"
    try:
        return f.is_file() and "peft_type" in json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def read_peft(path: Path):
    raise UserError(f"{path}: reading PEFT adapters is not built yet")
