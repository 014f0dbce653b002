"""The benchmark harness runs end to end on the tiny model, and its FLOP count is the issue's."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env

sys.path.insert(0, str(ROOT / "bench"))


def test_flop_count_and_limit():
    from flops import limit_examples_per_s, linear_params, step_flops

    from lora_dist.model import SIZES

    small = SIZES["gpt2-small"]
    assert linear_params(small) == 84_934_656  # the "85M"
    assert limit_examples_per_s(small, 30.45, 200.0) == pytest.approx(19.3, abs=0.1)
    # padding to 120 costs at least 120/30 times the work of 30 real tokens
    assert step_flops(small, 16, [30] * 8, 120) > 4 * step_flops(small, 16, [30] * 8)


@pytest.mark.slow
def test_harness_smoke(tmp_path):
    pytest.importorskip("peft", reason="peft is a bench/test dependency (pip install -e .[dev])")
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--model", "tiny", "--contenders", "a,c",
                           "--batches", "2", "--passes", "1", "--steps", "1", "--warmup", "1", "--probe-seconds", "0.05",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    for name in ("a", "c"):
        r = doc["contenders"][name]
        assert r["timed_steps"] == 2 and r["examples"] == 16 and 0 < r["real_tokens"] <= r["padded_tokens"]
        assert r["examples_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["model_flops_per_step"] > 0
    assert "a/c examples_per_s" in doc["ratios"] and doc["command"].startswith("python bench/train_throughput.py")
    assert "| (a) lora-dist, defaults |" in proc.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """The GPU check is one prepared script; its --dry-run takes every step on the CPU with the tiny model, so
    a broken flag or path shows up here and not on the rented GPU."""
    pytest.importorskip("peft", reason="peft is a bench/test dependency (pip install -e .[dev])")
    env = cli_env() | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    results = list(tmp_path.rglob("*.json"))
    assert results, proc.stdout[-2000:]
    for path in results:
        json.loads(path.read_text())  # every result file parses


@pytest.mark.slow
def test_classify_benchmark_quick(tmp_path):
    """bench/classify_throughput.py end to end on the tiny model: (a) and (b) in their own processes, and they agree."""
    pytest.importorskip("peft", reason="peft is a bench/test dependency (pip install -e .[dev])")
    proc = subprocess.run([sys.executable, "bench/classify_throughput.py", "--quick", "--contenders", "a-fp32,b",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "classify_throughput.json").read_text())
    assert doc["messages"] == {"sms-test": 24, "collection-40": 40} and doc["adapter_bytes"] > 0
    for name in ("a-fp32", "b"):
        r = doc["contenders"][name]
        assert r["peak_rss_mb"] > 0 and all(d["messages_per_s"] > 0 and d["messages_per_cpu_s"] > 0 for d in r["datasets"].values())
    assert doc["agreement"]["a-fp32 vs b"] == {"sms-test": 1.0, "collection-40": 1.0}
    assert "| (b) transformers pipeline, PEFT model |" in (tmp_path / "classify_throughput.md").read_text()
