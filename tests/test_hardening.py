"""Bad input, round 3 (issue 30): never replace what is not ours, never delete what is not ours, bounded work for
any input, one answer everywhere. Each case names its number in the issue.

Most cases are one error line through the real CLI, in-process (`test_bad_input.run_main`); the rest check
files written or left alone, and a sweep stopped by a real signal.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from functools import partial

import pytest
from conftest import ROOT, SMOKE, cli_env
from safetensors import SafetensorError
from test_bad_input import SWEEP, TRAIN, _adapter, _sweep, quick_run, run_main, run_main_out, small_data

from lora_dist import files
from lora_dist.train import checkpoint as ckpt

CLASSIFY = ["classify", "--adapter", "{d}/a", "hi there"]
INFO = ["adapter", "info", "{d}/a"]
SERVE = ["serve", "--adapters", "a={d}/a", "--port", "0"]


def _text(name: str, text: str):
    def make(d):
        (d / name).write_text(text)

    return make


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)
# Descriptions that no run writes and that no base could serve (case 9): adapter info, classify and serve all
# refuse them, with the same words.
UNUSABLE = {
    "max-length-1e12": ({"max_length": 10**12}, {}, "context of 256"),
    "pad-token-outside-the-vocabulary": ({"pad_token_id": 60000}, {}, "outside its base's vocabulary"),
    "targets-no-layer": ({}, {"targets": ["blocks.99.att.W_query", "head"]}, "'blocks.99.att.W_query'"),
    "base-name-with-dots": ({"base": "dots"}, {}, "base.name"),
}


def _unusable(d, config, lora):
    if config.get("base") == "dots":
        _adapter(d)  # written into {d}/a, then its base renamed
        f = d / "a" / "adapter" / "adapter_config.json"
        desc = json.loads(f.read_text())
        desc["base"]["name"] = "../../tiny"
        f.write_text(json.dumps(desc))
        return
    _adapter(d, config=config, lora=lora)


# (id, files to make, argv, words the error line must hold); {d} is the test's temporary directory.
CASES = [
    # 2: an empty output_dir would write the run into the current directory
    ("2-train-output-dir-empty", None, [*TRAIN, "output_dir="], "output_dir is empty"),
    (
        "2-sweep-output-dir-empty",
        _sweep("  grid: {lora.rank: [4]}\n"),
        [*SWEEP, "output_dir=''"],
        "output_dir is empty",
    ),
    # 4: YAML aliases (billion laughs) and nesting, in a config, a sweep grid, an override
    (
        "4-config-billion-laughs",
        _text("c.yaml", f"output_dir: x\nmodel:\n  name: tiny\n{LAUGHS}"),
        ["params", "--config", "{d}/c.yaml"],
        "alias *a is not allowed",
    ),
    ("4-sweep-grid-alias", _sweep("  grid: {lora.rank: &r [4, 8], train.lr: *r}\n"), SWEEP, "alias *r is not allowed"),
    (
        "4-config-nested-deep",
        _text("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ["train", "--config", "{d}/deep.yaml"],
        "nested deeper than",
    ),
    (
        "4-config-nested-block",
        _text("deep.yaml", "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n"),
        ["train", "--config", "{d}/deep.yaml"],
        "nested deeper than",
    ),
    ("4-override-nested-deep", None, [*TRAIN, "train.betas=" + "[" * 50_000 + "]" * 50_000], "train.betas"),
    (
        "4-report-results-nested-deep",
        _text("results.json", "[" * 100_000 + "]" * 100_000),
        ["report", "{d}"],
        "nested too deeply",
    ),
    # 6: a grid's size is known before anything is built
    (
        "6-sweep-grid-100x100",
        _sweep(f"  grid: {{lora.rank: {list(range(1, 101))}, train.lr: {[1e-4] * 100}}}\n"),
        SWEEP,
        "10,000 adapters (100 x 100 from sweep.grid)",
    ),
    (
        "6-sweep-grid-1e12",
        _sweep(
            "  grid: {"
            + ", ".join(f"lora.{k}: {list(range(1, 1001))}" for k in ("rank",))
            + ", "
            + ", ".join(f"train.{k}: {[0.1] * 1000}" for k in ("lr", "weight_decay", "max_grad_norm"))
            + "}\n"
        ),
        SWEEP,
        "1,000,000,000,000 adapters",
    ),
    # 7: a rank whose tensors cannot fit: refused with the memory they would take
    ("7-params-rank-1e9", None, ["params", "--config", str(SMOKE), "lora.rank=1000000000"], "GiB"),
    ("7-train-rank-1e9", None, [*TRAIN, "lora.rank=1000000000"], "lora.rank=1000000000 would need"),
    # 8: non-finite numbers, as nan already was
    *[
        (f"8-{key}-{v}", None, [*TRAIN, f"{key}={v}"], f"{key} must be a finite number")
        for key, v in (
            ("train.lr", "inf"),
            ("train.lr", ".inf"),
            ("lora.alpha", "-.inf"),
            ("train.max_grad_norm", "1e999"),
            ("train.weight_decay", "1" + "0" * 400),
        )
    ],
    # 9: one validator for adapter info, classify and serve
    *[
        (f"9-{cmd}-{name}", partial(_unusable, config=c, lora=lo), argv, words)
        for name, (c, lo, words) in UNUSABLE.items()
        for cmd, argv in (("info", INFO), ("classify", CLASSIFY), ("serve", SERVE))
    ],
    # 11: a target pattern that matches no layer
    (
        "11-params-target-matches-nothing",
        None,
        ["params", "--config", str(SMOKE), "lora.targets=[nomatch*]"],
        "lora.targets pattern 'nomatch*' matches no layer",
    ),
    (
        "11-train-one-of-two-matches-nothing",
        None,
        [*TRAIN, "lora.targets=[*.att.*, *.mlp.*]"],
        "'*.mlp.*' matches no layer",
    ),
    # 13
    ("13-classify-timeout-nan", _adapter, [*CLASSIFY, "--timeout-s", "nan"], "--timeout-s must be a finite number"),
    ("13-classify-timeout-0", _adapter, [*CLASSIFY, "--timeout-s", "0"], "--timeout-s must be a finite number"),
    # 16
    ("16-unknown-key-did-you-mean", None, [*TRAIN, "train.epoch=1"], "did you mean 'train.epochs'?"),
    ("16-unknown-section-did-you-mean", None, [*TRAIN, "lroa.rank=4"], "did you mean 'lora'?"),
]


@pytest.mark.parametrize("make,argv,words", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_one_error_line(tmp_path, capsys, make, argv, words):
    if make:
        make(tmp_path)
    code, err = run_main([a.format(d=tmp_path) for a in argv], capsys)
    assert code not in (0, None), err
    errors = [line for line in err.splitlines() if line.startswith("error: ") or line.startswith("lora-dist")]
    assert len(errors) == 1 and "error: " in errors[0] and words in errors[0], err
    assert "Traceback" not in err and len(err) < 4000, err[:4000]


# ------------------------------------------------------------------- 1: --out is written into, not replaced


def _classify_out(tmp_path, capsys, out) -> tuple[int, str]:
    _adapter(tmp_path)
    return run_main(
        ["classify", "--adapter", str(tmp_path / "a"), "win a prize", "hi", "--jsonl", "--out", str(out)], capsys
    )


def test_classify_out_into_a_fifo_is_read_by_its_reader_and_stays_a_fifo(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, err = _classify_out(tmp_path, capsys, fifo)
    reader.join(60)
    assert code == 0, err
    assert [json.loads(line)["text"] for line in got[0].decode().splitlines()] == ["win a prize", "hi"]
    assert fifo.is_fifo() and not list(tmp_path.glob(".fifo*"))


def test_classify_out_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "predictions.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    code, err = _classify_out(tmp_path, capsys, link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [json.loads(line)["text"] for line in target.read_text().splitlines()] == ["win a prize", "hi"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["predictions.jsonl"]  # no temporary file left


def test_out_file_replaces_a_regular_file_atomically_and_writes_into_anything_else(tmp_path):
    regular = tmp_path / "r.txt"
    regular.write_text("old")
    out = files.OutFile(regular)
    out.write("new")
    assert regular.read_text() == "old"  # until commit, a reader sees the old file
    out.commit()
    assert regular.read_text() == "new"
    dangling = tmp_path / "d.txt"
    dangling.symlink_to(tmp_path / "sub-target.txt")
    out = files.OutFile(dangling)
    out.write("x")
    out.commit()
    assert dangling.is_symlink() and (tmp_path / "sub-target.txt").read_text() == "x"


# ------------------------------------------------------------------- 3: overwrite deletes only a run's own files


def test_overwrite_refuses_a_directory_that_is_not_a_run_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    for d in ("plots", "checkpoints"):
        (out / d).mkdir(parents=True)
        (out / d / "mine.txt").write_text("not lora-dist's")
    for extra in ([], ["overwrite=true"]):
        code, err = run_main(quick_run(tmp_path, "train.max_steps=1", *extra), capsys)
        assert code == 2 and "is not a lora-dist run" in err and "checkpoints, plots" in err, err
        assert (out / "plots" / "mine.txt").is_file() and (out / "checkpoints" / "mine.txt").is_file()


def test_a_training_run_is_not_called_a_sweep_and_overwrite_replaces_only_a_runs_names(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(quick_run(tmp_path, "train.max_steps=1"), capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    _sweep("  grid: {lora.rank: [4]}\n")(tmp_path)
    code, err = run_main([*[a.format(d=tmp_path) for a in SWEEP], small_data(tmp_path)], capsys)
    assert code == 2 and "holds a training run, not a sweep" in err, err  # 16: it said "already holds a sweep"
    code, err = run_main(quick_run(tmp_path, "train.max_steps=1", "overwrite=true"), capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------- 4: report on a metrics.jsonl nested deep


def test_report_skips_a_metrics_line_nested_too_deeply(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    code, out, err = run_main_out(["report", str(run)], capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]


# ------------------------------------------------------------------- 5: a huge message is cut before tokenizing


def test_the_longest_token_is_what_the_cut_assumes():
    from lora_dist.tokenizer import LONGEST_TOKEN, get_tokenizer

    tok = get_tokenizer()
    assert max(len(tok.decode_single_token_bytes(i)) for i in range(tok.n_vocab)) == LONGEST_TOKEN


def test_a_huge_message_is_cut_before_it_is_tokenized(monkeypatch):
    from lora_dist import data
    from lora_dist.tokenizer import get_tokenizer

    seen = []
    real = get_tokenizer()

    class Spy:
        def encode_batch(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return real.encode_batch(texts, **kw)

    monkeypatch.setattr(data, "get_tokenizer", lambda: Spy())
    huge = "spam " * 2_000_000  # 10 MB, one line
    ids, cut = data.encode([huge, "hi"], 16)
    assert max(seen) < 100_000 and cut == 1
    assert ids[0] == real.encode(huge[:10_000], disallowed_special=())[:16] and ids[1] == real.encode("hi")


def _random_text(rng: random.Random, n: int) -> str:
    """Letters, digits, spaces, runs of one character, punctuation and non-ASCII: every kind of pre-token."""
    pieces = [
        lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12))),
        lambda: " " * rng.randint(1, 40),
        lambda: rng.choice("aA1 -=_!") * rng.randint(50, 3000),
        lambda: "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 20))),
        lambda: "".join(chr(rng.randint(0x1F300, 0x1F64F)) for _ in range(rng.randint(1, 5))),
        lambda: str(rng.randint(0, 10**12)),
        lambda: rng.choice(["'s", "'ll", "\n", "\t", "<|endoftext|>", "\u00e9", "\u0301"]),
    ]
    out: list[str] = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(pieces)())
    return "".join(out)


@pytest.mark.parametrize("max_length", [1, 7, 64, 1024])
def test_cut_texts_give_the_tokens_of_the_whole_text(max_length):
    """Long random texts, unicode, and single pre-tokens far longer than the cut (one word, one run of spaces
    or digits): their first max_length tokens are those of the text uncut."""
    from lora_dist.data import encode
    from lora_dist.tokenizer import CUT_MARGIN, LONGEST_TOKEN, get_tokenizer

    tok = get_tokenizer()
    bound = max_length * LONGEST_TOKEN + CUT_MARGIN
    rng = random.Random(max_length)
    texts = [_random_text(rng, bound + rng.randint(1, 3 * bound)) for _ in range(6)]
    texts += [c * (bound + 5000) for c in ("a", " ", "1", "!", "\u00e9", "\U0001f600")]
    texts += ["hi " * 10 + "x" * (2 * bound), "ab" * bound + "c"]
    ids, cut = encode(texts, max_length)
    for text, got in zip(texts, ids, strict=True):
        assert got == tok.encode(text, disallowed_special=())[:max_length]
    assert cut == len(texts)


# ------------------------------------------------------------------- 10: state.json step values alike


@pytest.mark.parametrize("step", [10**12, -5, 1e12, 2.0, "3", True], ids=str)
def test_an_impossible_step_in_state_json_is_corrupt_and_resume_falls_back(tmp_path, capsys, step):
    code, err = run_main(quick_run(tmp_path, "train.max_steps=2", "train.checkpoint_every=1"), capsys)
    assert code == 0, err
    newest = tmp_path / "out" / "checkpoints" / "step-00000002"
    state = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps({**state, "step": step}))
    with pytest.raises(Exception, match="corrupt"):
        ckpt.verify(newest)
    code, out, err = run_main_out(quick_run(tmp_path, "train.max_steps=3", "train.resume=auto"), capsys)
    assert code == 0, err
    assert "corrupt" in out and "falling back" in out and "resumed from" in out and "step-00000001" in out, out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 3


# ------------------------------------------------------------------- 12: serve's device before the port


def test_serve_checks_its_device_before_it_binds(tmp_path, capsys, monkeypatch):
    """A CUDA device that does not exist (cuda:99 on a machine with one GPU, or none) is one error line before
    any port is opened."""
    import torch

    from lora_dist.serve import command

    _adapter(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    made = []

    class NoServer:  # stands in for uvicorn's server: records that a port would have been opened
        started = False

        def __init__(self, *args):
            made.append(args)

        def run(self):
            pass

    monkeypatch.setattr(command, "server_class", lambda: NoServer)
    code, err = run_main(["serve", "--adapters", f"a={tmp_path / 'a'}", "--port", "0", "--device", "cuda:99"], capsys)
    assert code == 2 and "--device=cuda:99" in err and "1 CUDA device" in err and not made, err


# ------------------------------------------------------------------- 14: a full disk during export or --out


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FillsUp:
    """A text file whose disk fills after `room` characters."""

    def __init__(self, path, *args, **kwargs):
        self.f, self.room = open(path, *args, **kwargs), 30  # noqa: SIM115

    def write(self, text):
        if len(text) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(text)
        return self.f.write(text)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_a_full_disk_during_classify_out_is_one_line_and_leaves_nothing_partial(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.jsonl"
    out.write_text("earlier\n")
    monkeypatch.setattr(files, "open", FillsUp, raising=False)
    code, err = _classify_out(tmp_path, capsys, out)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "is full" in lines[0] and "p.jsonl" in lines[0]
    assert out.read_text() == "earlier\n" and not list(tmp_path.glob(".p.jsonl*"))


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing_partial(tmp_path, capsys, monkeypatch, fmt):
    from lora_dist import export

    def fills_up(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    _adapter(tmp_path)
    monkeypatch.setattr(export, "save_file", fills_up)
    code, err = run_main(["export", str(tmp_path / "a"), "--format", fmt, "--out", str(tmp_path / "x")], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "is full" in lines[0] and "MiB needed" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # neither x nor its temporary directory


# ------------------------------------------------------------------- 15: --max-queue's default


def test_serve_max_queue_default_is_teis_and_documented():
    from lora_dist.cli import _parser

    args = _parser().parse_args(["serve", "--adapters", "a=b"])
    assert args.max_queue == 512
    readme = (ROOT / "README.md").read_text()
    assert (
        "--max-queue" in readme
        and "512" in readme[readme.index("--max-queue") - 300 : readme.index("--max-queue") + 600]
    )


# ------------------------------------------------------------------- 17: SIGTERM during a sweep's final evaluation

STOP_IN_FINAL_EVALUATION = """
import os, signal, sys
from lora_dist.train.loop import Trainer
from lora_dist.cli import main

