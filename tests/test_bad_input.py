"""Bad input through the real CLI: every case exits non-zero with one `error: ...` line and no traceback.

Most cases fail while the config, the arguments or the files are read, so they run in-process through
`lora_dist.cli.main` (an exception escaping it fails the test, as a traceback would); a few run as the
user runs them, in a subprocess. Config loading is also fuzzed (Hypothesis): random sections, keys and
values, as YAML and as key=value overrides, may only load or raise UserError.
"""

import json
import os
import string
import subprocess
import sys
from functools import partial

import pytest
import torch
import yaml
from conftest import ROOT, SMOKE, read_metrics, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_dist import UserError, load_config
from lora_dist.cli import main
from lora_dist.config import valid_keys
from lora_dist.train import checkpoint as ckpt
from lora_dist.train.tracking import lock_run_dir

sys.path.insert(0, str(ROOT / "bench"))
from fake_adapters import make_adapter  # noqa: E402


def _header_only(d):
    (d / "header.csv").write_text("text,label\n")


def _file(d):
    (d / "afile").write_text("not a directory\n")


def _latin1_config(d):
    (d / "latin.yaml").write_bytes("output_dir: caf\u00e9\n".encode("latin-1"))


def _list_config(d):
    (d / "list.yaml").write_text("- 1\n- 2\n")


def _csv_without_label(d):
    (d / "nolabel.csv").write_bytes(b"text,label\nhello,ham\nbuy,\n")


def _latin1_csv(d):
    (d / "latin.csv").write_bytes("text,label\ncaf\u00e9,ham\n".encode("latin-1"))


def _empty_csv(d):
    (d / "empty.csv").write_bytes(b"")


