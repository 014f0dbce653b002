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
    """The stacked layout's bytes, counted here from the adapter files: each layer some adapter adapts holds
    every adapter's A (in x r) and B (r x out), zero-padded to the largest rank any of them has there (zeros
    for an adapter without the layer); the heads are every adapter's (labels x width) weight and bias, padded to
    the most labels. Exactly that (fp32, 4 bytes a number), no copy of the base: the layout is fixed, so no
    margin is needed; it is at least the adapters' own size (padding only adds) and a fraction of the base."""
    import json

    from safetensors.torch import load_file

    from lora_dist.multi_lora import adapter_bytes

    files = [load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in adapters.values()]
    layers: dict[str, tuple[int, int]] = {}  # layer: (largest rank there, in + out)
    for t in files:
        for k, a in t.items():
            if k.endswith(".lora.A") and not k.startswith("head."):
                layer = k.removesuffix(".lora.A")
                rank = min(a.shape)
                size = (a.numel() + t[f"{layer}.lora.B"].numel()) // rank
                layers[layer] = (max(rank, layers.get(layer, (0, 0))[0]), size)
    n = len(files)
    labels = max(
        len(json.loads((p / "adapter" / "adapter_config.json").read_text())["labels"]) for p in adapters.values()
    )
    width = multi.model.cfg.emb_dim
    want = 4 * n * (sum(r * size for r, size in layers.values()) + labels * (width + 1))
    own = sum(v.numel() * 4 for t in files for v in t.values())
    base = sum(p.numel() * 4 for p in multi.model.parameters())
    assert adapter_bytes(multi.model) == want
    assert own <= want < base / 10, (own, want, base)


def test_truncation_is_counted_per_adapter_and_returned(multi):
    """Each message is cut to its own adapter's max_length ('support' reads 12 tokens, 'spam' 1024), and the
    count is what the call returns (nothing kept between calls)."""
    from lora_dist.tokenizer import get_tokenizer

    long = "x " * 20
    n = len(get_tokenizer().encode(long))  # 21
    ids, cut = multi.tokenize([long, long, "hi"], ["support", "spam", "support"])
    assert cut == 1 and [len(i) for i in ids] == [12, n, 1] and n > 12
    assert multi.tokenize([long], ["spam"])[1] == 0


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
