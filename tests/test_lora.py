"""LoRA: the book's initialisation, exact no-op before training, merge/unmerge, targets, scaling, counts."""

import math

import pytest
import torch
from torch import nn

from lora_dist import LinearWithLoRA, LoRAConfig, UserError, count_params, inject_lora, load_gpt2, merge, unmerge
from lora_dist.lora import adapter_state_dict, scale_factor


def classifier():
    torch.manual_seed(0)
    m = load_gpt2("tiny", weights="random").eval()
    m.set_classifier(2)
    return m


def test_init_follows_the_book():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(64, 32), rank=8, scale=2.0)
    assert torch.count_nonzero(layer.lora.B) == 0
    A = layer.lora.A
    assert A.shape == (64, 8)
    bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (in, r) tensor: fan_in = r
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound


def test_injected_model_matches_base_before_training():
    base = classifier()
    base.requires_grad_(False)  # frozen as inject_lora leaves it, so both passes take the same Linear path
    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        before = base(ids, torch.tensor([11, 5]))
        inject_lora(base, LoRAConfig())
        after = base(ids, torch.tensor([11, 5]))
    assert torch.equal(before, after)


def test_everything_but_adapters_frozen():
    m = classifier()
    inject_lora(m, LoRAConfig(rank=4))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    m2 = classifier()
    inject_lora(m2, LoRAConfig(rank=4, train_head=True))
    assert {"head.linear.weight", "head.linear.bias"} <= {n for n, p in m2.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "targets,head,expect",
    [
        (("all",), True, {"query", "key", "value", "out", "fc", "proj", "head"}),
        (("*.att.*",), False, {"query", "key", "value", "out"}),
        (("*.ff.*",), True, {"fc", "proj", "head"}),
        (("*.att.query", "*.att.value"), False, {"query", "value"}),
    ],
)
def test_target_patterns(targets, head, expect):
    m = classifier()
    names = inject_lora(m, LoRAConfig(targets=targets, head=head))
    assert {n.rsplit(".", 1)[-1] for n in names} == expect


def test_no_match_is_an_error():
    with pytest.raises(UserError, match="matches no layer"):
        inject_lora(classifier(), LoRAConfig(targets=("*.nothing",), head=False))


def test_merge_unmerge_exact_and_idempotent():
    m = classifier()
    inject_lora(m, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 50257, (2, 10))
    last = torch.tensor([9, 3])
    originals = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        ref = m(ids, last)
        merge(m)
        merge(m)  # idempotent
        merged = m(ids, last)
        unmerge(m)
        unmerge(m)
        back = m(ids, last)
    assert torch.allclose(merged, ref, atol=1e-5)
    assert torch.equal(back, ref)
    for n, p in m.named_parameters():
        assert torch.equal(p, originals[n]), n


def test_merge_refuses_non_finite():
    layer = LinearWithLoRA(nn.Linear(4, 4), rank=2, scale=1.0)
    with torch.no_grad():
        layer.lora.B.fill_(float("inf"))
    w = layer.linear.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.linear.weight, w) and not layer.merged


@pytest.mark.parametrize("scaling,expected", [("alpha", 16.0), ("alpha/r", 2.0), ("rslora", 16 / math.sqrt(8))])
def test_scaling(scaling, expected):
    cfg = LoRAConfig(rank=8, alpha=16, scaling=scaling)
    assert scale_factor(cfg) == pytest.approx(expected)
    layer = LinearWithLoRA(nn.Linear(6, 5, bias=False), 8, scale_factor(cfg))
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(3, 6)
    manual = layer.linear(x) + expected * (x @ layer.lora.A @ layer.lora.B)
    assert torch.allclose(layer(x), manual, atol=1e-5)


def test_book_parameter_counts():
    """124,441,346 total and 2,666,528 trainable (the book's appendix E), on random weights."""
    with torch.device("meta"):
        m = load_gpt2("gpt2-small", weights="random")
        m.set_classifier(2)
        inject_lora(m, LoRAConfig(rank=16, alpha=16))
    assert count_params(m) == (124_441_346, 2_666_528)


def test_adapter_state_holds_lora_and_head():
    m = classifier()
    inject_lora(m, LoRAConfig(rank=2))
    state = adapter_state_dict(m)
    assert "head.linear.weight" in state and "head.linear.bias" in state
    assert sum(".lora." in k for k in state) == 2 * (6 * 2 + 1)
