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


def parse_json(text: str | bytes) -> Any:
    """`json.loads`, where a text nested too deeply to parse (RecursionError) is a ValueError like any other
    malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def read_json(path: str | Path, fix: str) -> Any:
    """A JSON file's content. A file that cannot be read, is not UTF-8, is not JSON or nests too deeply to parse
    is a UserError naming it, followed by `fix` (what the user can do)."""
    try:
        return parse_json(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or type(e).__name__}); {fix}") from e
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError and parse_json's nesting are ValueErrors
        why = str(e) if isinstance(e.__cause__, RecursionError) else type(e).__name__
        raise UserError(f"{path} is not valid JSON ({why}); {fix}") from e


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


class OutFile:
    """A file the user named for output (`classify --out PATH`), written the one way that loses nothing: where
    PATH is a regular file or new, under a temporary name beside it, renamed into place by `commit` (a reader
    sees the old file or the new one); where it is anything else (a FIFO, a device such as /dev/null, a
    terminal), into it as it is, never replaced. A symlink is followed: its target is what is written (and the
    temporary file goes beside the target). A write that fails (a full disk) is one UserError, and `abort`
    removes the temporary file: nothing partial is left.

        out = OutFile("predictions.jsonl"); out.write("..."); out.commit()   # or out.abort() after an error
    """

    def __init__(self, path: str | Path, flag: str = "--out"):
        self.path, self.flag = Path(path), flag
        self.target = Path(os.path.realpath(self.path))  # a symlink's target (a dangling one's too)
        if self.target.is_dir():
            raise UserError(f"{flag} {self.path} is a directory; give a file name")
        self.special = self.target.exists() and not self.target.is_file()
        self.tmp: Path | None = (
            None if self.special else self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")
        )
        self.written = 0
        try:
            self.stream = open(self.target if self.tmp is None else self.tmp, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise UserError(f"cannot write {flag} {self.path} ({e.strerror}); pick a writable path") from e

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except OSError as e:
            raise self._failed(e) from e
        self.written += len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise self._failed(e) from e

    def commit(self) -> None:
        """Everything written: close, and (a regular file) rename it into place."""
        try:
            self.stream.close()
            if self.tmp is not None:
                os.replace(self.tmp, self.target)
                self.tmp = None
        except OSError as e:
            raise self._failed(e) from e

    def abort(self) -> None:
        """After an error: close, remove the temporary file; an existing PATH is left as it was."""
        try:
            self.stream.close()
        except OSError:
            pass
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def _failed(self, e: OSError) -> UserError:
        self.abort()
        return write_error(
            self.target.parent, self.written, e, self.path.name, f"free some space, or pass another {self.flag}"
        )
