"""Many adapters over one base: each row of a mixed batch equals its adapter alone through `Classifier`."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT, SAMPLE_TEXTS

from lora_dist import Classifier, MultiAdapterClassifier, UserError

sys.path.insert(0, str(ROOT / "bench"))
from fake_adapters import LABELS, make_adapter  # noqa: E402

MESSAGES = [
    *SAMPLE_TEXTS,
    "x " * 400,
    "I'll be home soon, want anything from the shop?",
    "<|endoftext|> is just text here",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    return {  # mixed ranks, target layers, label sets, head LoRA or not, truncation lengths
        "spam": make_adapter(d / "spam", seed=1, rank=8, targets=("all",), labels=LABELS["spam"]),
        "support": make_adapter(
            d / "support", seed=2, rank=4, targets=("*.att.*",), labels=LABELS["support"], head=False, max_length=12
        ),
        "lang": make_adapter(d / "lang", seed=3, rank=16, targets=("*.ff.*",), labels=LABELS["lang"], train_head=False),
        "att1": make_adapter(d / "att1", seed=4, rank=2, targets=("blocks.1.att.query",), labels=LABELS["spam"]),
    }


@pytest.fixture(scope="module")
def multi(adapters):
    return MultiAdapterClassifier.from_pretrained(None, adapters, device="cpu", precision="fp32")


def test_every_row_equals_its_adapter_alone(adapters, multi):
    g = torch.Generator().manual_seed(0)
    names = list(adapters)
    texts = MESSAGES * 4
    which = [names[i] for i in torch.randint(len(names), (len(texts),), generator=g).tolist()]
    got = multi.logits(texts, which, batch_size=7)
    preds = multi.predict(texts, which, batch_size=7)
    for name, path in adapters.items():
        alone = Classifier.from_pretrained(path, device="cpu", precision="fp32")
        rows = [i for i, a in enumerate(which) if a == name]
        want = alone.logits([texts[i] for i in rows], batch_size=1)  # each row alone: no padding, no packing
        n = len(alone.labels)
        torch.testing.assert_close(got[rows, :n], want, atol=1e-5, rtol=0)
        assert torch.isinf(got[rows, n:]).all()  # padding past its own labels
        for i, p in zip(rows, alone.predict([texts[i] for i in rows]), strict=True):
            assert preds[i]["adapter"] == name and preds[i]["label"] == p["label"]
            assert list(preds[i]["probs"]) == alone.labels
            assert preds[i]["probs"] == pytest.approx(p["probs"], abs=1e-5)


def test_one_adapter_batches_take_the_plain_path(adapters, multi, monkeypatch):
    """A batch of one adapter runs plain matmuls (no segments, no per-row gathered heads), and answers as that
    adapter alone does; a mixed batch takes the segmented path (so the spies below can see it)."""
    from lora_dist import multi_lora

    alone = Classifier.from_pretrained(adapters["lang"], device="cpu", precision="fp32")
    segmented, gathered = [], []
    segments, bmm = multi_lora.Rows.segments, torch.bmm
    monkeypatch.setattr(multi_lora.Rows, "segments", lambda self, n: segmented.append(n) or segments(self, n))
    monkeypatch.setattr(torch, "bmm", lambda *a: gathered.append(1) or bmm(*a))
    got = multi.logits(MESSAGES, "lang")
    assert (segmented, gathered) == ([], []) and multi.rows.single == multi.number["lang"]
    torch.testing.assert_close(got[:, :4], alone.logits(MESSAGES), atol=1e-5, rtol=0)
    multi.logits(MESSAGES[:2], ["lang", "spam"])
    assert segmented and gathered


def test_the_stacked_adapters_cost_their_own_size(adapters, multi):
    from lora_dist.multi_lora import adapter_bytes

    own = sum(
        t.numel() * 4
        for p in adapters.values()
        for t in __import__("safetensors.torch")
        .torch.load_file(str(p / "adapter" / "adapter_model.safetensors"))
        .values()
    )
    base = sum(p.numel() * 4 for p in multi.model.parameters())
    assert own / 2 < adapter_bytes(multi.model) < 4 * own < base


def test_an_adapter_of_another_base_is_refused(adapters, tmp_path):
    other = make_adapter(tmp_path / "other", base_seed=7)
    with pytest.raises(UserError, match=r"adapter 'other' .* random weights \(seed 7\).* adapter 'spam' .*seed 123"):
        MultiAdapterClassifier.from_pretrained(None, {"spam": adapters["spam"], "other": other})


def test_bad_names_and_unknown_adapters(adapters, multi):
    with pytest.raises(UserError, match="adapter name"):
        MultiAdapterClassifier.from_pretrained(None, {"../x": adapters["spam"]})
    with pytest.raises(UserError, match="no adapters"):
        MultiAdapterClassifier.from_pretrained(None, {})
    with pytest.raises(UserError, match="unknown adapter 'nope'; loaded: spam, support"):
        multi.predict(["hi"], ["nope"])
    with pytest.raises(UserError, match="2 messages but 1 adapter"):
        multi.predict(["a", "b"], ["spam"])


def test_grouped_training_layer_gives_each_adapter_its_own_output_and_gradients():
    """GroupedLoRALinear: the base once over every row, each adapter's own LoRALayer (trainable) over its segment:
    outputs and LoRA gradients equal each adapter's layer run alone on its rows, an adapter without the layer
    gets the base's output."""
    from lora_dist.frozen_linear import Linear
    from lora_dist.lora import LinearWithLoRA
    from lora_dist.multi_lora import GroupedLoRALinear, Rows

    torch.manual_seed(0)
    base = Linear(16, 12).requires_grad_(False)
    alone = [LinearWithLoRA(base, rank, 0.5) for rank in (2, 8)]
    for layer in alone:
        torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(9, 16)
    rows = Rows().set(torch.tensor([0] * 4 + [2] * 2 + [1] * 3))  # adapter 2 has no LoRA on this layer
    grouped = GroupedLoRALinear(base, rows)
    grouped.adapters |= {0: alone[0].lora, 1: alone[1].lora}
    grouped(x).pow(2).sum().backward()
    got = [(a.lora.A.grad.clone(), a.lora.B.grad.clone()) for a in alone]
    for a in alone:
        a.zero_grad()
    with torch.no_grad():
        out = grouped(x)
        torch.testing.assert_close(out[4:6], base(x[4:6]))
    (alone[0](x[:4]).pow(2).sum() + alone[1](x[6:]).pow(2).sum()).backward()
    torch.testing.assert_close(out[:4], alone[0](x[:4]).detach())
    torch.testing.assert_close(out[6:], alone[1](x[6:]).detach())
    for (ga, gb), a in zip(got, alone, strict=True):
        torch.testing.assert_close(ga, a.lora.A.grad)
        torch.testing.assert_close(gb, a.lora.B.grad)
