"""launcher/launch.py: the torchrun/deepspeed command it builds, a real 2-process run through it, and
SIGUSR1 passed to the workers (checkpoint, exit 0, resume)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, read_metrics, train_args
from test_distributed import _wait_for_step

sys.path.insert(0, str(ROOT / "launcher"))
import launch  # noqa: E402

pytestmark = pytest.mark.slow  # several processes each: make test runs them, make test-fast not

QUICK = ("train.epochs=1", "train.max_steps=12", "train.eval_every=1000", "tracking.wandb.mode=disabled")


def build(argv, monkeypatch, **env):
    for k in (
        "SLURM_NNODES",
        "SLURM_JOB_NUM_NODES",
        "NNODES",
        "SLURM_NODEID",
        "NODE_RANK",
        "SLURM_JOB_ID",
        "SLURM_GPUS_ON_NODE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(launch, "_gpu_count", lambda: int(env.get("SLURM_GPUS_ON_NODE", 0)))
    args, rest = launch.parse(argv)
    return launch.build_command(args, rest)


def test_single_node_command(monkeypatch):
    cmd = build(["--nproc-per-node", "8", "--", "train", "--config", "c.yaml"], monkeypatch)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--max-restarts=0"]
    assert "--standalone" in cmd and cmd[-5:] == ["-m", "lora_dist", "train", "--config", "c.yaml"]


def test_slurm_multi_node_command(monkeypatch):
    cmd = build(
        ["--rdzv-endpoint", "10.1.2.3:29500", "--", "train", "--config", "c.yaml"],
        monkeypatch,
        SLURM_NNODES="4",
        SLURM_NODEID="2",
        SLURM_JOB_ID="777",
        SLURM_GPUS_ON_NODE="8",
    )
    assert "--nproc-per-node=8" in cmd and "--nnodes=4" in cmd and "--node-rank=2" in cmd
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=10.1.2.3:29500" in cmd and "--rdzv-id=777" in cmd
    assert "--standalone" not in cmd


def test_multi_node_command_passes_the_local_address(monkeypatch):
    """Workers learn MASTER_ADDR from the agent that hosts their store: its --local-addr, else its FQDN."""
    argv = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.1:29500", "--", "train"]
    assert "--local-addr=10.0.0.2" in build(["--local-addr", "10.0.0.2", *argv], monkeypatch)
    monkeypatch.setattr(launch, "_slurm_node_addr", lambda: "10.0.0.3")  # scontrol show node: NodeAddr
    assert "--local-addr=10.0.0.3" in build(argv, monkeypatch)
    monkeypatch.setattr(launch, "_slurm_node_addr", lambda: None)  # not under Slurm: torchrun's default
    assert not any(a.startswith("--local-addr") for a in build(argv, monkeypatch))


def test_deepspeed_command(monkeypatch):
    cmd = build(["--launcher", "deepspeed", "--nproc-per-node", "4", "--", "train", "--config", "c.yaml"], monkeypatch)
    assert cmd[1:7] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--master_port", "29500"]
    assert cmd[-5:] == ["--module", "lora_dist", "train", "--config", "c.yaml"]


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--nnodes", "2", "--", "train"], {}, "need --rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "5", "--rdzv-endpoint", "h:1", "--", "train"], {}, "impossible layout"),
        (["--launcher", "deepspeed", "--", "train"], {"SLURM_NNODES": "2", "MASTER_ADDR": "h"}, "torchrun launcher"),
    ],
)
def test_impossible_layouts(monkeypatch, argv, env, message):
    with pytest.raises(SystemExit, match=message):
        build(argv, monkeypatch, **env)


def run_launcher(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python launcher/launch.py ARGS` as a user runs it, with `env` added to the test environment."""
    cmd = [sys.executable, "launcher/launch.py", *args]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**cli_env(), **(env or {})}, timeout=timeout
    )


