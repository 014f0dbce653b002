"""DeepSpeed ZeRO on the CPU (gloo, 2 processes under torchrun): same trajectory as DDP, only adapter
gradients reduced (DeepSpeed's own comms counters), full adapter tensors saved under ZeRO-3, resume."""

import json
import signal
import subprocess
import sys

import deepspeed  # noqa: E402,F401  (a dev extra: pip install -e .[dev]; a broken install fails here, it does not skip)
import pytest
import torch
from conftest import ROOT, SMOKE, cli_env, read_metrics, torchrun, torchrun_cmd, train_args
from test_distributed import _children, _wait_for_step, adapter, assert_same_adapter, results

from lora_dist import UserError, load_config
from lora_dist.train.deepspeed_strategy import COMMS_SAMPLE_EVERY, deepspeed_config

pytestmark = pytest.mark.slow  # several processes each: make test runs them, make test-fast not

# 30 steps: enough for the trajectories to part if a gradient were lost or reduced twice, and for the ZeRO-3
# run to be stopped at step 8 or so with 20 steps still to go.
RUN = ("train.epochs=1", "train.max_steps=30", "train.eval_every=1000", "train.eval_batches=2")


def ds_args(stage: str):
    return ("dist.strategy=deepspeed", f"dist.deepspeed_config=configs/deepspeed/{stage}.json")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={out}", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    # --tee 3: every worker line prefixed with its rank ([default1]:), for test_only_rank_0_prints
    proc = torchrun(
        2,
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        *RUN,
        *ds_args("zero2"),
        timeout=600,
        extra=("--tee=3",),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return out


def test_only_rank_0_prints(zero2_run):
    """Rank 1 prints nothing, not even the warnings DeepSpeed and torch give on every rank (NullOutput quiets
    them); rank 0 prints the run."""
    lines = (zero2_run.parent / "console.txt").read_text().splitlines()
    assert [line for line in lines if line.startswith("[default1]:")] == []
    assert any(line.startswith("[default0]:done in") for line in lines), lines[-5:]


def test_zero2_matches_ddp(ddp_run, zero2_run):
    assert results(zero2_run)["strategy"] == "deepspeed" and results(zero2_run)["world_size"] == 2
    assert_same_adapter(adapter(ddp_run), adapter(zero2_run), rtol=1e-5)
    assert results(ddp_run)["test_accuracy"] == results(zero2_run)["test_accuracy"]


def test_zero2_reduces_only_adapter_gradients(zero2_run):
    grad_bytes = results(zero2_run)["trainable_params"] * 4
    per_step = [m["allreduce_bytes"] for m in read_metrics(zero2_run) if "allreduce_bytes" in m]
    # Gradient buckets plus a few scalars (gradient norm, overflow flag); never a frozen tensor.
    assert per_step and all(grad_bytes <= b <= grad_bytes + 64 for b in per_step), (per_step[:3], grad_bytes)
    # Counted on steps 1, 11, 21, ... only: DeepSpeed's logger synchronises the GPU after every collective.
    counted = [m["step"] for m in read_metrics(zero2_run) if "allreduce_bytes" in m]
    last = max(m["step"] for m in read_metrics(zero2_run) if "step" in m)
    assert last == 30 and counted == list(range(1, last + 1, COMMS_SAMPLE_EVERY)), (last, counted)


def test_zero3_saves_full_adapter_and_resumes(zero2_run, tmp_path):
    """Stopped by SIGTERM mid-run, resumed: the ZeRO-3 adapter file holds the real gathered tensors and ends
    where ZeRO-2 (unpartitioned) ends."""
    out = tmp_path / "zero3"
    cmd = [*two_process_cmd(out), *RUN, *ds_args("zero3"), "train.resume=auto", "train.checkpoint_every=10"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_step(out, 8, proc, timeout=400), "ZeRO-3 run ended before the signal"
    for pid in _children(proc.pid):
        proc_signal(pid)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stop signal received" in stdout, stderr[-3000:]
    assert not (out / "results.json").exists()
    resumed = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a3, a2 = adapter(out), adapter(zero2_run)
    for k, t in a3.items():
        assert t.shape == a2[k].shape and t.numel() > 0, k
    assert_same_adapter(a2, a3, rtol=1e-5)
    assert results(out)["test_accuracy"] == results(zero2_run)["test_accuracy"]
    grad_bytes = results(out)["trainable_params"] * 4
    per_step = [m["allreduce_bytes"] for m in read_metrics(out) if "allreduce_bytes" in m]
    assert all(grad_bytes <= b <= grad_bytes + 64 for b in per_step)  # ZeRO-3's weight all-gathers are not counted


def two_process_cmd(out):
    return torchrun_cmd(2, *train_args(out))


def proc_signal(pid):
    import os

    os.kill(pid, signal.SIGTERM)


def test_project_config_fills_deepspeed_config():
    cfg = load_config(
        SMOKE,
        [
            "train.batch_size=32",
            "train.grad_accum=2",
            "train.lr=3e-4",
            "train.max_grad_norm=1.0",
            "train.precision=bf16",
            "dist.deepspeed_config=configs/deepspeed/zero3-offload.json",
        ],
    )
    ds = deepspeed_config(cfg, micro=4, accum=2, world=4, device_type="cuda")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        32,
        4,
        2,
    )
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_torch_fused_adamw_unless_deepspeed_optimizer_is_asked_for():
    """DeepSpeed's FusedAdam is JIT-compiled with nvcc at first use; torch's fused AdamW needs nothing."""
    cfg = load_config(SMOKE, ["dist.deepspeed_config=configs/deepspeed/zero2.json"])
    params = deepspeed_config(cfg, micro=4, accum=1, world=2, device_type="cuda")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    cfg = load_config(
        SMOKE, ["dist.deepspeed_config=configs/deepspeed/zero2.json", "dist.deepspeed_optimizer=deepspeed"]
    )
    params = deepspeed_config(cfg, micro=4, accum=1, world=2, device_type="cuda")["optimizer"]["params"]
    assert "torch_adam" not in params and "fused" not in params


def test_disagreeing_deepspeed_config_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    cfg = load_config(SMOKE, [f"dist.deepspeed_config={bad}"])
    with pytest.raises(UserError, match=r"sets train_batch_size=64 but the project config gives 8"):
        deepspeed_config(cfg, micro=4, accum=1, world=2)
    cfg = load_config(SMOKE, [f"dist.deepspeed_config={tmp_path / 'missing.json'}"])
    with pytest.raises(UserError, match="not found"):
        deepspeed_config(cfg, micro=4, accum=1, world=2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="optimizer CPU offload moves optimizer state off a GPU; "
    "with no GPU here it is exercised on the GPU machine only (bench/gpu_check.sh)",
)
def test_zero3_offload_on_gpu(tmp_path):
    """What offload means: the run computes on the GPU while the optimizer lives on the CPU, and it learns what
    the same run without offload learns. DeepSpeed's ZeRO-3 checkpoint (`<tag>/*optim_states.pt`) holds the
    optimizer's own tensors as they were when saved (stage3's state_dict: `fp32_flat_groups`, the fp32 master
    partitions the optimizer steps, and the torch optimizer's state, AdamW's moments): with
    `offload_optimizer.device=cpu` every one of them is a CPU tensor, without it a CUDA one (stage3.py sets its
    optimizer device to `cpu` only when offloading). Offload moves where the update runs, not what it computes:
    the adapter ends where plain ZeRO-3's does (fp32 updates on either side; bf16 forward on the GPU in both)."""
    runs = {}
    for stage in ("zero3-offload", "zero3"):
        out = tmp_path / stage
        proc = torchrun(
            1,
            *train_args(out, *RUN, *ds_args(stage), "train.precision=bf16", "train.checkpoint_every=10"),
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "device cuda" in proc.stdout, proc.stdout[-2000:]  # it trained on the GPU
        last = sorted((out / "checkpoints").glob("step-*"))[-1]  # step 30's
        (state,) = (last / "deepspeed").glob("*/*optim_states.pt")
        runs[stage] = out, saved_locations(state)
    offload, plain = runs["zero3-offload"][1], runs["zero3"][1]
    assert offload["fp32_flat_groups"] == {"cpu"}, offload
    assert offload["optimizer_state_dict"] == {"cpu"}, offload
    # without offload the master partitions and the moments are on the GPU (a `step` count may sit on the CPU)
    assert {d.split(":")[0] for d in plain["fp32_flat_groups"]} == {"cuda"}, plain
    assert any(d.startswith("cuda") for d in plain["optimizer_state_dict"]), plain
    assert_same_adapter(adapter(runs["zero3"][0]), adapter(runs["zero3-offload"][0]), rtol=1e-3, atol=2e-3)


def saved_locations(path) -> dict[str, set[str]]:
    """{"fp32_flat_groups" / "optimizer_state_dict": the devices of the tensors under that key of the ZeRO
    optimizer's saved state}, each tensor loaded back onto the device it was saved from (no map_location). The
    file is the one this test's run just wrote; DeepSpeed pickles its own classes beside the tensors, so
    weights_only cannot read it."""
    sd = torch.load(path, weights_only=False)["optimizer_state_dict"]

    def devices(x) -> set[str]:
        if isinstance(x, torch.Tensor):
            return {str(x.device)}
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
        return set().union(*(devices(v) for v in items))

    return {key: devices(sd[key]) for key in ("fp32_flat_groups", "optimizer_state_dict")}


def test_stage_configs_exist_and_parse():
    for name, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3-offload", 3)):
        cfg = json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
        assert cfg["train_batch_size"] == "auto" and cfg["zero_optimization"]["stage"] == stage, name
        offload = cfg["zero_optimization"].get("offload_optimizer", {}).get("device")
        assert offload == ("cpu" if name.endswith("offload") else None), name


def test_without_deepspeed_every_rank_says_how_to_install_it(tmp_path):
    """Under torchrun with DeepSpeed missing (a package that fails to import shadows it), no rank prints a
    traceback: each that gets to fail prints the one line (rank 0 without a prefix) and exits 2."""
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError('No module named deepspeed', name='deepspeed')\n")
    env = cli_env(PYTHONPATH=shadow.parent)
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={tmp_path / 'out'}", *ds_args("zero2"), env=env)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "needs DeepSpeed" in line]
    assert said and all(
        line.startswith(("error: dist.strategy=deepspeed", "error (rank 1): dist.strategy=deepspeed")) for line in said
    ), proc.stderr[-3000:]
    assert "ModuleNotFoundError" not in proc.stderr and "exitcode  : 2" in proc.stderr


PROBE = """
import torch, torch.distributed as dist
from lora_dist.device import init_process_group
from lora_dist.train.deepspeed_strategy import import_deepspeed
import_deepspeed()
from deepspeed.accelerator import get_accelerator
get_accelerator()
init_process_group(torch.device("cpu"), 60)
out = torch.zeros(1)
dist.all_gather_into_tensor(out, torch.ones(1))  # as ZeRO calls it
print("gathered", out.item())
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the accelerator line is DeepSpeed's on a machine without a GPU")
def test_rank_0_prints_neither_deepspeeds_cpu_line_nor_torchs_deprecation():
    """ZeRO on the CPU: rank 0 printed DeepSpeed's "Setting accelerator to CPU" and torch's FutureWarning about
    all_gather_into_tensor, which no user acts on."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=cli_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0 and "gathered 1.0" in proc.stdout, proc.stderr[-2000:]
    assert "Setting accelerator to CPU" not in proc.stderr and "all_gather_into_tensor" not in proc.stderr
