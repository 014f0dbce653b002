"""Export to PEFT and to a merged Hugging Face model, loaded back by transformers (+ PEFT) and by lora-dist.

Adapters are built, not trained (a tiny GPT-2 whose LoRA and head tensors are drawn at random, saved as
training saves them): the equality of the outputs does not need a trained model, and this keeps the file fast.
"""

from __future__ import annotations

import json
import shutil

import peft  # noqa: E402  (test dependencies, pip install -e .[dev]: a broken install fails, not skips)
import pytest
import torch
import transformers  # noqa: E402
from conftest import SMOKE

from lora_dist import Classifier, UserError, load_gpt2
from lora_dist.cli import main

# Different lengths, so the batch is padded (pad_token_id 50256); none empty: transformers masks an all-padding row.
MESSAGES = [
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "see you at 6",
    "Ok lar... Joking wif u oni...",
    "URGENT! Call 09061701461 now to claim your cash",
    "I'll be home soon, want anything from the shop? x",
]


def make_adapter(run_dir, base, *overrides, seed=1):
    """What `lora-dist train` leaves in RUN_DIR/adapter (or weights/) for the smoke config with these
    overrides, its trained tensors drawn at random (the head's bias too, which the export must move)."""
    from lora_dist.adapter import AdapterSpec, base_of, save
    from lora_dist.build import build_model, seed_everything
    from lora_dist.config import load_config
    from lora_dist.lora import adapter_state_dict

    cfg = load_config(SMOKE, [f"model.weights={base}", *overrides])
    seed_everything(cfg.train.seed)
    model, modules = build_model(cfg, 2)
    torch.manual_seed(seed)
    tensors = adapter_state_dict(model)
    with torch.no_grad():
        for t in tensors.values():
            t.add_(torch.randn_like(t) * 0.05)
    spec = AdapterSpec.for_run(cfg, ("ham", "spam"), 256, modules, base_of(cfg))
    save(run_dir, spec, tensors)
    return run_dir


