"""How the model is made: read onto the meta layout without initialising, built where it trains, its head and
adapters drawn from the seed alone, and random bases drawn where the adapter says."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import SMOKE
from safetensors.torch import load_file

from lora_dist import UserError, load_config, load_gpt2
from lora_dist.adapter import AdapterSpec, BaseModel, base_of
from lora_dist.build import build_device, build_model
from lora_dist.model import GPT2
from lora_dist.weights import load_hf_state_dict, save_hf_checkpoint


def test_weights_from_a_file_are_read_without_initialising_the_model(tiny_checkpoint):
    """Laid out on the meta device, then given the file's tensors: no weight is drawn only to be overwritten
    (drawing gpt2-xl on the CPU took 26-29 s before its first step), the tie holds and nothing stays meta."""
    rng = torch.get_rng_state()
    model = load_gpt2(str(tiny_checkpoint))
    assert torch.equal(torch.get_rng_state(), rng)  # not one random number drawn
    assert not any(p.is_meta for p in model.parameters())
    assert model.head.weight is model.tok_emb.weight
    assert all(p.is_contiguous() for p in model.parameters())
    reference = GPT2(model.cfg)  # the same file copied into an initialised model, as before
    load_hf_state_dict(reference, load_file(str(tiny_checkpoint / "model.safetensors")))
    assert reference.state_dict().keys() == model.state_dict().keys()
    for k, t in reference.state_dict().items():
        assert torch.equal(t, model.state_dict()[k]), k


def test_head_and_adapters_depend_on_the_seed_not_on_how_the_base_was_made(tmp_path):
    """A base drawn at random and the same weights read from a file get the same head and LoRA A: they are
    drawn from train.seed after the base, so the way the base was made (file, CPU, GPU) does not matter."""
    cfg = load_config(SMOKE, ["train.device=cpu"])
    drawn, names = build_model(cfg, 2)
    torch.manual_seed(cfg.train.seed)
    save_hf_checkpoint(load_gpt2("tiny", "random"), tmp_path / "base")
    read, _ = build_model(replace(cfg, model=replace(cfg.model, weights=str(tmp_path / "base"))), 2)
    trained = [n for n, p in drawn.named_parameters() if p.requires_grad]
    assert trained and names
    for n in trained:
        assert torch.equal(dict(drawn.named_parameters())[n], dict(read.named_parameters())[n]), n
    other, _ = build_model(replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + 1)), 2)
    assert not torch.equal(drawn.head.linear.weight, other.head.linear.weight)


def test_a_random_base_records_where_it_was_drawn():
    cfg = load_config(SMOKE)
    cpu, cuda = base_of(cfg), base_of(cfg, device_type="cuda")
    assert cpu.device == "cpu" and cuda.device == "cuda"
    assert cpu.mismatch(cuda) == "random weights drawn on another kind of device"
    assert "drawn on cuda" in cuda.describe() and "drawn" not in cpu.describe()
    spec = AdapterSpec(kind="weights", base=cpu, labels=("ham", "spam"), trainable="last_layer", max_length=128)
    assert "device" not in spec.to_json()["base"]  # adapters of CPU-drawn bases read as they did before
    again = AdapterSpec.from_json(json.loads(json.dumps(replace(spec, base=cuda).to_json())), "test")
    assert again.base == cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is")
def test_a_base_drawn_on_a_gpu_needs_one():
    spec = AdapterSpec(kind="weights", base=BaseModel("tiny", "random", seed=1, device="cuda"), labels=("a", "b"))
    with pytest.raises(UserError, match="only a CUDA GPU draws again"):
        build_device(spec, "runs/x")
    assert build_device(replace(spec, base=replace(spec.base, device="cpu")), "runs/x") == torch.device("cpu")
