"""Adapters a new user brings: one trained with PEFT on a model built from a config (no base path in its
adapter_config.json), lora-dist's PEFT export, a sweep's directory, and adapters without label names; read by
`adapter info`, `classify`, `Classifier`, `MultiAdapterClassifier` and `serve`.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import httpx
import peft  # noqa: E402  (test dependencies, pip install -e .[dev])
import pytest
import torch
import transformers  # noqa: E402
from conftest import SMOKE
from test_export import MESSAGES, make_adapter, probs_hf
from test_serve import Server

from lora_dist import Classifier, MultiAdapterClassifier, UserError
from lora_dist.cli import main
from lora_dist.export import write_tokenizer


@pytest.fixture(scope="module")
def null_base(tiny_checkpoint, tmp_path_factory):
    """(PEFT adapter directory, PEFT model): LoRA r=4 on c_attn, c_proj, c_fc of a GPT2ForSequenceClassification
    built from a config (so PEFT writes base_model_name_or_path: null) over the tiny checkpoint's weights."""
    torch.manual_seed(5)
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256, num_labels=2, pad_token_id=50256)
    model = transformers.GPT2ForSequenceClassification(config)  # lora-dist's tiny GPT-2, built from a config
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=2)
    model.transformer.load_state_dict(loaded.transformer.state_dict())
    model = peft.get_peft_model(
        model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("peft") / "null-base"
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    write_tokenizer(out, SimpleNamespace(max_length=256, pad_token_id=50256))  # GPT-2's tokenizer files, for probs_hf
    return out, model


def test_a_peft_adapter_naming_no_base_is_read_with_base(null_base, tiny_checkpoint):
    """Classifier and MultiAdapterClassifier take --base for it, and agree with PEFT; without a base, one line."""
    path, model = null_base
    truth = probs_hf(model, path)
    clf = Classifier.from_pretrained(path, base=str(tiny_checkpoint), precision="fp32")
    torch.testing.assert_close(clf.logits(MESSAGES).softmax(-1), truth, rtol=0, atol=1e-4)
    multi = MultiAdapterClassifier.from_pretrained(tiny_checkpoint, {"p": path}, precision="fp32")
    torch.testing.assert_close(multi.logits(MESSAGES, "p").softmax(-1), truth, rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="names no base_model_name_or_path; pass --base DIR"):
        MultiAdapterClassifier.from_pretrained(None, {"p": path})


@pytest.mark.slow
def test_serve_takes_base_for_a_peft_adapter_naming_none(null_base, tiny_checkpoint, tmp_path):
    path, model = null_base
    truth = probs_hf(model, path)
    server = Server(
        {"p": path}, "--base", str(tiny_checkpoint), "--device", "cpu", "--labels", "p=ham,spam", log=tmp_path / "log"
    )
    try:
        server.wait_ready()
        answer = httpx.post(server.url + "/v1/classify", json={"adapter": "p", "texts": MESSAGES}, timeout=60).json()
        got = torch.tensor([[r["probs"]["ham"], r["probs"]["spam"]] for r in answer["results"]])
        torch.testing.assert_close(got, truth, rtol=0, atol=1e-4)
        listed = httpx.get(server.url + "/v1/adapters", timeout=10).json()
        assert listed["adapters"][0]["labels"] == ["ham", "spam"]
    finally:
        server.stop()


def test_adapter_info_describes_a_peft_adapter(null_base, tiny_checkpoint, capsys):
    path, _ = null_base
    assert main(["adapter", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trained with PEFT" in out and "base_model_name_or_path is null" in out
    assert "LoRA rank 4, alpha 8" in out and "c_attn" in out and "c_fc" in out
    assert "2 classes, no names saved" in out
    assert "reads as:  not yet" in out and "pass --base DIR" in out
    assert main(["adapter", "info", str(path), "--base", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "reads as:  4-rank LoRA on 12 lora-dist layers, labels LABEL_0, LABEL_1" in out
    assert json.loads(out[out.index("\n{") :])["base"]["source"] == str(tiny_checkpoint.resolve())


def test_adapter_info_describes_lora_dists_own_peft_export(tiny_checkpoint, tmp_path, capsys):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    assert main(["adapter", "info", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "exported by lora-dist" in out and "labels:    ham, spam" in out
    assert f"base:      tiny from {tiny_checkpoint.resolve()}" in out
    assert "reads as:  16-rank LoRA on 12 lora-dist layers, labels ham, spam" in out


def test_labels_name_an_adapters_classes(null_base, tiny_checkpoint, tmp_path, capsys):
    """--labels / labels= name the classes of an adapter that has none; a wrong count, or an adapter that names
    its own, is one error line."""
    path, _ = null_base
    base = str(tiny_checkpoint)
    plain = Classifier.from_pretrained(path, base=base)
    named = Classifier.from_pretrained(path, base=base, labels=["ham", "spam"])
    assert plain.labels == ["LABEL_0", "LABEL_1"] and named.labels == ["ham", "spam"]
    assert [r["label"] for r in named.predict(MESSAGES)] == [
        {"LABEL_0": "ham", "LABEL_1": "spam"}[r["label"]] for r in plain.predict(MESSAGES)
    ]
    assert main(["classify", "--adapter", str(path), "--base", base, "--labels", "ham,spam", "--jsonl", "hi"]) == 0
    assert set(json.loads(capsys.readouterr().out)["probs"]) == {"ham", "spam"}
    multi = MultiAdapterClassifier.from_pretrained(tiny_checkpoint, {"p": path}, labels={"p": "ham,spam"})
    assert multi.labels("p") == ["ham", "spam"]
    assert main(["classify", "--adapter", str(path), "--base", base, "--labels", "a,b,c", "hi"]) == 2
    assert "it has 2 classes, so give 2 distinct" in capsys.readouterr().err
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    with pytest.raises(UserError, match=r"already names its labels \(ham, spam\)"):
        Classifier.from_pretrained(run, labels="no,yes")
    assert Classifier.from_pretrained(run, labels="ham,spam").labels == ["ham", "spam"]


def test_a_sweeps_directory_is_named_a_sweep(tiny_checkpoint, tmp_path, capsys):
    """A finished sweep's directory: `adapter info` lists its adapters; classify and serve say it is a sweep,
    name its adapters and how to pick one (or serve them all)."""
    sweep = tmp_path / "my-sweep"
    names = ["rank4-lr0.001", "rank16-lr0.001"]
    for i, name in enumerate(names):
        make_adapter(sweep / "adapters" / name, tiny_checkpoint, seed=i)
    (sweep / "checkpoints").mkdir()
    (sweep / "config.yaml").write_text("model: {name: tiny}\nsweep:\n  grid: {lora.rank: [4, 16]}\n")
    entries = [
        {"name": "rank16-lr0.001", "status": "done", "val_accuracy": 0.9, "test_accuracy": 0.88},
        {"name": "rank4-lr0.001", "status": "done", "val_accuracy": 0.8, "test_accuracy": 0.79},
    ]
    (sweep / "sweep.json").write_text(json.dumps({"adapters": entries}))
    assert main(["adapter", "info", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "a lora-dist sweep: 2 adapters, 2 with a saved adapter" in out
    assert out.index("rank16-lr0.001") < out.index("rank4-lr0.001") and "90.00%" in out
    assert main(["classify", "--adapter", str(sweep), "hi"]) == 2
    err = capsys.readouterr().err
    assert "is a sweep's directory, not one adapter; its adapters: rank16-lr0.001, rank4-lr0.001" in err
    assert "never finished" not in err
    with pytest.raises(UserError, match=r"sweep's directory.*--adapters-dir"):
        MultiAdapterClassifier.from_pretrained(None, {"s": sweep})
    # one named inside it is an adapter as any other
    assert Classifier.from_pretrained(sweep / "adapters" / names[0]).labels == ["ham", "spam"]
    # a sweep still running (no sweep.json yet) is a sweep too
    (sweep / "sweep.json").unlink()
    shutil.rmtree(sweep / "adapters" / names[1])
    with pytest.raises(UserError, match="its adapters: rank4-lr0.001"):
        Classifier.from_pretrained(sweep)


def test_a_run_with_checkpoints_only_is_still_called_unfinished(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(SMOKE.read_text())
    with pytest.raises(UserError, match="never finished: resume it with train.resume=auto"):
        Classifier.from_pretrained(tmp_path / "run")


def test_the_service_counts_an_adapters_layers_as_adapter_info_does(tiny_checkpoint, tmp_path, capsys):
    from lora_dist.infer.multi_adapter import read_adapters
    from lora_dist.serve.app import Service

    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    assert main(["adapter", "info", str(run)]) == 0
    assert "on 13 layers" in capsys.readouterr().out  # 12 in the blocks and the head
    assert Service(read_adapters({"s": run})).adapters()["adapters"][0]["layers"] == 13
