"""What produced a run: the git commit of the lora-dist source, when it is a git checkout.

python -c "from lora_dist.provenance import git_info; print(git_info())"
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent


def git_info(path: Path = SOURCE) -> dict:
    """{"git_commit": sha or None, "git_dirty": True/False or None}; None when git or the checkout is absent."""
    commit = _git(path, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _git(path: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
