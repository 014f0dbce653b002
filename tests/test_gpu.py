"""The GPU path on a real GPU: the captured step against the plain one, bf16 storage of the frozen weights,
a base drawn on the GPU. Skipped where no CUDA device is (CI); bench/gpu_check.sh runs them first.

    pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE, read_metrics
from safetensors.torch import load_file

from lora_dist import Classifier, load_config
from lora_dist.train.loop import Trainer, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; bench/gpu_check.sh runs it there"),
]

SHORT = (
    "train.max_steps=24",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.device=cuda",
    "tracking.wandb.mode=disabled",
    "train.schedule=cosine",
    "train.warmup_steps=4",
    "train.max_grad_norm=1.0",
)


def losses(run_dir):
    return [m["train_loss_step"] for m in read_metrics(run_dir) if "train_loss_step" in m]


def test_the_captured_step_replays_what_the_plain_step_computes(tmp_path):
    """fp32 without TF32: the graphs differ from the plain step only by the fp32 learning rate AdamW's kernel
    reads from the GPU."""
    common = [*SHORT, "train.precision=fp32", "train.tf32=false"]
    graphed = run(load_config(SMOKE, [f"output_dir={tmp_path / 'g'}", *common]))
    plain = run(load_config(SMOKE, [f"output_dir={tmp_path / 'p'}", *common, "train.cuda_graphs=false"]))
    assert losses(tmp_path / "g") == pytest.approx(losses(tmp_path / "p"), rel=1e-4)
    a = load_file(str(tmp_path / "g" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "p" / "adapter" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert graphed["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=0.01)


def test_few_graphs_bf16_storage_and_a_base_drawn_on_the_gpu(tmp_path):
    trainer = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / 'b'}", *SHORT, "train.precision=bf16"]))
    trainer.setup()
    model = trainer.strategy.module
    assert model.blocks[0].ff.fc.linear.weight.dtype == torch.bfloat16  # frozen: stored in bf16
    assert model.blocks[0].ff.fc.lora.A.dtype == torch.float32 and model.head.linear.weight.dtype == torch.float32
    assert trainer.train()
    results = trainer.finish(1.0)
    trainer.strategy.cleanup()
    assert 1 <= len(trainer.strategy.graphed.graphs) <= 5  # a graph per padded length: multiples of 64
    assert all(shape[1] % 64 == 0 for shape in trainer.strategy.graphed.graphs)
    clf = Classifier.from_pretrained(tmp_path / "b", device="cuda", precision="bf16")
    assert clf.spec.base.device == "cuda"  # the random base was drawn on the GPU, and is drawn there again
    assert results["test_accuracy"] > 0.5
