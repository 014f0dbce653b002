"""The benchmark harness runs end to end on the tiny model, and its FLOP count is the issue's."""

import json
import subprocess
import sys
import tarfile

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


def bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT ARGS` from the repository root, as a user runs it; it must succeed."""
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_harness_smoke(tmp_path):
    import peft  # noqa: F401  (a dev extra, which contender c needs)

    quick = ("--batches", "2", "--passes", "1", "--steps", "1", "--warmup", "1", "--probe-seconds", "0.05")
    proc = bench(
        "train_throughput.py", "--model", "tiny", "--contenders", "a,c", *quick, "--out", str(tmp_path), timeout=120
    )
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    for name in ("a", "c"):
        r = doc["contenders"][name]
        assert r["timed_steps"] == 2 and r["examples"] == 16 and 0 < r["real_tokens"] <= r["padded_tokens"]
        assert r["examples_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["model_flops_per_step"] > 0
    assert "a/c examples_per_s" in doc["ratios"] and doc["command"].startswith("python bench/train_throughput.py")
    assert "| (a) lora-dist, defaults |" in proc.stdout


@pytest.mark.slow
def test_sweep_throughput_harness(tmp_path):
    """bench/sweep_throughput.py end to end on the tiny model: both sides measured for each N, the results file."""
    quick = ("--counts", "1,2", "--steps", "4", "--warmup", "1", "--messages", "120", "--threads", "1")
    proc = bench("sweep_throughput.py", *quick, "--out", str(tmp_path), timeout=600)
    (path,) = tmp_path.glob("sweep-throughput-tiny-*.json")
    doc = json.loads(path.read_text())
    assert [r["adapters"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["sweep"]["steps"] == 3 and r["sequential"]["steps"] == 3 * r["adapters"]
        assert r["speedup"] == pytest.approx(r["sweep_examples_per_s"] / r["sequential_examples_per_s"])
    assert "| 2 |" in proc.stdout and doc["command"].startswith("python bench/sweep_throughput.py")


# The stand-in for `python` in the GPU check's dry run: it records every command, checks each against the
# real parsers (the config and its overrides through load_config, bench flags through train_throughput's
# argparse and the contender table, profile_step's flags), and writes what the real program would write: a
# run's results.json and metrics.jsonl, a throughput file whose contenders carry figures. Heredocs (`python -`),
# `-c` and the summary script run in the real interpreter, on those files.
STUB = r"""
import json, os, sys, time
sys.path[:0] = [os.environ["STUB_ROOT"], os.path.join(os.environ["STUB_ROOT"], "bench")]
args = sys.argv[1:]
if args[:1] in (["-"], ["-c"], ["bench/gpu_summary.py"]):
    os.execv(os.environ["STUB_PYTHON"], [os.environ["STUB_PYTHON"], *args])
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args[:3] == ["-m", "lora_dist", "train"]:
    from lora_dist import load_config
    assert args[3] == "--config"
    cfg = load_config(args[4], args[5:])
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        f.write(os.environ["STUB_RESULTS"])
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"time": time.time(), "event": "first_step", "step": 1}) + "\n")
elif args[:1] == ["bench/train_throughput.py"]:
    import train_throughput
    from contenders import VARIANTS

    def run(ns):
        names = ns.contenders.split(",")
        unknown = [c for c in names if c not in VARIANTS]
        assert not unknown, unknown
        figures = {c: {"tokens_per_s": 1000.0 * (i + 1), "mfu": 0.5, "cuda_max_allocated_mb": 2048.0 * (i + 1)}
                   for i, c in enumerate(names)}
        path = os.path.join(ns.out, "throughput-" + ns.tag + ".json")
        with open(path, "w") as f:
            json.dump({"settings": vars(ns), "contenders": figures}, f)
        sys.exit(0)

    train_throughput.run = run
    train_throughput.main(args[1:])
elif args[:1] == ["bench/profile_step.py"]:
    import argparse
    from contenders import VARIANTS
    assert args[1] in VARIANTS, args
else:
    sys.exit("unexpected command: " + " ".join(args))
"""


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path, baseline):
    """The GPU check is one prepared script that runs on a rented GPU; its --dry-run takes every step of the
    script on the CPU with a stand-in interpreter (STUB), so a broken flag, path or field shows up here in
    seconds, and the summary JSON is made from what the steps wrote. The programs it calls are tested for
    themselves (test_harness_smoke, tests/test_train.py)."""
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    log, out = tmp_path / "commands.jsonl", tmp_path / "out"
    out.mkdir()
    env = cli_env() | {
        "OUT": str(out),
        "PYTHON": str(stub),
        "STUB_LOG": str(log),
        "STUB_ROOT": str(ROOT),
        "STUB_PYTHON": sys.executable,
        "STUB_RESULTS": json.dumps(baseline),
    }
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    trains = [c for c in commands if c[:3] == ["-m", "lora_dist", "train"]]
    benches = [c for c in commands if c[:1] == ["bench/train_throughput.py"]]
    profiles = [c for c in commands if c[:1] == ["bench/profile_step.py"]]
    assert len(trains) == 3 and len(benches) == 2 and len(profiles) == 1 and len(commands) == 6, commands
    assert [c[4] for c in trains] == [
        "configs/gpt2-small-lora.yaml",
        "configs/book/appendix-e.yaml",
        "configs/gpt2-xl-lora.yaml",
    ]
    for c in trains:
        assert "train.device=cpu" in c and "model.name=tiny" in c and "model.weights=random" in c
    assert "train.batch_size=8" in trains[2] and "train.max_steps=2" in trains[2]
    (archive,) = out.glob("gpu-check-dry-run-logs.tar.gz")  # the logs come back as one file (8 at most may)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        docs = [json.load(tar.extractfile(n)) for n in names if n.split("/")[-1].startswith("throughput-")]
    settings = {doc["settings"]["tag"]: doc["settings"] for doc in docs}
    assert {"gpu-check-dry-run/gpu_check.log", "gpu-check-dry-run/status", "gpu-check-dry-run/e2e-defaults.log"} <= set(
        names
    )
    assert (
        settings["small"]["contenders"] == "a,a-castonce,a-nographs,c"
        and settings["xl"]["contenders"] == "a,a-pad16,a-ckpt"
    )
    assert all(d["device"] == "cpu" and d["precision"] == "bf16" and d["model"] == "tiny" for d in settings.values())
    # The summary, from those files: every field the issue names, with the stand-in's figures.
    (summary_file,) = out.glob("gpu-check-dry-run.json")
    doc = json.loads(summary_file.read_text())
    assert doc["device"] == "cpu" and doc["train_seconds"] == baseline["train_seconds"] and doc["e2e_seconds"] > 0
    assert doc["small_vs_peft"] == pytest.approx(1000 / 4000) and doc["xl_mfu"] == 0.5  # (a) first of 4, (c) last
    assert doc["xl_peak_memory_gb"] == {"plain": 2.0, "activation_checkpointing": 6.0}  # a, a-pad16, a-ckpt
    assert 0 < doc["xl_first_step_seconds"] < 300
    assert doc["status"] == {"e2e-defaults": 0, "e2e-book": 0, "small": 0, "xl-start": 0, "xl": 0, "profile": 0}
    assert doc["targets"]["small_vs_peft >= 4.0"] is False and doc["targets"]["xl_mfu >= 0.4"] is True


@pytest.mark.slow
def test_classify_benchmark_quick(tmp_path):
    """bench/classify_throughput.py end to end on the tiny model: (a) and (b) in their own processes, and they agree."""
    proc = subprocess.run(
        [sys.executable, "bench/classify_throughput.py", "--quick", "--contenders", "a,b", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "classify_throughput.json").read_text())
    assert doc["messages"] == {"sms-test": 24, "collection-40": 40} and doc["adapter_bytes"] > 0
    for name in ("a", "b"):
        r = doc["contenders"][name]
        assert r["peak_rss_mb"] > 0 and all(
            d["messages_per_s"] > 0 and d["messages_per_cpu_s"] > 0 for d in r["datasets"].values()
        )
    assert doc["contenders"]["a"]["precision"] == "fp32"  # classify's default, whatever the CPU has
    assert doc["agreement"]["a vs b"] == {"sms-test": 1.0, "collection-40": 1.0}
    assert "| (b) transformers pipeline, PEFT model |" in (tmp_path / "classify_throughput.md").read_text()
