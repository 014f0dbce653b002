"""Packaging: building lora-dist says nothing a user must read past (`make train` builds it once).

    pytest tests/test_packaging.py

The wheel is built offline from a copy of the tree, with the venv's setuptools (no build isolation, so
nothing is downloaded); its warnings are what `pip install -e .` shows a user on every set-up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_the_wheel_builds_without_warnings_and_holds_the_assets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lora_dist", src / "lora_dist", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    for word in ("Warning", "deprecated", "is absent from the `packages`"):
        assert word not in said, said[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lora_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("SMSSpamCollection", "encoder.json", "vocab.bpe", "serve.html"):
        assert f"lora_dist/assets/{asset}" in names, asset
