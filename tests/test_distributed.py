"""Distribution on the CPU with gloo, under the real torchrun: world-size invariance, what is all-reduced,
exact resume after SIGKILL, a killed rank restarted by torchrun, preemption signals, bad launches."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    SMOKE,
    cli_env,
    lora_dist_cmd,
    read_metrics,
    run_cli,
    shared_train,
    torchrun,
    torchrun_cmd,
    train_args,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # several processes each: make test runs them, make test-fast not

SHORT = ("train.epochs=1", "train.max_steps=24", "train.eval_every=10", "train.eval_batches=2")


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def step_losses(run_dir):
    out = {}
    for r in read_metrics(run_dir):
        if "train_loss_step" in r:
            out[r["step"]] = r["train_loss_step"]  # a resumed run logs the replayed steps again: same values
    return [out[k] for k in sorted(out)]


def assert_same_adapter(a, b, rtol=1e-5, atol=1e-4):
    """Equal up to the order of float sums: the whole adapter within `rtol` relative norm, and each tensor
    within `rtol` relative norm or each of its elements within `atol`. AdamW moves an element by about lr
    (1e-3 in the smoke config) whatever the size of its gradient, so the rounding of a near-zero gradient can
    leave a few elements of a small tensor apart (measured: 2.6e-5 in ZeRO-3 against ZeRO-2, a relative norm
    of 9e-5 for that tensor and 1.6e-6 for the adapter), while a different batch, a lost micro-batch or a
    skipped all-reduce moves elements by about 1e-3. rtol=0 means bit-identical."""
    assert a.keys() == b.keys()
    if rtol == 0.0:
        for k in a:
            assert torch.equal(a[k], b[k]), k
        return
    total = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(a[k].norm() ** 2 for k in a) ** 0.5
    assert total <= rtol, total
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item()
        worst = (a[k] - b[k]).abs().max().item()
        assert rel <= rtol or worst <= atol, (k, rel, worst)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return shared_train(tmp_path_factory, "distributed-one-process", *SHORT)[0]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ws2") / "run"
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={out}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_one_and_two_processes_follow_the_same_trajectory(one_process, two_processes):
    two, _ = two_processes
    assert results(two)["world_size"] == 2 and results(one_process)["world_size"] == 1
    assert_same_adapter(adapter(one_process), adapter(two))
    a, b = step_losses(one_process), step_losses(two)
    assert len(a) == len(b) == 24
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) <= 1e-5
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert results(one_process)[key] == results(two)[key], key


def test_only_adapter_gradients_are_all_reduced(two_processes):
    out, _ = two_processes
    r = results(out)
    grad_bytes = r["trainable_params"] * 4  # fp32 gradients of the trainable tensors, nothing else
    per_step = [m["allreduce_bytes"] for m in read_metrics(out) if "allreduce_bytes" in m]
    assert per_step and all(b == grad_bytes for b in per_step), (per_step[:3], grad_bytes)
    assert grad_bytes < r["total_params"] * 4 / 50  # far from the frozen model's size


def test_only_rank_zero_prints(two_processes):
    _, proc = two_processes
    assert proc.stdout.count("lora-dist: tiny") == 1 and proc.stdout.count("done in") == 1


def test_gradient_accumulation_matches(one_process, tmp_path):
    """batch 8 as 2 ranks x 2 micro-batches x 2 accumulation steps (no_sync between) = batch 8 at once."""
    out = tmp_path / "accum"
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={out}", *SHORT, "train.grad_accum=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_adapter(adapter(one_process), adapter(out))
    per_step = [m["allreduce_bytes"] for m in read_metrics(out) if "allreduce_bytes" in m]
    assert set(per_step) == {results(out)["trainable_params"] * 4}  # one all-reduce per step, not per micro-batch


def _wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            done = [
                json.loads(x).get("step", 0) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
            ]
            if done and max(done) >= step:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return False


LONG = ("train.epochs=1", "train.checkpoint_every=10", "train.eval_every=1000")  # 130 steps


@pytest.fixture(scope="module")
def clean_long(tmp_path_factory):
    return shared_train(tmp_path_factory, "distributed-clean-long", *LONG)[0]


def test_exact_resume_after_sigkill(clean_long, tmp_path):
    out = tmp_path / "killed"
    cmd = lora_dist_cmd(*train_args(out, *LONG, "train.resume=auto"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _wait_for_step(out, 75, proc), "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "results.json").exists()
    resumed = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_adapter(adapter(clean_long), adapter(out), rtol=0.0)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_loss"):
        assert results(clean_long)[key] == results(out)[key], key
    assert step_losses(clean_long) == step_losses(out)


def test_sigterm_checkpoints_and_exits_zero_then_resumes(clean_long, tmp_path):
    out = tmp_path / "preempted"
    cmd = lora_dist_cmd(*train_args(out, *LONG, "train.resume=auto"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_step(out, 45, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stop signal received" in stdout
    assert not (out / "results.json").exists()
    stopped = _checkpoint_at_the_signal(out, stdout)
    resumed = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:08d}'} " in resumed.stdout
    assert_same_adapter(adapter(clean_long), adapter(out), rtol=0.0)


def _checkpoint_at_the_signal(out, stdout) -> int:
    """The step the run names in "checkpoint saved at step N" (the signal may land on any step, on the
    checkpoint schedule or off it): the newest checkpoint is that step's, and it is on disk."""
    stopped = int(re.search(r"stop signal received: checkpoint saved at step (\d+)", stdout).group(1))
    saved = [m for m in read_metrics(out) if m.get("event") == "checkpoint"]
    assert saved[-1]["step"] == stopped and max(m.get("step", 0) for m in read_metrics(out)) == stopped
    assert (out / "checkpoints" / f"step-{stopped:08d}" / "state.json").is_file()
    return stopped


