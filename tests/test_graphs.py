"""The GPU step's pieces, on the CPU: few batch shapes, and the captured whole step (train/graphs.py) run
eagerly in the capture's place, against the plain step.

    pytest tests/test_graphs.py

What only a GPU can show (that the capture replays what it recorded) is in tests/test_gpu.py and
bench/gpu_check.sh.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE, read_metrics

from lora_dist import UserError, load_config
from lora_dist.build import build_model
from lora_dist.config import DataConfig
from lora_dist.data import Collate, pad_multiple
from lora_dist.train import graphs, strategy
from lora_dist.train.checkpoint import checkpoints_dir
from lora_dist.train.loop import run

COMMON = (
    "train.max_steps=24",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=8",
    "train.keep_checkpoints=10",
    "train.schedule=cosine",
    "train.warmup_steps=5",
    "train.max_grad_norm=0.5",
    "train.weight_decay=0.1",
    "tracking.wandb.mode=disabled",
)


def test_batches_on_a_gpu_come_in_a_few_lengths():
    batch = DataConfig(padding="batch")
    assert pad_multiple(batch, "cuda", padding_free=True) == 64
    # eager CUDA steps (DDP, DeepSpeed, activation checkpointing) build nothing per shape: no padding for nothing
    assert pad_multiple(batch, "cuda", padding_free=True, few_shapes=False) == 1
    assert pad_multiple(batch, "cpu", padding_free=True) == 1  # the CPU pays for every token
    assert pad_multiple(batch, "cuda", padding_free=False) == 1  # pooling `last`: padding would change answers
    assert pad_multiple(DataConfig(padding="longest"), "cuda", padding_free=True) == 1  # already one length
    assert pad_multiple(DataConfig(padding="batch", pad_multiple=32), "cuda", padding_free=True) == 32
    collate = Collate(50256, multiple=64, cap=100)
    widths = {collate([([1] * n, 0)]).ids.shape[1] for n in range(1, 101)}
    assert widths == {64, 100}  # 1-64 -> 64, 65-100 -> the cap (the model's context), never past it
    assert Collate(50256, multiple=1)([([1] * 7, 0), ([2] * 3, 1)]).ids.shape == (2, 7)


def test_rounding_a_batch_up_changes_no_prediction():
    cfg = load_config(SMOKE)
    model, _ = build_model(cfg, 2)
    model.eval()
    items = [([5, 6, 7, 8, 9][: n + 1], 0) for n in range(5)]
    with torch.no_grad():
        tight, round_up = Collate(50256)(items), Collate(50256, multiple=64)(items)
        assert round_up.ids.shape == (5, 64)
        torch.testing.assert_close(
            model(round_up.ids, round_up.last), model(tight.ids, tight.last), rtol=1e-5, atol=1e-6
        )


@pytest.fixture
def eager_graphs(monkeypatch):
    """The whole-step path switched on for the CPU, each capture replaced by running the step."""
    made = []

    def new_graph(pool):
        made.append(graphs.EagerGraph())
        return made[-1]

    monkeypatch.setattr(strategy, "obstacle", lambda *a: None)
    monkeypatch.setattr(graphs, "new_graph", new_graph)
    return made


def train(out, *extra):
    return run(load_config(SMOKE, [f"output_dir={out}", *COMMON, *extra]))


def test_the_whole_step_computes_what_the_plain_step_computes(tmp_path, eager_graphs, monkeypatch):
    """Warm-up, AdamW made capturable (its state from a step that changes nothing, its learning rate a tensor
    filled before each replay), gradients zeroed inside the step, clipping on the device: the same losses,
    gradient norms and adapter as the plain step, with a schedule, clipping and weight decay; and a run resumed
    from one of its checkpoints ends where it ends."""
    graphed = train(tmp_path / "graphed")
    assert len(eager_graphs) >= 2  # one per batch shape (bucketed batches of several lengths)
    monkeypatch.setattr(strategy, "obstacle", lambda *a: "off")
    plain = train(tmp_path / "plain")

    def steps(run_dir):
        return [
            (m["train_loss_step"], m["grad_norm"], m["lr"]) for m in read_metrics(run_dir) if "train_loss_step" in m
        ]

    assert len(steps(tmp_path / "plain")) == 24
    for a, b in zip(steps(tmp_path / "graphed"), steps(tmp_path / "plain"), strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    assert graphed["test_accuracy"] == plain["test_accuracy"]
    adapter = {}
    for name in ("graphed", "plain"):
        from safetensors.torch import load_file

        adapter[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    for k, t in adapter["plain"].items():
        torch.testing.assert_close(adapter["graphed"][k], t, rtol=1e-6, atol=1e-8)

    # A checkpoint of the graphed run holds its learning rate as a number, and resumes into a graphed run.
    mid = checkpoints_dir(tmp_path / "graphed") / "step-00000008"
    state = json.loads((mid / "state.json").read_text())
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])
    monkeypatch.setattr(strategy, "obstacle", lambda *a: None)
    resumed = train(tmp_path / "resumed", f"train.resume={mid}")
    assert resumed["test_accuracy"] == graphed["test_accuracy"]
    again = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    for k, t in adapter["graphed"].items():
        torch.testing.assert_close(again[k], t, rtol=1e-6, atol=1e-8)


def test_graphs_where_they_cannot_apply_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="train.cuda_graphs=true, but it runs on cpu"):
        train(tmp_path / "x", "train.cuda_graphs=true")
    cfg = load_config(SMOKE, ["train.grad_accum=2"])
    assert "grad_accum=2" in graphs.obstacle(cfg, strategy.Local, torch.device("cuda"), "bf16")
    assert "dist.strategy is ddp" in graphs.obstacle(cfg, strategy.DDP, torch.device("cuda"), "bf16")
    assert "fp16" in graphs.obstacle(load_config(SMOKE), strategy.Local, torch.device("cuda"), "fp16")
    assert graphs.obstacle(load_config(SMOKE), strategy.Local, torch.device("cuda"), "bf16") is None