def probs_hf(model, directory):
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tok(MESSAGES, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > min(batch["attention_mask"].sum(1))  # the batch really is padded
    with torch.no_grad():
        return model.eval()(**batch).logits.softmax(-1)


def ours(path, **kw):
    return Classifier.from_pretrained(path, precision="fp32", **kw).logits(MESSAGES).softmax(-1)


def export(path, fmt, out, *extra):
    return main(["export", str(path), "--format", fmt, "--out", str(out), *extra])


CASES = {
    # the smoke recipe: every Linear layer and the head (LoRA on it, and trained in full), alpha/r
    "all-layers": (),
    # query and value only (the key's rows of c_attn are zero), the feed-forward's first layer, rslora, no head LoRA
    "qv-rslora": (
        "lora.targets=[*.att.query,*.att.value,*.ff.fc]",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.scaling=rslora",
        "lora.head=false",
        "lora.train_head=false",
    ),
    # the book's scaling (scale = alpha), attention only
    "book-scaling": ("lora.targets=[*.att.*]", "lora.rank=8", "lora.alpha=16", "lora.scaling=alpha"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exports_give_the_classifier_probabilities(case, tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint, *CASES[case])
    want = ours(run)
    assert export(run, "peft", tmp_path / "peft") == 0
    assert export(run, "merged", tmp_path / "merged") == 0
    assert f"written: {tmp_path / 'peft'} (peft" in capsys.readouterr().out

    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "GPT2ForSequenceClassification"
    assert merged.config.id2label == {0: "ham", 1: "spam"} and merged.config.pad_token_id == 50256
    torch.testing.assert_close(probs_hf(merged, tmp_path / "merged"), want, rtol=0, atol=1e-4)

    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_checkpoint, num_labels=2, pad_token_id=50256
    )
    with_peft = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(probs_hf(with_peft, tmp_path / "peft"), want, rtol=0, atol=1e-4)

    # the round trip: lora-dist reads its own PEFT export back
    torch.testing.assert_close(ours(tmp_path / "peft"), want, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_checkpoint.resolve())
    if case == "qv-rslora":  # c_attn: rank 4 + 4 (no key), the key's rows zero; c_fc rank 4
        rank = lambda m: config["rank_pattern"].get(m, config["r"])  # noqa: E731
        alpha = lambda m: config["alpha_pattern"].get(m, config["lora_alpha"])  # noqa: E731
        assert (
            config["use_rslora"] and rank("transformer.h.0.attn.c_attn") == 8 and rank("transformer.h.0.mlp.c_fc") == 4
        )
        # PEFT's scale alpha / sqrt(r) is ours (8 / sqrt(4)) for both ranks
        assert (
            alpha("transformer.h.0.attn.c_attn") / 8**0.5 == pytest.approx(4.0) == alpha("transformer.h.0.mlp.c_fc") / 2
        )
        from safetensors.torch import load_file

        B = load_file(tmp_path / "peft" / "adapter_model.safetensors")[
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
        ]
        assert B.shape == (3 * 128, 8) and not B[128:256].any() and not B[:128, 4:].any() and not B[256:, :4].any()


def test_merged_export_loads_with_load_gpt2(tiny_checkpoint, tmp_path):
    """lora_dist.load_gpt2 reads the merged body; with `score` as a bias-free head it gives the same logits."""
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    assert export(run, "merged", tmp_path / "merged") == 0
    model = load_gpt2(str(tmp_path / "merged"))
    model.set_classifier(2)
    from safetensors.torch import load_file

    with torch.no_grad():
        model.head.weight.copy_(load_file(tmp_path / "merged" / "model.safetensors")["score.weight"])
        model.head.bias.zero_()
    clf = Classifier(model.eval(), Classifier.from_pretrained(run).spec, precision="fp32")
    torch.testing.assert_close(clf.logits(MESSAGES).softmax(-1), ours(run), rtol=0, atol=1e-5)


def test_random_base_is_written_beside_the_peft_export(tmp_path, capfd):
    run = make_adapter(tmp_path / "run", "random")
    assert export(run, "peft", tmp_path / "peft") == 0
    note = capfd.readouterr().out
    assert "random weights" in note and "If you move" in note and "base-model" in note
    assert (tmp_path / "peft" / "base-model" / "model.safetensors").is_file()
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft")  # base_model_name_or_path
    # base-model/ holds a score (zeros), which the adapter's replaces: transformers reports no "MISSING" key
    _, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "peft" / "base-model", output_loading_info=True
    )
    assert not any(info.values()), info
    torch.testing.assert_close(probs_hf(model, tmp_path / "peft"), ours(run), rtol=0, atol=1e-4)

    # Moved, the absolute base path is gone; what README.md in the export says to do works, and lora-dist reads it.
    moved = tmp_path / "elsewhere" / "spam-peft"
    moved.parent.mkdir()
    shutil.move(tmp_path / "peft", moved)
    readme = (moved / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "NEW")' in readme and 'from_pretrained("NEW/base-model")' in readme
    base = transformers.AutoModelForSequenceClassification.from_pretrained(moved / "base-model")
    with_peft = peft.PeftModel.from_pretrained(base, moved)
    torch.testing.assert_close(probs_hf(with_peft, moved), ours(run), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours(moved), ours(run), rtol=0, atol=1e-5)


def test_trained_layers_export_merged(tiny_checkpoint, tmp_path):
    """A run that trains whole layers (no LoRA) has no PEFT form, but exports merged."""
    run = make_adapter(tmp_path / "run", tiny_checkpoint, "train.trainable=last_block")
    assert export(run, "merged", tmp_path / "merged") == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(probs_hf(merged, tmp_path / "merged"), ours(run), rtol=0, atol=1e-4)


def made_elsewhere(checkpoint, out):
    """An adapter made with PEFT itself, saved to `out`: a dense c_attn block, rank and alpha patterns, ln_f
    saved, three labels, every trained tensor given a value. Returns the PEFT model."""
    torch.manual_seed(3)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=3, pad_token_id=50256)
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc", "c_proj"],
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"h.1.mlp.c_fc": 3.0},
        modules_to_save=["ln_f"],
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # lora_B starts at zero: give every trained tensor a value
    model.save_pretrained(out)
    return model


def test_a_peft_adapter_trained_elsewhere(tiny_checkpoint, tmp_path):
    """An adapter made with PEFT itself (dense c_attn block, rank and alpha patterns, ln_f saved) reads into
    lora-dist; the labels come from the base's config when it has them."""
    model = made_elsewhere(tiny_checkpoint, tmp_path / "elsewhere")
    clf = Classifier.from_pretrained(tmp_path / "elsewhere", precision="fp32")
    from lora_dist.export import write_tokenizer

    write_tokenizer(tmp_path / "elsewhere", clf.spec)  # GPT-2's tokenizer files, for probs_hf
    torch.testing.assert_close(
        clf.logits(MESSAGES).softmax(-1), probs_hf(model, tmp_path / "elsewhere"), rtol=0, atol=1e-4
    )
    assert clf.labels == ["LABEL_0", "LABEL_1", "LABEL_2"] and set(clf.spec.overrides) == {
        "final_norm.weight",
        "final_norm.bias",
    }
    assert clf.spec.lora["rank"] == 4 and len(clf.spec.lora["targets"]) == 12  # q, k, v split from each c_attn


