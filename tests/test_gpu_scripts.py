"""bench/gpu_check.sh without the bench extras: step 3 leaves (c) transformers + PEFT out and says so
(issue 13, item 12). The GPU image has neither transformers nor peft.

    pytest tests/test_gpu_scripts.py
"""

import subprocess
import sys

from conftest import ROOT, cli_env


def test_gpu_check_step_3_without_transformers_skips_c_and_says_so(tmp_path):
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
        GPU_CHECK_STEPS="3",
        SMALL_CONTENDERS="c",
        GPU_CHECK_NO_INSTALL="1",
    )
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "== 3. skipping (c) transformers + PEFT: transformers/peft cannot be imported" in proc.stdout
    assert "== 3. no contender left to run" in proc.stdout  # (a), (b) ... run as before: tests/test_bench.py
    assert "== 1." not in proc.stdout and "== 2." not in proc.stdout
