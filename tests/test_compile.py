"""`train.compile=true`: train, checkpoint, resume and save the adapter on the tiny model (issue 13, item 1).

    pytest tests/test_compile.py

torch.compile used to wrap the model before the strategy saw it, so every parameter name gained an
`_orig_mod.` prefix and the first checkpoint died with KeyError. The test runs in-process with dynamo's
"eager" backend: the same wrapping (and the same names) as inductor, without minutes of C++ compilation on
a CPU. bench/gpu_check.sh times the real inductor build on a GPU.
"""

import pytest
import torch
from conftest import SMOKE, read_metrics
from safetensors.torch import load_file

from lora_dist import load_config
from lora_dist.train.checkpoint import checkpoints_dir
from lora_dist.train.loop import Trainer

SHORT = (
    "train.epochs=1",
    "data.padding=longest",
    "data.max_length=32",
    "train.eval_batches=1",
    "train.eval_every=1000",
    "train.checkpoint_every=2",
    "tracking.wandb.mode=disabled",
    "train.compile=true",
)


@pytest.fixture
def eager_compile(monkeypatch):
    calls = []
    real = torch.compile

    def compile_eager(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eager)
    yield calls
    torch._dynamo.reset()


def train(cfg) -> Trainer:
    """setup and train, as `train.run` does, without the final evaluation of every split and the report."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert trainer.train()
        return trainer
    finally:
        trainer.out.close()
        trainer.strategy.cleanup(True)


@pytest.mark.slow
def test_compiled_run_checkpoints_resumes_and_saves_its_adapter(tmp_path, eager_compile, capsys):
    out = tmp_path / "run"
    train(load_config(SMOKE, [f"output_dir={out}", *SHORT, "train.max_steps=2"]))
    assert eager_compile, "train.compile=true compiled nothing"
    assert [p.name for p in checkpoints_dir(out).iterdir()] == ["step-00000002"]
    ckpt = load_file(str(checkpoints_dir(out) / "step-00000002" / "adapter.safetensors"))
    assert "blocks.0.att.query.lora.A" in ckpt and not any("_orig_mod" in k for k in ckpt)

    trainer = train(load_config(SMOKE, [f"output_dir={out}", *SHORT, "train.max_steps=3", "train.resume=auto"]))
    assert "resumed from" in capsys.readouterr().out and trainer.step == 3
    trainer.save_result(trainer.strategy.adapter_state(trainer.adapter_names))  # what finish() saves
    assert [m["step"] for m in read_metrics(out) if "train_loss_step" in m] == [1, 2, 3]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == ckpt.keys()
    assert not torch.equal(adapter["blocks.0.att.query.lora.B"], ckpt["blocks.0.att.query.lora.B"])  # it trained on
