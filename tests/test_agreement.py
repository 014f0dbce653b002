"""One adapter, one answer: `classify` (plain and `--merge`), `Classifier`, `serve`, the PEFT export and the
merged export give the same probabilities under each one's defaults.

    pytest tests/test_agreement.py -v

Two adapters: the smoke run, and the main recipe (configs/gpt2-small-lora.yaml: padding to the longest
training message, `last_real` pooling) over the tiny model, trained a few steps. The messages run from 2 to
2,580 characters, the longest past both adapters' max_length (truncated alike everywhere). In-process paths
run as on a CPU with native bf16 (`cpu_has_native_bf16` patched), so a default of `--precision auto` would
compute in bf16 here and miss the fp32 answers by 1e-4 to 5e-2. transformers computes in fp32.
"""

from __future__ import annotations

import json

import httpx
import peft
import pytest
import torch
import transformers
from conftest import cli_env, run_cli
from test_serve import Server

from lora_dist import Classifier, device
from lora_dist.cli import main

SPAM = "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! Call 09061701461."
MESSAGES = [
    "ok",
    "see you at 6",
    "Ok lar... Joking wif u oni...",
    SPAM,
    "I'll be home soon, want anything from the shop? " * 12,
    (SPAM + " ") * 22,  # 2,580 characters, over 500 tokens
]
ATOL = 1e-5  # fp32 paths agree to ~1e-7; bf16 differs by 1e-4 or more on these messages


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """configs/gpt2-small-lora.yaml over the tiny random GPT-2, a few steps: the main recipe's adapter shape."""
    out = tmp_path_factory.mktemp("recipe") / "run"
    proc = run_cli(
        "train",
        "--config",
        "configs/gpt2-small-lora.yaml",
        f"output_dir={out}",
        "model.name=tiny",
        "model.weights=random",
        "train.max_steps=20",
        "train.eval_every=1000",
        "tracking.wandb.mode=disabled",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(params=["smoke", "recipe"])
def run(request, smoke_run):
    return smoke_run[0] if request.param == "smoke" else request.getfixturevalue("recipe_run")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)


def as_matrix(rows: list[dict], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[r["probs"][label] for label in labels] for r in rows])


def transformers_probs(model, directory) -> torch.Tensor:
    """What the README's snippet does: the export's tokenizer, padding and truncation, fp32."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tok(MESSAGES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits.softmax(-1)


def test_every_path_gives_the_same_probabilities(run, native_bf16, tmp_path, capsys):
    reference = Classifier.from_pretrained(run)
    labels = reference.labels
    assert reference.precision == "fp32"
    assert max(len(i) for i in reference.encode(MESSAGES)) == reference.spec.max_length  # one was truncated
    got = {"Classifier": reference.logits(MESSAGES).softmax(-1)}

    for name, extra in (("classify", []), ("classify --merge", ["--merge"])):
        assert main(["classify", "--adapter", str(run), "--json", *extra, *MESSAGES]) == 0
        out = capsys.readouterr()
        rows = json.loads(out.out)
        assert "precision" not in rows[0] and "note: computing in" not in out.err
        got[name] = as_matrix(rows, labels)

    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    with_peft = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft")
    got["PEFT export"] = transformers_probs(with_peft, tmp_path / "peft")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    got["merged export"] = transformers_probs(merged, tmp_path / "merged")

    server = Server({"spam": run}, env=cli_env(), log=tmp_path / "serve.log").wait_ready()
    try:
        answer = httpx.post(server.url + "/v1/classify", json={"adapter": "spam", "texts": MESSAGES}, timeout=120)
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    got["serve"] = as_matrix(answer.json()["results"], labels)

    want = got["Classifier"]
    for name, probs in got.items():
        assert probs.shape == want.shape, name
        gap = (probs - want).abs().max().item()
        assert gap <= ATOL, f"{name} differs from Classifier by {gap:.2g}"
        assert probs.argmax(-1).tolist() == want.argmax(-1).tolist(), name


def test_a_faster_precision_is_said_once_and_marked_in_the_rows(native_bf16, smoke_run, capsys):
    """`--precision auto` computes in bf16 here: one stderr line, a `precision` field in every JSON row, and
    probabilities that really do move (so the agreement above is a test of the default)."""
    run = smoke_run[0]
    assert main(["classify", "--adapter", str(run), "--precision", "auto", "--jsonl", *MESSAGES]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["precision"] for r in rows] == ["bf16"] * len(MESSAGES)
    notes = [line for line in out.err.splitlines() if "bf16" in line]
    assert len(notes) == 1 and notes[0].startswith("note: computing in bf16 (--precision auto"), out.err
    fp32 = Classifier.from_pretrained(run).logits(MESSAGES).softmax(-1)
    assert (as_matrix(rows, Classifier.from_pretrained(run).labels) - fp32).abs().max().item() > ATOL

    assert main(["eval", str(run), "--precision", "auto", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["precision"] == "bf16" and out.err.count("note: computing in bf16") == 1
    assert main(["eval", str(run), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["precision"] == "fp32" and "note:" not in out.err


def test_serve_defaults_to_fp32():
    from lora_dist.cli import _parser

    assert _parser().parse_args(["serve", "--adapters", "a=b"]).precision == "fp32"
    assert _parser().parse_args(["classify", "--adapter", "a", "x"]).precision == "fp32"
