"""Config: every shipped config loads; overrides are typed; bad keys and values are one clear line."""

from pathlib import Path

import pytest
import torch

from lora_dist import UserError, load_config
from lora_dist.config import Config, DataConfig, TrainConfig, valid_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "book").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    lines = path.read_text().splitlines()
    opening = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert any(f"--config {path.relative_to(ROOT)}" in line for line in opening), opening


def test_book_config_is_the_book_recipe():
    cfg = load_config(ROOT / "configs/book/appendix-e.yaml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.scaling, cfg.lora.targets, cfg.lora.head) == (
        16,
        16.0,
        "alpha",
        ("all",),
        True,
    )
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (5e-5, 0.1, 8, 5)
    assert (cfg.data.padding, cfg.train.eval_every, cfg.train.eval_batches, cfg.train.seed) == ("longest", 50, 5, 123)
    assert cfg.model.pooling == "last" and cfg.train.precision == "fp32"  # position -1, as the book


def test_the_recommended_recipe_is_the_book_but_for_pooling_padding_and_precision():
    """configs/gpt2-small-lora.yaml (`make train`) is appendix E with `last_real` pooling (which both exports take,
    and which no padding changes), per-batch padding in length buckets and precision auto: lora-dist's defaults,
    which a GPU turns into bf16, few shapes and CUDA graphs."""
    book, ours = load_config(ROOT / "configs/book/appendix-e.yaml"), load_config(ROOT / "configs/gpt2-small-lora.yaml")
    assert ours.model.pooling == "last_real" and ours.model.causal_mask
    d = DataConfig()
    assert (ours.data.padding, ours.data.bucket, ours.train.precision) == (d.padding, d.bucket, TrainConfig().precision)
    assert ours.to_dict() | {"output_dir": "x"} == book.to_dict() | {
        "output_dir": "x",
        "model": book.to_dict()["model"] | {"pooling": "last_real"},
        "data": book.to_dict()["data"] | {"padding": "batch", "bucket": True},
        "train": book.to_dict()["train"] | {"precision": "auto"},
    }


def test_overrides_are_typed():
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [
            "train.epochs=7",
            "train.lr=2e-4",
            "output_dir=/tmp/x",
            "lora.targets=[*.att.*]",
            "train.max_grad_norm=1",
            "train.max_steps=null",
        ],
    )
    assert cfg.train.epochs == 7 and cfg.train.lr == 2e-4 and cfg.output_dir == "/tmp/x"
    assert cfg.lora.targets == ("*.att.*",) and cfg.train.max_grad_norm == 1.0 and cfg.train.max_steps is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epoch=3", r"unknown config key 'train.epoch'.*valid keys: epochs, batch_size"),
        ("colour=red", r"unknown config key 'colour' at the top level"),
        ("train.epochs=three", r"train.epochs must be int; got 'three'"),
        ("train.lr=0", r"train.lr must be > 0"),
        ("lora.rank=0", r"lora.rank must be > 0"),
        ("lora.rank=-2", r"lora.rank must be > 0"),
        ("data.train_frac=0.9", r"leaves no test set"),
        ("data.padding=max", r"data.padding must be one of longest, batch"),
        ("dist.strategy=horovod", r"dist.strategy must be one of auto, none, ddp, deepspeed"),
        ("overwrite=maybe", r"overwrite must be bool"),
        ("train", r"is not key=value"),
    ],
)
def test_bad_values(override, message):
    with pytest.raises(UserError, match=message):
        load_config(ROOT / "configs/smoke.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/book/appendix-e.yaml", ["train.epochs=2"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.digest() == load_config(tmp_path / "c.yaml").digest()
    assert "train.resume" in valid_keys() and "tracking.wandb.mode" in valid_keys()


def test_precision_auto_resolves_by_hardware(monkeypatch):
    from lora_dist import device
    from lora_dist.device import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("auto", cpu, cpu_bf16=False) == "fp32"  # DeepSpeed's bf16 is for GPUs
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu, cpu_bf16=False) == "bf16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
