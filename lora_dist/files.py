"""Files as lora-dist writes and checks them: written whole or not at all, readable by others, hashed.

python -c "from lora_dist.files import sha256; print(sha256('lora_dist/assets/SMSSpamCollection'))"
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as _save_file

from .errors import UserError


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 16 MiB pieces (a 6 GB model never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path, fix: str) -> Any:
    """A JSON file's content. A file that cannot be read, is not UTF-8, is not JSON or nests too deeply to parse
    is a UserError naming it, followed by `fix` (what the user can do)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or type(e).__name__}); {fix}") from e
    except RecursionError as e:
        raise UserError(f"{path} is not valid JSON (nested too deeply); {fix}") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); {fix}") from e


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` under a temporary name beside `path`, then rename it into place: a reader sees the old
    file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(target.parent, len(raw), e, target.name, "free some space, or write to another disk") from e
    return target


WRITE_ERRORS = (OSError, SafetensorError)  # what a failed write raises: Python's own, and safetensors' (Rust) one
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_error(directory: Path, needed: int, e: Exception, what: str, fix: str) -> UserError:
    """The one line for a write of `what` (`needed` bytes) into `directory` that failed with `e`. A full disk
    (ENOSPC, or a quota: EDQUOT; safetensors reports them as "(os error 28)") names the disk, its free space
    and the size needed; anything else, its reason."""
    code = e.errno if isinstance(e, OSError) else _os_error(str(e))
    if code not in DISK_FULL:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return UserError(f"writing {what} into {directory} failed ({reason}); {fix}")
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    mount = where.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    free = shutil.disk_usage(where).free
    return UserError(
        f"the disk holding {directory} (mounted at {mount}) is full: {_mib(free)} free, {_mib(needed)} needed to "
        f"write {what}; {fix}"
    )


def _os_error(text: str) -> int | None:
    m = re.search(r"\(os error (\d+)\)", text)
    return int(m[1]) if m else None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions open() gives (0666 less the umask): safetensors creates
    its files 0600, so a run's adapter was unreadable to anyone else (a container's user, a shared cluster)."""
    _save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