def _latin1_text(d):
    (d / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1"))


def _csv_without_text(d):
    (d / "x.csv").write_text("id,body\n1,hi\n")


def _file_empty(d):
    (d / "empty.txt").write_text("\n")


def _empty_dir(d):
    (d / "empty").mkdir()


def _bad_json_results(d):
    (d / "run").mkdir()
    (d / "run" / "results.json").write_text("{oops")


def _sweep(section: str):
    """A maker of `s.yaml`: the smoke config with this sweep: section."""

    def make(d):
        (d / "s.yaml").write_text(SMOKE.read_text() + "sweep:\n" + section)

    return make


def _nul_label(d):
    (d / "nul.csv").write_bytes(
        b"text,label\n" + b"".join(b"hi %d,ham\nwin %d,spam\n" % (i, i) for i in range(9)) + b"buy,spam\x00\n"
    )


def _token_not_ascii(d):
    (d / "token").write_text("s\u00e9cret\n")  # no Authorization header could match it


def _adapter(d, config=None, lora=None, text=None, tensors=None):
    """A random tiny adapter in {d}/a, its description edited (`config`, `lora`: keys to set; `text`: the whole
    file) or its tensors (`tensors(dict)`), as a tampered or hand-made adapter would be."""
    a = make_adapter(d / "a", seed=1, rank=4) / "adapter"
    f = a / "adapter_config.json"
    desc = json.loads(f.read_text())
    desc.update(config or {})
    desc["lora"].update(lora or {})
    f.write_text(text if text is not None else json.dumps(desc))
    if tensors:
        t = load_file(str(a / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(a / "adapter_model.safetensors"))


def _nan(t):
    t["head.lora.B"][0, 0] = float("nan")


def _int64(t):
    t["head.lora.B"] = t["head.lora.B"].long()


def _peft_pickle_only(d):
    (d / "peft").mkdir()
    (d / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (d / "peft" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")


TRAIN = ["train", "--config", str(SMOKE), "output_dir={d}/out"]
SWEEP = ["sweep", "--config", "{d}/s.yaml", "output_dir={d}/out"]
CLASSIFY = ["classify", "--adapter", "{d}/a", "win a prize " * 400]
SERVE = ["serve", "--adapters", "spam={d}"]  # 1,200 tokens: longer than tiny's context

# (id, files to make, argv, words the error line must hold); {d} is the test's temporary directory.
CASES = [
    (
        "train-output-dir-cannot-be-created",
        None,
        ["train", "--config", str(SMOKE), "output_dir=/proc/lora-dist-x/y"],
        "cannot be created",
    ),
    ("train-output-dir-is-a-file", _file, ["train", "--config", str(SMOKE), "output_dir={d}/afile"], "is a file"),
    ("train-header-only-csv", _header_only, [*TRAIN, "data.source={d}/header.csv"], "header but no messages"),
    ("train-missing-data", None, [*TRAIN, "data.source={d}/nope.csv"], "not found"),
    ("train-csv-row-without-label", _csv_without_label, [*TRAIN, "data.source={d}/nolabel.csv"], "without a label"),
    ("train-csv-not-utf8", _latin1_csv, [*TRAIN, "data.source={d}/latin.csv"], "not UTF-8"),
    ("train-empty-csv", _empty_csv, [*TRAIN, "data.source={d}/empty.csv"], "is empty"),
    ("train-batch-larger-than-the-data", None, [*TRAIN, "train.batch_size=2000"], "fewer than one global batch"),
    ("train-missing-config", None, ["train", "--config", "{d}/nope.yaml"], "not found"),
    ("train-config-is-a-directory", None, ["train", "--config", "{d}"], "not found"),
    ("train-config-not-utf8", _latin1_config, ["train", "--config", "{d}/latin.yaml"], "not UTF-8"),
    ("train-config-not-a-mapping", _list_config, ["train", "--config", "{d}/list.yaml"], "must hold a mapping"),
    ("train-override-without-equals", None, [*TRAIN, "train.epochs"], "not key=value"),
    ("train-override-bad-type", None, [*TRAIN, "train.epochs=three"], "train.epochs must be int"),
    ("train-override-unknown-key", None, [*TRAIN, "train.bogus=1"], "unknown config key"),
    ("train-override-into-a-value", None, [*TRAIN, "train.epochs.x=1"], "epochs is not a section"),
    ("train-section-as-value", None, [*TRAIN, "train=3"], "must be a mapping"),
    ("train-bad-literal", None, [*TRAIN, "model.pooling=max"], "model.pooling must be one of"),
    ("train-nan-lr", None, [*TRAIN, "train.lr=.nan"], "train.lr must be a finite number"),
    ("train-unknown-model", None, [*TRAIN, "model.name=gpt5"], "unknown model name"),
    ("train-missing-weights", None, [*TRAIN, "model.weights={d}/no-such-dir"], "weights directory"),
    ("train-fp16-on-cpu", None, [*TRAIN, "train.precision=fp16", "train.device=cpu"], "fp16 needs a GPU"),
    (
        "train-missing-deepspeed-config",
        None,
        [*TRAIN, "dist.strategy=deepspeed", "dist.deepspeed_config={d}/ds.json"],
        "not found",
    ),
    ("train-no-config", None, ["train"], "required: --config"),
    (
        "params-header-only-csv",
        _header_only,
        ["params", "--config", str(SMOKE), "data.source={d}/header.csv"],
        "header but no messages",
    ),
    ("params-bad-override", None, ["params", "--config", str(SMOKE), "lora.rank=0"], "lora.rank must be > 0"),
    ("report-missing-run", None, ["report", "{d}/nope"], "not found"),
    ("report-a-file", _file, ["report", "{d}/afile"], "not found"),
    ("report-not-a-run", _empty_dir, ["report", "{d}/empty"], "not a finished lora-dist run"),
    ("report-bad-results-json", _bad_json_results, ["report", "{d}/run"], "not valid JSON"),
    ("eval-missing-run", None, ["eval", "{d}/nope"], "not found"),
    ("eval-not-a-run", _empty_dir, ["eval", "{d}/empty"], "not a lora-dist adapter"),
    ("eval-bad-split", None, ["eval", "{d}", "--split", "dev"], "invalid choice"),
    ("classify-missing-adapter", None, ["classify", "--adapter", "{d}/nope", "hi"], "not found"),
    ("classify-not-an-adapter", _empty_dir, ["classify", "--adapter", "{d}/empty", "hi"], "not a lora-dist adapter"),
    # {run}: the session's smoke run (conftest.py), a real adapter
    (
        "classify-file-not-utf8",
        _latin1_text,
        ["classify", "--adapter", "{run}", "--file", "{d}/latin.txt"],
        "not UTF-8",
    ),
    (
        "classify-csv-without-text",
        _csv_without_text,
        ["classify", "--adapter", "{run}", "--file", "{d}/x.csv"],
        "no column 'text'",
    ),
    (
        "classify-missing-file",
        None,
        ["classify", "--adapter", "{run}", "--file", "{d}/missing.txt"],
        "missing.txt not found",
    ),
    ("classify-nothing", None, ["classify", "--adapter", "{run}"], "nothing to classify"),
    ("classify-batch-size-0", None, ["classify", "--adapter", "{run}", "hi", "--batch-size", "0"], "must be >= 1"),
    (
        "classify-out-is-a-directory",
        _empty_dir,
        ["classify", "--adapter", "{run}", "hi", "--out", "{d}/empty"],
        "is a directory",
    ),
    ("adapter-info-missing", None, ["adapter", "info", "{d}/nope"], "not found"),
    ("adapter-info-a-file", _file, ["adapter", "info", "{d}/afile"], "not a lora-dist adapter"),
    ("adapter-no-action", None, ["adapter"], "required"),
    ("export-bad-format", None, ["export", "{d}", "--format", "onnx", "--out", "{d}/x"], "invalid choice"),
    ("export-missing", None, ["export", "{d}/nope", "--format", "peft", "--out", "{d}/x"], "not found"),
    ("serve-no-adapters", None, ["serve"], "--adapters NAME=PATH,... or --adapters-dir DIR"),
    ("serve-adapter-not-name-path", None, ["serve", "--adapters", "spam"], "not NAME=PATH"),
    ("serve-adapter-named-twice", None, ["serve", "--adapters", "a={d},a={d}"], "given twice"),
    ("serve-missing-adapter", None, ["serve", "--adapters", "spam={d}/nope"], "not found"),
    ("serve-not-an-adapter", _empty_dir, ["serve", "--adapters", "spam={d}/empty"], "not a lora-dist adapter"),
    ("serve-max-batch-0", None, ["serve", "--adapters", "spam={d}", "--max-batch", "0"], "--max-batch must be >= 1"),
    ("serve-bad-port", None, ["serve", "--adapters", "spam={d}", "--port", "http"], "invalid int value"),
    (
        "serve-missing-token-file",
        None,
        ["serve", "--adapters", "spam={d}", "--token-file", "{d}/nope"],
        "cannot be read",
    ),
    # every numeric flag of serve is checked (issue 22): not finite, negative, past a port's range
    *[
        (f"serve-{flag.strip('-')}-{value}", None, [*SERVE, flag, value], words)
        for flag, value, words in (
            ("--max-wait-ms", "nan", "--max-wait-ms must be a finite number"),
            ("--max-wait-ms", "inf", "--max-wait-ms must be a finite number"),
            ("--threads", "-3", "--threads must be >= 1"),
            ("--port", "99999", "--port must be <= 65535"),
            ("--read-timeout-s", "0", "--read-timeout-s must be >= 0.001"),
            ("--max-queue", "0", "--max-queue must be >= 1"),
            ("--max-connections", "0", "--max-connections must be >= 1"),
            ("--shutdown-timeout-s", "nan", "--shutdown-timeout-s must be a finite number"),
        )
    ],
    ("serve-token-not-ascii", _token_not_ascii, [*SERVE, "--token-file", "{d}/token"], "printable ASCII"),
    (
        "serve-empty-token-file",
        _file_empty,
        ["serve", "--adapters", "spam={d}", "--token-file", "{d}/empty.txt"],
        "is empty",
    ),
    ("train-label-with-a-nul-byte", _nul_label, [*TRAIN, "data.source={d}/nul.csv"], "'spam\\x00' at row 19"),
    # adapters edited by hand, or damaged (issue 22): each is one error line naming the file and the field
    ("classify-max-length-a-string", partial(_adapter, config={"max_length": "512"}), CLASSIFY, "max_length must be"),
    ("classify-max-length-1e12", partial(_adapter, config={"max_length": 1e12}), CLASSIFY, "max_length must be"),
    (
        "classify-max-length-past-the-context",
        partial(_adapter, config={"max_length": 10**12}),
        CLASSIFY,
        "context of 256",
    ),
    ("classify-max-length-negative", partial(_adapter, config={"max_length": -1}), CLASSIFY, "max_length must be"),
    ("adapter-info-scale-a-string", partial(_adapter, lora={"scale": "2"}), ["adapter", "info", "{d}/a"], "lora.scale"),
    (
        "classify-config-nested-deep",
        partial(_adapter, text="[" * 100_000 + "]" * 100_000),
        CLASSIFY,
        "nested too deeply",
    ),
    ("classify-config-null", partial(_adapter, text="null"), CLASSIFY, "not a lora-dist adapter description"),
    ("classify-rank-1e9", partial(_adapter, lora={"rank": 10**9}), CLASSIFY, "the description says rank 1000000000"),
    ("serve-rank-1e9", partial(_adapter, lora={"rank": 10**9}), ["serve", "--adapters", "a={d}/a"], "says rank"),
    ("classify-pad-to-1e9", partial(_adapter, config={"pad_to": 10**9}), CLASSIFY, "pad_to must be"),
    ("classify-nan-tensor", partial(_adapter, tensors=_nan), CLASSIFY, "NaN"),
    ("classify-int64-tensor", partial(_adapter, tensors=_int64), CLASSIFY, "is int64"),
    ("classify-duplicate-labels", partial(_adapter, config={"labels": ["ham", "ham"]}), CLASSIFY, "distinct"),
    ("classify-unknown-tokenizer", partial(_adapter, config={"tokenizer": "llama"}), CLASSIFY, "tokenizer 'llama'"),
    (
        "serve-max-length-past-the-context",
        partial(_adapter, config={"max_length": 4096}),
        ["serve", "--adapters", "a={d}/a"],
        "context of 256",
    ),
    (
        "adapter-info-peft-pickle-only",
        _peft_pickle_only,
        ["adapter", "info", "{d}/peft"],
        "adapter_model.bin, a pickle",
    ),
    ("no-command", None, [], "required"),
    ("unknown-command", None, ["fly"], "invalid choice"),
]
# A sweep config (the smoke config and this sweep: section) and its one error line; (section, extra overrides).
SWEEP_CASES = {
    "sweep-empty-grid": ("grid: {}", "sweep.grid is empty"),
    "sweep-grid-key-without-values": ("grid: {lora.rank: []}", "sweep.grid lora.rank has no values"),
    "sweep-no-adapters": ("adapters: []", "the sweep has no adapters (N = 0)"),
    "sweep-empty-section": ("{}", "the sweep has no adapters (N = 0)"),
    "sweep-base-changing-key": (
        "grid: {model.name: [tiny, gpt2-small]}",
        "sets model.name, which changes the frozen base",
    ),
    "sweep-pooling": ("adapters: [{model.pooling: last}]", "sets model.pooling, which changes the frozen base"),
    "sweep-precision": ("grid: {train.precision: [bf16]}", "sets train.precision, which changes"),
    "sweep-job-key": ("grid: {train.grad_accum: [1, 2]}", "one setting for the whole sweep job"),
    "sweep-duplicate-names": (
        "adapters: [{name: a, lora.rank: 4}, {name: a}]",
        "two adapters of the sweep are named 'a'",
    ),
    "sweep-same-settings-twice": ("grid: {lora.rank: [4]}\n  adapters: [{lora.rank: 4}]", "named 'rank4'"),
    "sweep-bad-name": ("adapters: [{name: 'a b'}]", "sweep adapter name 'a b' must be"),
    "sweep-unknown-key": ("adapters: [{name: a, lora.rnk: 4}]", "sweep adapter 'a': unknown config key"),
    "sweep-bad-value": ("grid: {lora.rank: [0, 4]}", "lora.rank must be > 0"),
    "sweep-adapter-not-a-mapping": ("adapters: [3]", "sweep.adapters must be a mapping; got 3"),
    "sweep-grid-not-a-mapping": ("grid: [1, 2]", "sweep.grid must be a mapping"),
    "sweep-concurrent-0": ("grid: {lora.rank: [4]}\n  max_concurrent: 0", "sweep.max_concurrent must be >= 1"),
    "sweep-unknown-sweep-key": ("grids: {}", "unknown config key 'sweep.grids'"),
    "sweep-seed-over-a-random-base": ("grid: {train.seed: [1, 2]}", "with model.weights=random train.seed also draws"),
    "sweep-missing-data": ("adapters: [{name: a, data.source: nope.csv}]", "sweep adapter 'a': data file"),
}
CASES += [(name, _sweep(f"  {section}\n"), SWEEP, words) for name, (section, words) in SWEEP_CASES.items()]
ONE_ADAPTER = _sweep("  grid: {lora.rank: [4]}\n")
CASES += [
    (
        "sweep-deepspeed",
        ONE_ADAPTER,
        [*SWEEP, "dist.strategy=deepspeed"],
        "a sweep cannot run with dist.strategy=deepspeed",
    ),
    ("sweep-model-dropout", ONE_ADAPTER, [*SWEEP, "model.dropout=0.1"], "model.dropout=0.1 drops"),
    ("sweep-without-section", None, ["sweep", "--config", str(SMOKE)], "has no sweep: section"),
    ("train-a-sweep-config", ONE_ADAPTER, ["train", "--config", "{d}/s.yaml"], "lora-dist sweep"),
    ("params-a-sweep-config", ONE_ADAPTER, ["params", "--config", "{d}/s.yaml"], "lora-dist sweep"),
]
if not torch.cuda.is_available():
    CASES.append(("train-cuda-without-a-gpu", None, [*TRAIN, "train.device=cuda"], "no CUDA device"))


def run_main(argv, capsys) -> tuple[int, str]:
    """`lora-dist ARGV` in this process: (exit status, stderr). argparse exits through SystemExit."""
    code, _, err = run_main_out(argv, capsys)
    return code, err


def run_main_out(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lora-dist ARGV` in this process."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("make,argv,words", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_one_error_line(tmp_path, capsys, request, make, argv, words):
    if make:
        make(tmp_path)
    run = request.getfixturevalue("smoke_run")[0] if any("{run}" in a for a in argv) else None
    code, err = run_main([a.format(d=tmp_path, run=run) for a in argv], capsys)
    assert code not in (0, None), err
    errors = [line for line in err.splitlines() if line.startswith("error: ") or line.startswith("lora-dist")]
    assert len(errors) == 1 and "error: " in errors[0] and words in errors[0], err
    assert "Traceback" not in err


def test_nothing_already_written_is_lost(tmp_path, capsys):
    """A refused run leaves the directory it refused as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"test_accuracy": 0.9}')
    (out / "notes.txt").write_text("mine")
    code, err = run_main(["train", "--config", str(SMOKE), f"output_dir={out}"], capsys)
    assert code == 2 and "is not a lora-dist run" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json"]
    assert (out / "results.json").read_text() == '{"test_accuracy": 0.9}'


@pytest.mark.parametrize(
    "argv,words",
    [
        (["train", "--config", str(SMOKE), "output_dir=/proc/lora-dist-x/y"], "cannot be created"),
        (
            ["train", "--config", str(SMOKE), "output_dir={d}/out", "data.source={d}/header.csv"],
            "header but no messages",
        ),
        (["report", "{d}/nope"], "not found"),
    ],
    ids=["unwritable-output-dir", "header-only-csv", "report-missing-run"],
)
def test_bad_input_as_the_user_runs_it(tmp_path, argv, words):
    _header_only(tmp_path)
    proc = run_cli(*[a.format(d=tmp_path) for a in argv], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def small_data(d, n: int = 40) -> str:
    """80 messages of the SMS data (40 ham, 40 spam; `n` of each): a run on them ends (evaluation included) in
    seconds."""
    from lora_dist.data import read_sms, shipped_sms_path

    frame = read_sms(shipped_sms_path())
    frame = frame.groupby("label").head(n)
    frame[["text", "label"]].to_csv(d / "small.csv", index=False)
    return f"data.source={d / 'small.csv'}"


def test_a_run_that_failed_before_its_first_step_does_not_block_its_rerun(tmp_path, capsys):
    """Missing weights stop the run after it wrote its start files; the rerun the message suggests, into the
    same output_dir, trains."""
    out = tmp_path / "out"
    args = [
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        small_data(tmp_path),
        "train.max_steps=2",
        "train.epochs=1",
        "train.eval_batches=1",
        "tracking.wandb.mode=disabled",
    ]
    code, err = run_main([*args, f"model.weights={tmp_path}/nonexistent"], capsys)
    assert code == 2 and "weights directory" in err, err
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()  # what the failed start left
    code, err = run_main([*args, "model.weights=random"], capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert [r.get("event") for r in read_metrics(out)].count("start") == 1  # the failed start's records are gone
    # A run with a step is a run: its rerun is refused as before.
    code, err = run_main([*args, "model.weights=random"], capsys)
    assert code == 2 and "already holds a training run" in err


def test_deepspeed_in_a_plain_process_is_a_world_of_one(tmp_path, capsys, monkeypatch):
    """`lora-dist train ... dist.strategy=deepspeed` without a launcher trains as rank 0 of 1, as torchrun's
    single worker would, and leaves this process's environment as it found it. On the CPU it compiles
    nothing: DeepSpeed's shared-memory inference kernel (minutes of gcc) is not built."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    out = tmp_path / "out"
    before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    code, err = run_main(
        [
            "train",
            "--config",
            str(SMOKE),
            f"output_dir={out}",
            small_data(tmp_path),
            "dist.strategy=deepspeed",
            "dist.deepspeed_config=configs/deepspeed/zero2.json",
            "train.max_steps=3",
            "train.epochs=1",
            "train.eval_batches=1",
            "tracking.wandb.mode=disabled",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["strategy"] == "deepspeed" and r["world_size"] == 1 and r["steps"] == 3
    losses = [m["train_loss_step"] for m in read_metrics(out) if "train_loss_step" in m]
    assert len(losses) == 3 and all(x == x for x in losses)
    assert {k: os.environ.get(k) for k in before} == before
    assert not (tmp_path / "extensions").exists()  # nothing compiled


# -------------------------------------------------------------- training: lock, data, disk (issue 22)


def quick_run(d, *extra: str) -> list[str]:
    """`lora-dist train` on the small data into {d}/out: a few steps, seconds."""
    return [
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={d / 'out'}",
        *(extra if any(e.startswith("data.source=") for e in extra) else (small_data(d), *extra)),
        "train.epochs=1",
        "train.eval_batches=1",
        "tracking.wandb.mode=disabled",
    ]


def test_a_training_holds_its_output_dirs_lock_and_a_second_is_refused(tmp_path, capsys, monkeypatch):
    """Another process holding output_dir's lock (as a running training does) makes a second training into it
    one error line that writes nothing; once that process is killed (-9), the kernel has released the lock and
    training runs, holding the lock itself until it ends."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        code, err = run_main(quick_run(tmp_path, "train.max_steps=1"), capsys)
        assert code == 2 and "is in use by another lora-dist training" in err and "Traceback" not in err, err
        assert list(out.iterdir()) == []  # refused before writing anything
    finally:
        holder.kill()
        holder.wait(60)
    from lora_dist.train.loop import Trainer

    held = []
    finish = Trainer.finish

    def finish_and_probe(self, wall):
        with pytest.raises(UserError, match="in use"):  # a second opener, while the run finishes
            lock_run_dir(out)
        held.append(True)
        return finish(self, wall)

    monkeypatch.setattr(Trainer, "finish", finish_and_probe)
    code, err = run_main(quick_run(tmp_path, "train.max_steps=1"), capsys)
    assert code == 0 and held == [True], err
    os.close(lock_run_dir(out))  # released when the run ended
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no lock file left behind


def test_resume_on_other_data_is_refused_unless_asked_for(tmp_path, capsys):
    """The run records its splits' SHA-256; resume=auto after the data file changed is one error line naming
    train.resume_other_data, which then continues on the new data. A checkpoint past the run's steps is refused."""
    from lora_dist.config import load_config
    from lora_dist.token_cache import run_data

    out = tmp_path / "out"
    code, err = run_main(quick_run(tmp_path, "train.max_steps=1"), capsys)
    assert code == 0, err
    data_cfg = load_config(SMOKE, [small_data(tmp_path)]).data
    recorded = run_data(data_cfg, 256, say=lambda *_: None).fingerprint  # the splits' rows in the cache
    (ckpt_dir,) = (out / "checkpoints").iterdir()
    assert json.loads((ckpt_dir / "state.json").read_text())["data_sha256"] == recorded
    assert json.loads((out / "results.json").read_text())["data_sha256"] == recorded
    assert [r["data_sha256"] for r in read_metrics(out) if r.get("event") == "start"] == [recorded]

    other = small_data(tmp_path, n=30)  # the data file replaced: 60 messages instead of 80
    code, err = run_main(quick_run(tmp_path, other, "train.max_steps=2", "train.resume=auto"), capsys)
    assert code == 2 and "was trained on other data" in err and "train.resume_other_data=true" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out_text, err = run_main_out(
        quick_run(tmp_path, other, "train.max_steps=2", "train.resume=auto", "train.resume_other_data=true"), capsys
    )
    assert code == 0 and "continuing on this data" in out_text, err
    assert json.loads((out / "results.json").read_text())["steps"] == 2

    newest = sorted((out / "checkpoints").iterdir())[-1]
    state = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps({**state, "step": 4}))  # a step a longer run would reach
    code, err = run_main(quick_run(tmp_path, other, "train.max_steps=3", "train.resume=auto"), capsys)
    assert code == 2 and "past this run's 3 steps" in err and "Traceback" not in err, err


def test_a_full_disk_is_one_error_line_and_earlier_checkpoints_resume(tmp_path, capsys, monkeypatch):
    """The disk fills while the step-2 checkpoint is written (safetensors' own error, as on a full tmpfs): one
    error line naming the disk, its free space and the size needed; no staging directory is left, step 1's
    checkpoint is intact, and resume=auto continues from it."""
    real = ckpt.save_file

    def fills_up(tensors, path, *args, **kwargs):
        if "step-00000002" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    args = quick_run(tmp_path, "train.max_steps=3", "train.checkpoint_every=1")
    code, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"the disk holding {tmp_path / 'out' / 'checkpoints'}" in lines[0] and "MiB free" in lines[0], lines
    assert "needed to write checkpoint step-00000002" in lines[0] and "train.resume=auto" in lines[0], lines
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-00000001"]
    ckpt.verify(tmp_path / "out" / "checkpoints" / "step-00000001")
    monkeypatch.undo()
    code, out_text, err = run_main_out([*args, "train.resume=auto"], capsys)
    assert code == 0 and "resumed from" in out_text and "step-00000001" in out_text, err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 3


def test_a_full_disk_while_saving_the_adapter_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from lora_dist import adapter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    spec = json.loads((make_adapter(tmp_path / "a", seed=1) / "adapter" / "adapter_config.json").read_text())
    spec = adapter.AdapterSpec.from_json(spec, "test")
    monkeypatch.setattr(adapter, "save_file", full)
    with pytest.raises(UserError, match=r"is full: .* MiB free, .* MiB needed to write adapter_model.safetensors"):
        adapter.save(tmp_path / "run", spec, {"head.weight": torch.ones(2, 128)})
    assert list((tmp_path / "run" / "adapter").iterdir()) == []


def test_missing_deepspeed_is_one_error_line_that_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """DeepSpeed is checked before the process group, the data or the model: one line, at once."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ModuleNotFoundError
    argv = ["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'out'}", "dist.strategy=deepspeed"]
    code, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: dist.strategy=deepspeed needs DeepSpeed, and it is not installed")
    assert "pip install -e '.[deepspeed]'" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "splits").exists()  # nothing was prepared


# ------------------------------------------------------------------------------ config loading, fuzzed

KEYS = valid_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS} | {"bogus"})
names = st.sampled_from([k.rsplit(".", 1)[-1] for k in KEYS] + ["x", "", "1"]) | st.text(
    string.ascii_lowercase + "_.", max_size=8
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "auto",
            "none",
            "ddp",
            "cpu",
            "last",
            "fp32",
            "random",
            "tiny",
            "sms",
            "5e-5",
            "nan",
            "inf",
            "[a, b]",
            "{}",
            "~",
        ]
    )
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3), max_leaves=6
)
configs = st.dictionaries(
    st.sampled_from(SECTIONS) | names, st.dictionaries(names, values, max_size=4) | values, max_size=4
)
override_keys = st.sampled_from(KEYS) | st.builds(lambda s, n: f"{s}.{n}", st.sampled_from(SECTIONS), names) | names
overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", override_keys, st.text(max_size=12) | scalars.map(str)) | st.text(max_size=10),
    max_size=4,
)


def _loads_or_user_error(path, items) -> None:
    try:
        load_config(path, items)
    except UserError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=configs, items=overrides)
def test_config_loading_only_succeeds_or_raises_user_error(tmp_path, raw, items):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _loads_or_user_error(path, items)
    # The same sections and values given only as overrides, on the defaults.
    flat = [
        f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for s, sec in raw.items()
        if isinstance(sec, dict)
        for k, v in sec.items()
    ]
    _loads_or_user_error(None, flat + items)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_any_config_file_text_loads_or_raises_user_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _loads_or_user_error(path, [])
