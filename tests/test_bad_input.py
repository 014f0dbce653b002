"""Bad input through the real CLI: every case exits non-zero with one `error: ...` line and no traceback.

Most cases fail while the config, the arguments or the files are read, so they run in-process through
`lora_dist.cli.main` (an exception escaping it fails the test, as a traceback would); a few run as the
user runs them, in a subprocess. Config loading is also fuzzed (Hypothesis): random sections, keys and
values, as YAML and as key=value overrides, may only load or raise UserError.
"""

import json
import string

import pytest
import torch
import yaml
from conftest import SMOKE, read_metrics, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_dist import UserError, load_config
from lora_dist.cli import main
from lora_dist.config import valid_keys


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


TRAIN = ["train", "--config", str(SMOKE), "output_dir={d}/out"]
SWEEP = ["sweep", "--config", "{d}/s.yaml", "output_dir={d}/out"]

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
    ("train-nan-lr", None, [*TRAIN, "train.lr=.nan"], "train.lr must be > 0"),
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
    ("serve-no-adapters", None, ["serve"], "required: --adapters"),
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
    (
        "serve-empty-token-file",
        _file_empty,
        ["serve", "--adapters", "spam={d}", "--token-file", "{d}/empty.txt"],
        "is empty",
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
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


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
    assert code == 2 and "already holds a run" in err
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


def small_data(d) -> str:
    """80 messages of the SMS data (40 ham, 40 spam): a run on them ends (evaluation included) in seconds."""
    from lora_dist.data import read_sms, shipped_sms_path

    frame = read_sms(shipped_sms_path())
    frame = frame.groupby("label").head(40)
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
    assert code == 2 and "already holds a run" in err


def test_deepspeed_in_a_plain_process_is_a_world_of_one(tmp_path, capsys, monkeypatch):
    """`lora-dist train ... dist.strategy=deepspeed` without a launcher trains as rank 0 of 1, as torchrun's
    single worker would, and leaves this process's environment as it found it. On the CPU it compiles
    nothing: DeepSpeed's shared-memory inference kernel (minutes of gcc) is not built."""
    import os

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
