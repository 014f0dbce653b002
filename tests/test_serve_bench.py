"""The multi-adapter and service benchmarks run end to end in their quick modes, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env()
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_multi_adapter_bench_quick(tmp_path):
    p = bench(
        "bench/multi_adapter.py",
        "--model",
        "tiny",
        "--counts",
        "1,3",
        "--rows",
        "12",
        "--batch",
        "4",
        "--repeats",
        "1",
        "--merged-max",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    )
    (path,) = tmp_path.glob("multi-adapter-tiny-*.json")
    doc = json.loads(path.read_text())
    one, three = doc["results"]
    assert (one["adapters"], three["adapters"]) == (1, 3) and one["rows"] == 12
    assert (
        one["mixed_msg_s"] > 0 and three["loop_msg_s"] > 0 and one["merged_msg_s"] > 0 and "merged_msg_s" not in three
    )
    assert three["stacked_adapters_mb"] == pytest.approx(3 * one["stacked_adapters_mb"], rel=0.01)
    assert "(estimated)" in doc["table"] and "| 3 |" in p.stdout


@pytest.mark.slow
def test_serve_load_bench_quick(tmp_path):
    p = bench(
        "bench/serve_load.py",
        "--model",
        "tiny",
        "--adapters",
        "2",
        "--requests",
        "6",
        "--clients",
        "1,3",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    )
    assert "a quick run, not the benchmark" in p.stderr
    (path,) = tmp_path.glob("serve-load-tiny-*-quick.json")
    doc = json.loads(path.read_text())
    assert not doc["full_run"]
    for mode in ("batching", "none"):
        assert [r["clients"] for r in doc["results"][mode]] == [1, 3]
        for r in doc["results"][mode]:
            assert r["requests"] == 6 and r["failures"] == 0 and r["p50_ms"] <= r["p99_ms"]
            assert sum(r["batch_size_histogram"].values()) >= 1
    assert all(set(r["batch_size_histogram"]) == {"1.0"} for r in doc["results"]["none"])


@pytest.mark.slow
def test_serve_many_bench_quick(tmp_path):
    p = bench(
        "bench/serve_many.py",
        "--model",
        "tiny",
        "--n",
        "30",
        "--requests",
        "24",
        "--max-loaded",
        "4",
        "--clients",
        "3",
        "--threads",
        "1",
        "--cache",
        str(tmp_path / "adapters"),
        "--out",
        str(tmp_path),
    )
    assert "a quick run, not the benchmark" in p.stderr
    (path,) = tmp_path.glob("serve-many-tiny-*-quick.json")
    doc = json.loads(path.read_text())
    od, pre = doc["results"]["on_demand"], doc["results"]["preloaded"]
    assert od["failures"] == 0 and pre["failures"] == 0 and od["requests"] == pre["requests"] == 24
    assert od["hit"]["n"] + od["miss"]["n"] == 24 and od["miss"]["n"] >= 4  # 4 slots: every first use a miss
    assert pre["miss"]["n"] == 0 and pre["max_loaded"] == doc["distinct_adapters"]
    assert len(list((tmp_path / "adapters" / "adapters").iterdir())) == 30
    assert path.with_suffix(".md").read_text().count("| --max-loaded") == 2