def test_peft_layers_without_a_lora_dist_form_are_refused(tiny_checkpoint, tmp_path):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    assert export(run, "peft", tmp_path / "peft") == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for change, message in (
        ({"use_dora": True}, "uses DoRA"),
        ({"peft_type": "IA3"}, "LoRA adapters only"),
        ({"task_type": "CAUSAL_LM"}, "task_type SEQ_CLS"),
        ({"r": 5, "rank_pattern": {}}, "do not fit rank 5"),
    ):
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | change))
        with pytest.raises(UserError, match=message):
            Classifier.from_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file, save_file

    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    f = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(f)
    save_file(tensors | {"base_model.model.transformer.wte.lora_embedding_A": torch.zeros(4, 50257)}, f)
    with pytest.raises(UserError, match="lora_embedding_A' has no lora-dist form"):
        Classifier.from_pretrained(tmp_path / "peft")


@pytest.mark.parametrize(
    "overrides,fmt,message",
    [
        (("model.pooling=mean",), "merged", "pools 'mean', but GPT2ForSequenceClassification reads the last token"),
        (("model.pooling=last",), "peft", "pools 'last'"),
        (("model.causal_mask=false",), "peft", "without the causal mask"),
        (("train.trainable=last_block",), "peft", "has no PEFT LoRA form; export it with --format merged"),
    ],
)
def test_export_refusals(overrides, fmt, message, tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint, *overrides)
    assert export(run, fmt, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_tensor_peft_cannot_hold_is_never_dropped(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A trained tensor the PEFT form has no place for stops the export, naming it."""
    from safetensors.torch import load_file, save_file

    import lora_dist.lora as lora
    from lora_dist.adapter import find

    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    real = lora.adapter_state_dict
    monkeypatch.setattr(
        lora,
        "adapter_state_dict",  # a model that trains norm1 too (no such option yet)
        lambda model, head_name="head": (
            real(model, head_name) | {"blocks.0.norm1.weight": model.blocks[0].norm1.weight}
        ),
    )
    f = find(run).tensor_file
    save_file(load_file(f) | {"blocks.0.norm1.weight": torch.ones(128)}, f)
    assert export(run, "peft", tmp_path / "out") == 2
    assert "blocks.0.norm1.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_export_never_writes_into_a_full_directory(tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert export(run, "merged", tmp_path / "out") == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ bad adapters, through the CLI


def _damage(adapter_dir, how):
    from safetensors.torch import load_file, save_file

    f, cfg = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    if how == "corrupt":
        f.write_bytes(b"\x13\x37" * 500)
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "wrong-shape":
        save_file(load_file(f) | {"blocks.0.att.query.lora.A": torch.zeros(128, 8)}, f)
    elif how in ("missing-key", "newer-format"):
        d = json.loads(cfg.read_text())
        cfg.write_text(
            json.dumps(
                {k: v for k, v in d.items() if k != "labels"} if how == "missing-key" else d | {"format": "lora-dist/3"}
            )
        )


@pytest.mark.parametrize(
    "how,message",
    [
        ("corrupt", "cannot be read"),
        ("truncated", "cannot be read"),
        ("wrong-shape", "tensor 'blocks.0.att.query.lora.A' has shape [128, 8], but the description says rank 16"),
        ("missing-key", "is not a lora-dist adapter description (KeyError: 'labels')"),
        ("newer-format", "is of format lora-dist/3, newer than this lora-dist reads"),
    ],
)
def test_a_damaged_adapter_is_one_line(how, message, tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    _damage(run / "adapter", how)
    for args in (
        ["classify", "--adapter", str(run), "hi"],
        ["adapter", "info", str(run)],
        ["export", str(run), "--format", "merged", "--out", str(tmp_path / "x")],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
def test_a_damaged_peft_adapter_is_one_line(how, tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    assert export(run, "peft", tmp_path / "peft") == 0
    _damage(tmp_path / "peft", how)
    assert main(["classify", "--adapter", str(tmp_path / "peft"), "hi"]) == 2
    assert "adapter_model.safetensors cannot be read" in capsys.readouterr().err


def test_the_wrong_base_is_refused_by_the_cli(tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    torch.manual_seed(99)
    from lora_dist import save_hf_checkpoint

    other = save_hf_checkpoint(load_gpt2("tiny", weights="random"), tmp_path / "other")
    for args in (
        ["classify", "--adapter", str(run), "--base", str(other), "hi"],
        ["export", str(run), "--format", "peft", "--out", str(tmp_path / "x"), "--base", str(other)],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "was trained on tiny from" in err and "other weights (SHA-256 differs)" in err and "--base" in err, err
