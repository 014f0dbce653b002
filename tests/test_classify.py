"""Using a trained adapter: the self-describing adapter, `Classifier`, `lora-dist classify`, `adapter info`."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from conftest import SMOKE, run_cli, torchrun

from lora_dist import Classifier, UserError
from lora_dist.cli import main

SHORT = ("train.epochs=1", "train.eval_every=1000", "train.eval_batches=1", "tracking.wandb.mode=disabled")
MESSAGES = [
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "see you at 6",
    "Ok lar... Joking wif u oni...",
    "URGENT! Call 09061701461 now to claim your cash",
    "I'll be home soon, want anything from the shop?",
]


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run[0]  # the session's smoke run (conftest.py)


@pytest.fixture(scope="module")
def clf(run):
    return Classifier.from_pretrained(run, precision="fp32")


def cli(*args, input=None, env=None):
    return run_cli(*args, input=input, env=env)


# ------------------------------------------------------------------------------------ the adapter


def test_adapter_describes_itself(run):
    spec = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert spec["format"] == "lora-dist/2" and spec["kind"] == "lora"
    assert spec["base"] == {"name": "tiny", "source": "random", "sha256": None, "seed": 123, "context_length": None}
    assert spec["labels"] == ["ham", "spam"] and spec["pooling"] == "last_real" and spec["tokenizer"] == "gpt2-bpe"
    assert spec["max_length"] == 256 and spec["pad_to"] is None and spec["pad_token_id"] == 50256
    assert spec["lora"]["rank"] == 16 and spec["lora"]["scaling"] == "alpha/r" and spec["lora"]["scale"] == 1.0
    assert len(spec["lora"]["targets"]) == 13 and spec["lora"]["head"] and spec["lora"]["train_head"]


def test_adapter_info(run, capsys):
    for path in (run, run / "adapter"):
        assert main(["adapter", "info", str(path)]) == 0
        out = capsys.readouterr().out
        size = (run / "adapter" / "adapter_model.safetensors").stat().st_size
        assert f"{size:,} bytes" in out and "tensors:   28 " in out and "labels:    ham, spam" in out
        assert "tiny with random weights (seed 123)" in out
        assert json.loads(out[out.index("\n{") + 1 :])["format"] == "lora-dist/2"


def test_a_base_with_other_weights_is_refused(run, tiny_checkpoint, tmp_path):
    """An adapter trained on a local base directory records its SHA-256; another directory of the same
    shape but other weights is refused, naming both."""
    out = tmp_path / "local"
    proc = run_cli(
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        f"model.weights={tiny_checkpoint}",
        "train.max_steps=3",
        *SHORT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = json.loads((out / "adapter" / "adapter_config.json").read_text())
    import hashlib

    assert spec["base"]["sha256"] == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert Classifier.from_pretrained(out).labels == ["ham", "spam"]
    other = tmp_path / "other-base"
    from lora_dist import load_gpt2, save_hf_checkpoint

    torch.manual_seed(99)
    save_hf_checkpoint(load_gpt2("tiny", weights="random"), other)
    with pytest.raises(UserError, match=r"was trained on tiny from .*, but the base found is .*other weights"):
        Classifier.from_pretrained(out, base=str(other))
    copy = tmp_path / "same-base-elsewhere"
    shutil.copytree(tiny_checkpoint, copy)  # the same weights in another place are fine
    assert Classifier.from_pretrained(out, base=str(copy)).labels == ["ham", "spam"]
    bad = json.loads((run / "adapter" / "adapter_config.json").read_text())
    bad["base"]["seed"] = 7
    moved = tmp_path / "moved"
    shutil.copytree(run / "adapter", moved)
    (moved / "adapter_config.json").write_text(json.dumps(bad))
    # A random base is rebuilt from its seed; the other seed is another base: the logits differ.
    with torch.no_grad():
        assert not torch.allclose(
            Classifier.from_pretrained(moved, precision="fp32").logits(MESSAGES),
            Classifier.from_pretrained(run, precision="fp32").logits(MESSAGES),
        )


def test_first_format_adapters_still_load(run, clf, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    new = json.loads((old / "adapter" / "adapter_config.json").read_text())
    legacy = {
        "base_model": "tiny",
        "weights": "random",
        "num_classes": 2,
        "classes": ["ham", "spam"],
        "target_modules": new["lora"]["targets"],
        "lora": {"rank": 16},
        "context_length": None,
        "format": "lora-dist/1",
    }
    (old / "adapter" / "adapter_config.json").write_text(json.dumps(legacy))
    torch.testing.assert_close(
        Classifier.from_pretrained(old, precision="fp32").logits(MESSAGES), clf.logits(MESSAGES), rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------- Classifier


def test_predictions_agree_with_training_and_eval(run, clf, capsys):
    """The test split through the Classifier: the accuracy training measured (its own evaluation loop)
    and the one `lora-dist eval` gives."""
    results = json.loads((run / "results.json").read_text())
    test = pd.read_csv(run / "splits" / "test.csv", keep_default_na=False)
    got = clf.predict(test["text"].tolist())
    accuracy = sum(r["label"] == y for r, y in zip(got, test["label"], strict=True)) / len(test)
    assert accuracy == pytest.approx(results["test_accuracy"])
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(accuracy)


def test_predict_objects_order_and_batching(clf):
    got = clf.predict(MESSAGES, batch_size=2)
    assert [r["text"] for r in got] == MESSAGES
    for r in got:
        assert set(r["probs"]) == {"ham", "spam"} and abs(sum(r["probs"].values()) - 1) < 1e-6
        assert r["label"] == max(r["probs"], key=r["probs"].get)
    alone = torch.cat([clf.logits([m]) for m in MESSAGES])  # one at a time: no padding at all
    batched = clf.logits(MESSAGES, batch_size=3)
    assert batched.shape == (5, 2)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_merge_gives_the_same_outputs(run, clf):
    merged = Classifier.from_pretrained(run, precision="fp32", merge=True)
    texts = MESSAGES * 4
    torch.testing.assert_close(merged.logits(texts), clf.logits(texts), rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged.model.blocks[0].att.query.linear.weight, clf.model.blocks[0].att.query.linear.weight)


def test_empty_and_too_long_messages(clf):
    long = "spam " * 400  # 400 tokens: more than the 256 the adapter was trained to
    got = clf.predict(["", "   ", long])
    assert len(got) == 3 and clf.tokenize(["", "   ", long])[1] == 1 and clf.tokenize([long[:200]])[1] == 0
    torch.testing.assert_close(clf.logits([long]), clf.logits(["spam " * 256]), rtol=1e-5, atol=1e-5)


def test_predict_rejects_a_bare_string(clf):
    with pytest.raises(TypeError, match="list of messages"):
        clf.predict("one message")


# --------------------------------------------------------------------------------------- the CLI


def test_classify_arguments_table_and_json(run, clf):
    proc = cli("classify", "--adapter", str(run), "--precision", "fp32", *MESSAGES[:2])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    want = clf.predict(MESSAGES[:2])
    assert lines[0].split() == ["#", "label", "prob", "text"] and len(lines) == 3
    for line, w in zip(lines[1:], want, strict=True):
        _, label, prob, *_ = line.split()
        assert label == w["label"] and float(prob) == pytest.approx(w["probs"][w["label"]], abs=1e-3)
    proc = cli("classify", "--adapter", str(run / "adapter"), "--precision", "fp32", "--json", *MESSAGES)
    got = json.loads(proc.stdout)
    assert [g["label"] for g in got] == [w["label"] for w in clf.predict(MESSAGES)]
    for g, w in zip(got, clf.predict(MESSAGES), strict=True):
        assert g["text"] == w["text"] and g["probs"] == pytest.approx(w["probs"], abs=1e-6)


def test_classify_files_stdin_and_out(run, clf, tmp_path):
    txt = tmp_path / "messages.txt"
    txt.write_text("\n".join(MESSAGES) + "\n")
    csv = tmp_path / "data.csv"
    pd.DataFrame({"id": range(5), "body": MESSAGES}).to_csv(csv, index=False)
    want = [w["label"] for w in clf.predict(MESSAGES)]
    for args, stdin in (
        (["--file", str(txt)], None),
        (["--file", str(csv), "--text-column", "body"], None),
        (["-"], txt.read_text()),
    ):
        out = tmp_path / "out.jsonl"
        proc = cli(
            "classify", "--adapter", str(run), "--precision", "fp32", *args, "--jsonl", "--out", str(out), input=stdin
        )
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["text"] for r in rows] == MESSAGES and [r["label"] for r in rows] == want
        assert f"written: {out} (5 messages)" in proc.stderr
        assert not list(tmp_path.glob(".out.jsonl*"))  # the temporary file was renamed into place


def test_classify_notes_empty_and_truncated_messages(run, tmp_path):
    f = tmp_path / "m.txt"
    f.write_text("hello\n\n   \n" + "win " * 300 + "\n")
    proc = cli("classify", "--adapter", str(run), "--file", str(f), "--jsonl")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 4, proc.stderr
    assert "1 message(s) longer than 256 tokens were truncated" in proc.stderr
    assert "2 message(s) were empty or whitespace only" in proc.stderr


def test_classify_bad_adapter_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for path, message in ((tmp_path / "nope", "not found"), (tmp_path, "is not a lora-dist adapter")):
        proc = cli("classify", "--adapter", str(path), "hi")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    proc = cli("classify", "--adapter", str(tmp_path), "hi")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_existing_out_file_survives_a_failure(run, tmp_path):
    out = tmp_path / "keep.jsonl"
    out.write_text("precious\n")
    proc = cli("classify", "--adapter", str(run), "--file", str(tmp_path / "missing.txt"), "--out", str(out))
    assert proc.returncode == 2 and out.read_text() == "precious\n"


@pytest.mark.slow
def test_one_and_two_processes_write_the_same_file(run, tmp_path):
    """torchrun shards the input; rank 0 writes it once, in input order: byte for byte what one process writes."""
    test = pd.read_csv(run / "splits" / "test.csv", keep_default_na=False)
    src = tmp_path / "big.csv"
    pd.DataFrame({"text": test["text"].tolist() * 2}).to_csv(src, index=False)  # 600 messages
    args = (
        "classify",
        "--adapter",
        str(run),
        "--file",
        str(src),
        "--jsonl",
        "--precision",
        "fp32",
        "--shard-size",
        "64",
    )
    one = tmp_path / "one.jsonl"
    proc = cli(*args, "--out", str(one))
    assert proc.returncode == 0, proc.stderr
    two = tmp_path / "two.jsonl"
    proc = torchrun(2, *args, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    rows = [json.loads(x) for x in two.read_text().splitlines()]
    assert len(rows) == 600 and [r["text"] for r in rows] == test["text"].tolist() * 2
    assert proc.stderr.count("written:") == 1


def test_saved_files_are_readable_like_any_written_file(tmp_path):
    """safetensors creates its files 0600; an adapter must be readable by other users (a container's UID,
    a shared cluster), as open() leaves a file: 0666 less the umask."""
    import os
    import stat

    from lora_dist.files import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.txt").write_text("b")

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tmp_path / "a.safetensors") == mode(tmp_path / "b.txt")
