"""bench/gpu_check.sh without the bench extras: step 2 leaves (c) transformers + PEFT out and says so
(issue 13, item 12), and the other contenders still run.

    pytest tests/test_gpu_scripts.py
"""

import subprocess
import sys

import pytest
from conftest import ROOT, cli_env


@pytest.mark.slow  # 10-18 s: make test runs it, make test-fast not
def test_gpu_check_without_transformers_leaves_c_out_and_says_so(tmp_path):
    hidden = tmp_path / "hide"
    for name in ("transformers", "peft"):  # importable no more, as in the GPU image
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "out"
    out.mkdir()
    env = cli_env(
        OUT=out,
        PYTHON=sys.executable,
        PYTHONPATH=f"{hidden}:{ROOT}",
        GPU_CHECK_STEPS="2",
    )
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "== 2. leaving (c) out: transformers/peft cannot be imported" in proc.stdout
    assert "| (a) lora-dist, defaults |" in proc.stdout and "(c)" not in proc.stdout.split("leaving (c) out")[1]
    assert "== 1." not in proc.stdout and "== 3." not in proc.stdout