evaluate = Trainer.evaluate

def evaluate_and_stop(self, split, limit=None, plan=None, tick=None):
    if plan is not None and not os.environ.get("SIGNALLED"):  # the final evaluation's first split
        os.environ["SIGNALLED"] = "1"
        print("final evaluation started; SIGTERM", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(self, split, limit, plan, tick)

Trainer.evaluate = evaluate_and_stop
sys.exit(main(sys.argv[1:]))
"""


def test_a_sweep_stopped_during_its_final_evaluation_exits_and_resumes(tmp_path):
    """SIGTERM (a real signal) arrives as the sweep's first adapter starts its final evaluation: the sweep stops
    there, evaluates no further adapter, writes no result, exits 0 with a checkpoint; resume=auto then finishes
    the evaluations. Before, the sweep evaluated every adapter to its end after the signal."""
    _sweep("  grid: {lora.rank: [2, 4]}\n")(tmp_path)
    argv = [
        "sweep",
        "--config",
        str(tmp_path / "s.yaml"),
        f"output_dir={tmp_path / 'out'}",
        small_data(tmp_path),
        "train.max_steps=2",
        "train.epochs=1",
        "train.eval_batches=1",
        "tracking.wandb.mode=disabled",
    ]
    script = tmp_path / "stop.py"
    script.write_text(STOP_IN_FINAL_EVALUATION)
    proc = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final evaluation started; SIGTERM" in proc.stdout and "stop signal received" in proc.stdout, proc.stdout
    out = tmp_path / "out"
    assert not list(out.glob("adapters/*/results.json")), "an adapter was evaluated after the signal"
    assert list((out / "checkpoints").glob("step-*"))
    done = subprocess.run(
        [sys.executable, "-m", "lora_dist", *argv, "train.resume=auto"],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.parent.name for p in out.glob("adapters/*/results.json")) == ["rank2", "rank4"]
    assert all(json.loads(p.read_text())["steps"] == 2 for p in out.glob("adapters/*/results.json"))
    _ = signal  # the signal is sent by the script