def test_deepspeed_launcher_keeps_to_the_visible_gpus():
    """deepspeed's runner would start on GPUs 0..N-1 (and reset CUDA_VISIBLE_DEVICES) given --num_gpus."""
    dry = "--dry-run --launcher deepspeed".split()
    proc = run_launcher(*dry, "--", "train", "--config", "configs/smoke.yaml", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed.launcher.runner --include localhost:2,3 --master_port" in proc.stdout
    assert "--num_gpus" not in proc.stdout
    one = run_launcher(*dry, "--nproc-per-node", "1", "--", "train", env={"CUDA_VISIBLE_DEVICES": "5,6"})
    assert "--include localhost:5 " in one.stdout
    too_many = run_launcher(*dry, "--nproc-per-node", "3", "--", "train", env={"CUDA_VISIBLE_DEVICES": "5,6"})
    assert too_many.returncode != 0 and "CUDA_VISIBLE_DEVICES shows 2 GPU(s)" in too_many.stderr


@pytest.mark.parametrize(
    "argv, cores, threads",
    [
        (["--nproc-per-node", "2"], 2, 1),  # torchrun would give each 1 as well
        (["--nproc-per-node", "1"], 8, 8),  # a lone worker takes every core
        (["--nproc-per-node", "2"], 8, 4),  # torchrun: 1 each, 6 cores idle
        (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:29500"], 2, 1),  # both "nodes" here
        (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "localhost:29500", "--nproc-per-node", "2"], 16, 4),
        (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "10.1.2.3:29500"], 8, 8),  # one worker a machine
        (["--nproc-per-node", "4"], 2, 1),
    ],
)
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, argv, cores, threads):
    build([*argv, "--", "train"], monkeypatch)  # clears the job's environment
    args, _ = launch.parse([*argv, "--", "train"])
    assert launch.omp_threads(args, cores) == threads


def test_the_launcher_sets_threads_unless_told(tmp_path):
    cmd = [sys.executable, "launcher/launch.py", "--dry-run", "--nnodes", "2", "--node-rank", "0"]
    cmd += ["--rdzv-endpoint", "127.0.0.1:29500", "--", "train", "--config", "configs/smoke.yaml"]
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    cores = len(os.sched_getaffinity(0))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert f"launch.py: OMP_NUM_THREADS={max(1, cores // 2)} " in proc.stdout, proc.stdout
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "3"})
    assert "launch.py: OMP_NUM_THREADS=3 " in proc.stdout, proc.stdout


def test_dry_run_prints_the_command():
    proc = run_launcher("--dry-run", "--nproc-per-node", "2", "--", "train", "--config", "configs/smoke.yaml")
    assert proc.returncode == 0 and "torch.distributed.run --nproc-per-node=2" in proc.stdout


def test_two_processes_through_the_launcher(tmp_path):
    proc = run_launcher("--nproc-per-node", "2", "--", *train_args(tmp_path, *QUICK), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 2


def test_deepspeed_launcher_runs(tmp_path):
    ds = ("dist.strategy=deepspeed", "dist.deepspeed_config=configs/deepspeed/zero2.json")
    proc = run_launcher(
        "--launcher", "deepspeed", "--nproc-per-node", "2", "--", *train_args(tmp_path, *QUICK, *ds), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["world_size"] == 2 and r["strategy"] == "deepspeed"


def test_usr1_to_the_launcher_checkpoints_and_resumes(tmp_path):
    overrides = (
        "train.epochs=1",
        "train.max_steps=60",
        "train.eval_every=1000",
        "train.resume=auto",
        "tracking.wandb.mode=disabled",
    )
    args = [sys.executable, "launcher/launch.py", "--nproc-per-node", "2", "--", *train_args(tmp_path, *overrides)]
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_step(tmp_path, 20, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "asking 2 worker(s) to checkpoint and stop" in stdout and "stop signal received" in stdout
    assert not (tmp_path / "results.json").exists()
    stopped_at = [m for m in read_metrics(tmp_path) if m.get("event") == "checkpoint"][-1]["step"]
    again = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {stopped_at}," in again.stdout
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 60  # the rest of the 60 after the signal
