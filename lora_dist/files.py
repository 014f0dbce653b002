"""Files as lora-dist writes and checks them: written whole or not at all, readable by others, hashed.

python -c "from lora_dist.files import sha256; print(sha256('lora_dist/assets/SMSSpamCollection'))"
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 16 MiB pieces (a 6 GB model never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` under a temporary name beside `path`, then rename it into place: a reader sees the old
    file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions open() gives (0666 less the umask): safetensors creates
    its files 0600, so a run's adapter was unreadable to anyone else (a container's user, a shared cluster)."""
    _save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
