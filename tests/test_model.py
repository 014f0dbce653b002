"""GPT-2 in plain PyTorch against transformers' GPT2LMHeadModel, and the weight loader's errors."""

import pytest
import torch
import transformers  # noqa: E402  (a dev extra: pip install -e .[dev])
from safetensors.torch import load_file, save_file

from lora_dist import UserError, load_gpt2, save_hf_checkpoint
from lora_dist.model import SIZES, canonical_name


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A random GPT-2 written by transformers itself (save_pretrained, safetensors)."""
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=64,
        n_embd=48,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a transposed or swapped tensor shows up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_logits_match_transformers(hf_model_dir):
    path, ref = hf_model_dir
    ours = load_gpt2(str(path)).eval()
    ids = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (3, 40, 50257)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("layout", ["bare", "prefixed"])
def test_both_key_layouts_and_tied_head(hf_model_dir, tmp_path, layout):
    """GPT-2 checkpoints name their tensors 'h.0.attn...' (the hub's original gpt2 files) or
    'transformer.h.0.attn...' (GPT2LMHeadModel.save_pretrained); both load to transformers' own logits, and
    the output layer is the token embedding."""
    path, ref = hf_model_dir
    state = load_file(str(path / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    keys = (
        bare
        if layout == "bare"
        else {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in bare.items()}
    )
    assert (
        any(k.startswith("transformer.") for k in keys) == (layout == "prefixed") and "h.0.attn.c_attn.weight" in bare
    )
    save_file(keys, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    model = load_gpt2(str(tmp_path)).eval()
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    ids = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_save_and_reload_roundtrip(tmp_path):
    torch.manual_seed(0)
    a = load_gpt2("tiny", weights="random").eval()
    save_hf_checkpoint(a, tmp_path)
    b = load_gpt2("tiny", weights=str(tmp_path)).eval()
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    del state["h.1.mlp.c_fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(UserError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.weight'"):
        load_gpt2(str(tmp_path))


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    state["h.0.attn.c_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(UserError, match=r"'h\.0\.attn\.c_proj\.weight'.*shape \[3, 3\]"):
        load_gpt2(str(tmp_path))


def test_corrupt_and_missing_files(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(UserError, match="model.safetensors not found"):
        load_gpt2(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_gpt2(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_gpt2("tiny", weights=str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a GPT-2 config.json"):
        load_gpt2(str(tmp_path))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("gpt2-small (124M)", "gpt2-small"),
        ("GPT2-XL (1558M)", "gpt2-xl"),
        ("gpt2", "gpt2-small"),
        ("openai-community/gpt2-medium", "gpt2-medium"),
    ],
)
def test_book_names(name, expected):
    assert canonical_name(name) == expected


def test_unknown_name():
    with pytest.raises(UserError, match="unknown model name 'gpt3'.*gpt2-small"):
        load_gpt2("gpt3", weights="random")


@pytest.mark.parametrize(
    "size,params",
    [
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_sizes_match_the_published_parameter_counts(size, params):
    """The hub's GPT2LMHeadModel counts (tied head counted once); built on the meta device, no memory."""
    with torch.device("meta"):
        model = load_gpt2(size, weights="random")
    assert sum(p.numel() for p in model.parameters()) == params
    assert SIZES[size].context_length == 1024


def test_offline_download_stops_at_once_with_the_way_out(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_gpt2("gpt2-small")
    assert time.perf_counter() - start < 15
    msg = str(err.value)
    assert "openai-community/gpt2" in msg and "model.weights=" in msg and "configs/smoke.yaml" in msg
    assert "make smoke" in msg and "takes hours" in msg  # as the README says; not a bare "or model.weights=random"
    assert "\n" not in msg


def test_prediction_ignores_padding():
    """The classifier reads the last real token: 0 or 50 pad tokens after a message change nothing."""
    from lora_dist import LoRAConfig, inject_lora
    from lora_dist.data import Collate

    torch.manual_seed(0)
    model = load_gpt2("tiny", weights="random").eval()
    model.set_classifier(2)
    inject_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    msg = [464, 2068, 7586, 21831, 18045, 625, 262]
    plain = Collate(50256)([(msg, 0)])
    padded = Collate(50256, fixed_length=len(msg) + 50)([(msg, 0)])
    assert plain.ids.shape[1] == 7 and padded.ids.shape[1] == 57
    with torch.no_grad():
        a = model(plain.ids, plain.last)
        b = model(padded.ids, padded.last)
    assert torch.allclose(a, b, atol=1e-5), (a, b)


@pytest.mark.parametrize("pooling", ["last_real", "first", "mean"])
def test_a_padded_batch_runs_packed_and_equals_each_row_alone(pooling):
    """In inference a right-padded batch is packed: the blocks see only its real tokens (N, C), and each
    row's logits equal that row run alone, unpadded (the path checked against transformers above)."""
    from lora_dist import LoRAConfig, inject_lora
    from lora_dist.data import Collate

    torch.manual_seed(0)
    model = load_gpt2("tiny", weights="random").eval()
    model.set_classifier(3, pooling)
    inject_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    msgs = [list(range(100, 100 + n)) for n in (7, 1, 30, 12, 2)]
    batch = Collate(50256)([(m, 0) for m in msgs])
    seen = []
    model.blocks[0].ff.fc.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    with torch.inference_mode():
        got = model(batch.ids, batch.last)
        alone = torch.cat([model(torch.tensor([m]), torch.tensor([len(m) - 1])) for m in msgs])
    assert seen[0] == (sum(map(len, msgs)), 128)  # packed: 52 real tokens, not 5 x 30
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # training keeps the padded rows (and its bit-exact resumes)
        seen.clear()
        model(batch.ids, batch.last)
        assert seen[0] == (5, 30, 128)


@pytest.mark.parametrize("pooling,causal", [("last", True), ("mean_all", True), ("last_real", False)])
def test_padding_that_matters_is_never_packed(pooling, causal):
    """Where padding changes the answer (the book's last-position pooling, no causal mask), rows stay padded."""
    from dataclasses import replace

    from lora_dist.data import Collate
    from lora_dist.model import GPT2

    torch.manual_seed(0)
    model = GPT2(replace(SIZES["tiny"], causal=causal)).eval()
    model.set_classifier(2, pooling)
    batch = Collate(50256)([([5, 6, 7], 0), ([8], 0)])
    seen = []
    model.blocks[0].ff.fc.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    with torch.inference_mode():
        model(batch.ids, batch.last)
    assert seen == [(2, 3, 128)]


@pytest.mark.parametrize("blocks", [[(3, 7), (1, 5), (2, 11)], [(2, 6), (3, 6), (1, 4)]], ids=["widths", "one-width"])
@pytest.mark.parametrize("pooling", ["last_real", "last", "first", "mean", "mean_all"])
@pytest.mark.parametrize("causal", [True, False])
def test_a_batch_in_blocks_computes_what_each_block_computes_alone(pooling, causal, blocks):
    """A sweep's batch (model.Packed with blocks): micro-batches of several widths side by side, each block
    keeping its own padding (neighbours of one width run as one block); logits and gradients equal each
    micro-batch's own forward and backward."""
    from dataclasses import replace

    import torch.nn.functional as F

    from lora_dist.model import GPT2, Packed

    torch.manual_seed(0)
    model = GPT2(replace(SIZES["tiny"], causal=causal))
    model.set_classifier(2, pooling)
    parts = [torch.randint(0, 50000, (r, w)) for r, w in blocks]
    lasts = [torch.tensor([w - 1] + [w // 2] * (r - 1)) for r, w in blocks]  # padded rows and full ones
    width = max(w for _, w in blocks)
    ids = torch.cat([F.pad(p, (0, width - p.shape[1]), value=7) for p in parts])  # what lies past a block is never read
    last = torch.cat(lasts)
    got = model(ids, last, Packed(last + 1, width, blocks))
    got.sum().backward()
    grad = model.head.weight.grad.clone()
    model.zero_grad()
    want = torch.cat([model(p, q) for p, q in zip(parts, lasts, strict=True)])
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, model.head.weight.grad, rtol=1e-5, atol=1e-5)