def _children(pid):
    """The PIDs whose parent is `pid`, in order, read from /proc (no procps needed, so no test can stop
    half-way for the lack of it and leave torchrun running)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
                kids.append(int(d.name))
    return sorted(kids)


def _torchrun_cmd(nproc, out, *extra_args, launcher_args=()):
    return torchrun_cmd(nproc, *train_args(out, *LONG, "train.resume=auto", *extra_args), extra=launcher_args)


@pytest.fixture(scope="module")
def clean_long_ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean-ddp") / "run"
    proc = subprocess.run(_torchrun_cmd(2, out), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_usr1_to_one_rank_stops_every_rank_then_a_killed_rank_is_restarted(clean_long_ddp, tmp_path):
    """One job, interrupted twice, ends as the uninterrupted run, bit for bit:
    1. SIGUSR1 to one rank (Slurm's warning before preemption): every rank stops at the same step, rank 0
       checkpoints there, says which step, and the job exits 0;
    2. started again with train.resume=auto under torchrun --max-restarts=1, it resumes from that step;
       one rank is SIGKILLed mid-run, torchrun restarts both, they resume from the newest checkpoint and finish.
    (One job for both: the second half needs a resumable run, which the first half leaves.)"""
    out = tmp_path / "job"
    proc = subprocess.Popen(
        _torchrun_cmd(2, out), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert _wait_for_step(out, 25, proc)
    os.kill(_children(proc.pid)[-1], signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop signal received" in stdout and not (out / "results.json").exists()
    stopped = _checkpoint_at_the_signal(out, stdout)

    # A short collective timeout: a survivor blocked on its dead peer gives up in seconds, not minutes.
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun otherwise lends its rendezvous store to the workers, and a
    # restarted round can read the previous round's gloo addresses (pytorch/pytorch#135712); launch.py sets it.
    proc = subprocess.Popen(
        _torchrun_cmd(2, out, "dist.timeout_s=30", launcher_args=("--max-restarts=1",)),
        cwd=ROOT,
        env=cli_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for_step(out, 75, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert (
        f"resumed from {out / 'checkpoints' / f'step-{stopped:08d}'} " in stdout and stdout.count("resumed from") == 2
    )
    assert_same_adapter(adapter(clean_long_ddp), adapter(out), rtol=0.0)
    assert results(clean_long_ddp)["test_accuracy"] == results(out)["test_accuracy"]


# ------------------------------------------------------------------------------------------ bad input


def rank_errors(stderr: str, message: str) -> list[str]:
    """The ranks that said `error: MESSAGE` ("0") or `error (rank N): MESSAGE` ("N"). When every rank fails,
    torchrun ends the others as soon as the first one exits, so which ranks get to print is a matter of
    timing: a test may only ask that some rank said it, and that rank 0 said it at most once."""
    return re.findall(r"^error(?: \(rank (\d+)\))?: " + re.escape(message), stderr, flags=re.M)


def assert_some_rank_said(proc, message: str) -> None:
    said = rank_errors(proc.stderr, message)
    assert proc.returncode != 0 and said, proc.stderr[-3000:]
    assert said.count("") <= 1 and len(said) == len(set(said)), said  # each rank says it once at most


def test_global_batch_that_does_not_divide(tmp_path):
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={tmp_path / 'o'}", "train.batch_size=7")
    assert_some_rank_said(
        proc, "train.batch_size=7 is the global batch and must divide by world size x grad_accum = 2 x 1"
    )


def test_world_size_larger_than_the_training_batches(tmp_path):
    data = tmp_path / "few.csv"
    data.write_text("text,label\n" + "".join(f"message {i},{'spam' if i % 2 else 'ham'}\n" for i in range(20)))
    proc = torchrun(
        2,
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={tmp_path / 'o'}",
        f"data.source={data}",
        "data.balance=false",
        "train.batch_size=16",
    )
    assert_some_rank_said(proc, "the training split has 14 examples, fewer than one global batch of 16")


def test_nccl_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: nccl is a valid choice here")
    proc = run_cli("train", "--config", str(SMOKE), f"output_dir={tmp_path}", "dist.strategy=ddp", "dist.backend=nccl")
    assert proc.returncode == 2 and "error: dist.backend=nccl needs a CUDA GPU" in proc.stderr


def test_ranks_with_different_configs_are_refused(tmp_path):
    """Two ranks started by hand (as a broken launcher would) with different overrides."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, lr in ((0, "1e-3"), (1, "2e-3")):
        env = cli_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lora_dist",
                    "train",
                    "--config",
                    str(SMOKE),
                    f"output_dir={tmp_path / 'o'}",
                    f"train.lr={lr}",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert "error: ranks started with different configs" in outs[0][1]
    assert "error (rank 1): ranks started with different configs" in outs[1][1]


def test_strategy_none_with_several_processes(tmp_path):
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={tmp_path / 'o'}", "dist.strategy=none")
    assert_some_rank_said(proc, "dist.strategy=none, but 2 processes were launched")
