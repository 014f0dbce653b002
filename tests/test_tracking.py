"""W&B from rank 0 (offline, never the network), read back with wandb's own reader; local metrics.

The `.wandb` files are read with `wandb leet inspect --json` (wandb 0.31 has no Python reader left).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE, cli_env, read_metrics, run_cli, torchrun

from lora_dist.config import load_config
from lora_dist.errors import UserError
from lora_dist.train import wandb_sink

SECRET = "0123456789abcdef0123456789abcdef01234567"  # a fake WANDB_API_KEY that must never be written down


def wandb_env(tmp: Path, **extra) -> dict:
    """No real account, no network, W&B's own caches under tmp, no job ids from the outer shell."""
    env = cli_env(
        WANDB_API_KEY=SECRET,
        WANDB_CACHE_DIR=tmp / "wb-cache",
        WANDB_CONFIG_DIR=tmp / "wb-config",
        WANDB_ARTIFACT_DIR=tmp / "wb-artifacts",
        **extra,
    )
    for k in ("WANDB_RUN_GROUP", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WANDB_DIR", "WANDB_DATA_DIR"):
        env.pop(k, None)
    return env


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("*run-*"))


def wandb_records(path: Path) -> list[dict]:
    """Every record of the run directory's .wandb file, as wandb itself decodes it."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def summary(records: list[dict]) -> dict:
    out = {}
    for s in of_type(records, "summary"):
        out.update(s.get("update", {}))
    return out


# ------------------------------------------------------------------------------- 2 processes, offline


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb-ddp")
    out = tmp / "run"
    proc = torchrun(
        2,
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        "train.epochs=1",
        "tracking.wandb.mode=offline",
        "tracking.wandb.tags=[smoke,ddp]",
        extra=("--rdzv-id=job42",),
        env=wandb_env(tmp),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = wandb_runs(out)
    return out, proc, runs, wandb_records(runs[0]) if runs else []


@pytest.mark.slow
def test_wandb_says_where_the_run_goes_and_nothing_more(ddp_run):
    """A few lines when the run starts; no history and summary tables (about 30 lines) when it ends."""
    _, proc, _, _ = ddp_run
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("wandb:")]
    assert 1 <= len(said) <= 4, said
    assert any("saved locally" in line for line in said) and not any("Run summary" in line for line in said), said


@pytest.mark.slow
def test_two_processes_make_one_wandb_run(ddp_run):
    out, proc, runs, records = ddp_run
    assert len(runs) == 1, runs
    run_id = (out / "wandb_run_id").read_text().strip()
    assert runs[0].name.startswith("offline-run-") and runs[0].name.endswith(run_id)
    assert len(list(runs[0].glob("*.wandb"))) == 1
    (run,) = of_type(records, "run")
    assert run["run_id"] == run_id
    assert run["run_group"] == "job42"  # torchrun's run id
    assert set(run["tags"]) == {"smoke", "ddp"}
    assert proc.stdout.count("parameters:") == 1  # rank 1 prints nothing
    assert of_type(records, "exit")[-1].get("exit_code", 0) == 0


def test_wandb_run_holds_config_and_start_info(ddp_run):
    out, _, _, records = ddp_run
    config = of_type(records, "run")[0]["config"]["update"]
    assert config["model"]["name"] == "tiny" and config["lora"]["rank"] == 16 and config["train"]["epochs"] == 1
    info = config["run"]
    results = json.loads((out / "results.json").read_text())
    assert info["world_size"] == 2 and info["strategy"] == "ddp" and info["precision"] == "fp32"
    assert info["trainable_params"] == results["trainable_params"] and info["total_params"] == results["total_params"]
    assert info["model"] == "tiny" and info["lora_layers"] == 13
    assert "git_commit" in info


def test_wandb_history_has_step_and_eval_keys(ddp_run):
    out, _, _, records = ddp_run
    history = [h["item"] for h in of_type(records, "history")]
    assert [h["_step"] for h in history] == list(range(1, 131))
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/examples_per_s",
        "train/tokens_per_s",
        "train/allreduce_bytes",
        "epoch",
        "examples_seen",
    ):
        assert all(key in h for h in history), key
    assert history[5]["train/allreduce_bytes"] > 0  # DDP all-reduces the adapter gradients
    assert history[5]["train/examples_per_s"] > 0 and history[5]["train/tokens_per_s"] > 0
    evals = [h for h in history if "eval/val_loss" in h]
    # every eval_every steps, and after the last step
    assert [h["_step"] for h in evals] == [1, 51, 101, 130] and all("eval/train_loss" in h for h in evals)
    accs = [h for h in history if "eval/val_acc" in h]
    assert [h["_step"] for h in accs] == [130] and "eval/train_acc" in accs[0]


def test_wandb_run_ends_with_summary_and_adapter_artifact(ddp_run):
    out, _, _, records = ddp_run
    results = json.loads((out / "results.json").read_text())
    s = summary(records)
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        assert s[f"final/{prefix}_accuracy"] == pytest.approx(results[f"{prefix}_accuracy"])
        assert s[f"final/{prefix}_loss"] == pytest.approx(results[f"{prefix}_loss"])
        # Per class by label name, and macro: from the confusion matrix, counted by hand here.
        (hh, hs), (sh, ss) = results["confusion"][split]
        spam_p, spam_r = ss / (ss + hs), ss / (ss + sh)
        ham_p, ham_r = hh / (hh + sh), hh / (hh + hs)
        assert s[f"final/{prefix}_spam_precision"] == pytest.approx(spam_p)
        assert s[f"final/{prefix}_spam_recall"] == pytest.approx(spam_r)
        assert s[f"final/{prefix}_ham_f1"] == pytest.approx(2 * ham_p * ham_r / (ham_p + ham_r))
        assert s[f"final/{prefix}_macro_f1"] == pytest.approx(
            (2 * ham_p * ham_r / (ham_p + ham_r) + 2 * spam_p * spam_r / (spam_p + spam_r)) / 2
        )
    assert s["final/trainable_params"] == results["trainable_params"]
    (artifact,) = of_type(records, "artifact")
    assert artifact["type"] == "model"
    assert {c["path"] for c in artifact["manifest"]["contents"]} == {"adapter_model.safetensors", "adapter_config.json"}
    assert all(
        c["local_path"].startswith(str(out / "wandb")) for c in artifact["manifest"]["contents"]
    )  # staged in the run


def test_no_secret_is_written(ddp_run):
    out, proc, _, _ = ddp_run
    assert SECRET not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------ resume and disabled


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "run"
    args = ("train", "--config", str(SMOKE), f"output_dir={out}", "train.epochs=1", "tracking.wandb.mode=offline")
    first = run_cli(*args, "train.max_steps=20", env=wandb_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    history_before = (out / "metrics.jsonl").read_text()
    second = run_cli(*args, "train.max_steps=40", "train.resume=auto", env=wandb_env(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    run_id = (out / "wandb_run_id").read_text().strip()
    runs = wandb_runs(out)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), runs  # two fragments of one run
    steps = [[h["item"]["_step"] for h in of_type(wandb_records(r), "history")] for r in runs]
    assert steps == [list(range(1, 21)), list(range(21, 41))]  # nothing logged twice, nothing overwritten

    assert (out / "metrics.jsonl").read_text().startswith(history_before)  # appended, never rewritten
    logged = [m["step"] for m in read_metrics(out) if "train_loss_step" in m]
    assert logged == list(range(1, 41))


@pytest.mark.slow  # 8-10 s: make test runs it, make test-fast not
def test_disabled_writes_no_wandb_files(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        "train.epochs=1",
        "train.max_steps=5",
        "tracking.wandb.mode=disabled",
        env=wandb_env(tmp_path, WANDB_MODE="offline"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "wandb").exists() and not (out / "wandb_run_id").exists()
    assert "wandb:" not in proc.stdout + proc.stderr  # the prefix of every line W&B prints
    start = [m for m in read_metrics(out) if m.get("event") == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 1 and start[0]["trainable_params"] > 0
    assert (out / "report.md").is_file()


# ------------------------------------------------------------------------------------- bad input


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(
        UserError, match=r"tracking\.wandb\.mode must be one of auto, online, offline, disabled; got 'cloud'"
    ):
        load_config(SMOKE, ["tracking.wandb.mode=cloud"])


def test_online_that_cannot_connect_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    for k, v in wandb_env(tmp_path).items():
        if k.startswith("WANDB_"):
            monkeypatch.setenv(k, v)
    real_init, modes = wandb.init, []

    def init(mode, **kw):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("Post https://api.wandb.ai/graphql: dial tcp: no route to host")
        return real_init(mode=mode, **kw)

    monkeypatch.setattr(wandb, "init", init)
    said = []
    cfg = load_config(SMOKE, [f"output_dir={tmp_path}", "tracking.wandb.mode=online"])
    sink = wandb_sink.open_wandb(cfg, tmp_path, {"world_size": 1}, say=said.append)
    assert sink is not None and modes == ["online", "offline"]
    assert len(said) == 1 and said[0].startswith("warning: W&B online could not start") and "wandb sync" in said[0]
    sink.log({"step": 1, "train_loss_step": 0.5})
    sink.close()
    runs = wandb_runs(tmp_path)
    assert len(runs) == 1 and runs[0].name.startswith("offline-run-"), runs


class BrokenRun:
    step = 0

    def log(self, *a, **k):
        raise OSError("No space left on device")

    def finish(self, **k):
        pass


def test_a_failing_wandb_warns_once_and_training_goes_on(tmp_path):
    said = []
    sink = wandb_sink.WandbSink(BrokenRun(), tmp_path, say=said.append)
    for step in (1, 2, 3):
        sink.log({"step": step, "train_loss_step": 0.1})  # never raises
    sink.close()
    assert len(said) == 1 and "No space left on device" in said[0]


# ------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    "mode, env, installed, expected",
    [
        ("auto", {}, True, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, True, "disabled"),
        ("auto", {"WANDB_MODE": "online"}, True, "online"),
        ("auto", {"WANDB_MODE": "dryrun"}, True, "offline"),
        ("auto", {}, False, "disabled"),
        ("online", {"WANDB_MODE": "offline"}, True, "online"),  # the config wins over the environment
        ("offline", {}, False, "disabled"),
        ("disabled", {}, True, "disabled"),
    ],
)
def test_resolve_mode(monkeypatch, mode, env, installed, expected):
    monkeypatch.setattr(wandb_sink, "_wandb", lambda: object() if installed else None)
    resolved, note = wandb_sink.resolve_mode(mode, env)
    assert resolved == expected
    assert (note is not None) == (mode in ("online", "offline") and not installed)


@pytest.mark.parametrize(
    "env, group",
    [
        ({}, None),
        ({"TORCHELASTIC_RUN_ID": "none"}, None),
        ({"TORCHELASTIC_RUN_ID": "abc"}, "abc"),
        ({"TORCHELASTIC_RUN_ID": "abc", "SLURM_JOB_ID": "1234"}, "1234"),
        ({"SLURM_JOB_ID": "1234", "WANDB_RUN_GROUP": "sweep-7"}, "sweep-7"),
    ],
)
def test_default_group(env, group):
    assert wandb_sink.default_group(env) == group


def test_run_id_is_kept_only_when_resuming(tmp_path):
    first = wandb_sink.run_id(tmp_path, resume=False)
    assert wandb_sink.run_id(tmp_path, resume=True) == first
    assert wandb_sink.run_id(tmp_path, resume=False) != first


def test_records_become_wandb_history():
    record = {
        "time": 1.0,
        "step": 3,
        "epoch": 0,
        "examples_seen": 24,
        "train_loss_step": 0.5,
        "lr": 1e-3,
        "grad_norm": 2.0,
        "allreduce_bytes": 10,
        "examples_per_s": 100.0,
        "tokens_per_s": 900.0,
        "val_acc": 0.9,
        "path": "not a number",
    }
    assert wandb_sink.wandb_record(record) == {
        "epoch": 0,
        "examples_seen": 24,
        "train/loss": 0.5,
        "train/lr": 1e-3,
        "train/grad_norm": 2.0,
        "train/allreduce_bytes": 10,
        "train/examples_per_s": 100.0,
        "train/tokens_per_s": 900.0,
        "eval/val_acc": 0.9,
    }


class _Stream:
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_a_long_task_shows_a_bar_on_a_terminal_and_lines_on_a_pipe():
    from lora_dist.train.tracking import Progress

    pipe = _Stream(tty=False)
    tick = Progress(pipe).task("final evaluation", 10)
    for _ in range(10):
        tick()
    assert pipe.text.splitlines() == [f"final evaluation: {n}/10 batches" for n in (3, 5, 8, 10)]

    term = _Stream(tty=True)
    bar = Progress(term)
    tick = bar.task("final evaluation", 10)
    for _ in range(10):
        tick()
    assert term.text.startswith("\rfinal evaluation:") and bar.bar.n == 10  # tqdm redraws at most every 0.1 s
    bar.clear()
    assert bar.bar is None and term.text.count("\n") == 0  # the bar leaves no line behind


def test_other_ranks_output_has_runoutputs_methods_and_quiets_only_while_open(tmp_path):
    """NullOutput writes out every public method of RunOutput (a misspelt call fails on every rank, not only on
    rank 0), and its quieting of warnings ends with the run."""
    import warnings

    from lora_dist.train.tracking import NullOutput, RunOutput, output_for

    public = {n for n in vars(RunOutput) if not n.startswith("_")}
    assert public <= {n for n in vars(NullOutput) if not n.startswith("_")}
    null = output_for(1, tmp_path, 10)
    assert isinstance(null, NullOutput)
    with pytest.raises(AttributeError):
        null.prnt("a typo")  # type: ignore[attr-defined]
    null.print("nothing"), null.log({"step": 1}), null.write_json("x.json", {})
    assert not (tmp_path / "x.json").exists()
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("quiet while open", stacklevel=1)
    assert seen == []
    null.close()
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("heard after close", stacklevel=1)
    assert [str(w.message) for w in seen] == ["heard after close"]


def test_cpu_threads_leave_busy_cores_alone():
    """torch's thread count, capped by the cores the load average leaves free (at least 1); the environment
    decides when it says (LORA_DIST_THREADS, OMP_NUM_THREADS)."""
    from lora_dist.device import cpu_threads

    assert cpu_threads({}, cores=2, load=0.2, default=2)[0] == 2  # an idle machine: torch's own count
    assert cpu_threads({}, cores=2, load=6.5, default=2)[0] == 1  # six others busy: one thread
    assert cpu_threads({}, cores=16, load=4.0, default=16)[0] == 12
    assert cpu_threads({}, cores=16, load=0.0, default=8)[0] == 8  # never more than torch's
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, cores=2, load=9, default=2)[0] is None  # torch follows it
    assert cpu_threads({"LORA_DIST_THREADS": "torch"}, cores=2, load=9, default=2)[0] is None
    assert cpu_threads({"LORA_DIST_THREADS": "4", "OMP_NUM_THREADS": "1"}, cores=2, load=0, default=2)[0] == 4
    with pytest.raises(UserError, match="LORA_DIST_THREADS='many' must be auto, torch or a number"):
        cpu_threads({"LORA_DIST_THREADS": "many"})


def test_the_command_line_sets_the_threads(tmp_path):
    """Every command runs with the threads cpu_threads picks; LORA_DIST_THREADS=1 is one."""
    code = "import torch, sys; from lora_dist.cli import main; main(sys.argv[1:]); print('threads', torch.get_num_threads())"
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "adapter", "info", str(tmp_path / "none")],
        env={**env, "LORA_DIST_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "adapter path" in proc.stderr and proc.stdout.splitlines()[-1] == "threads 1", proc.stderr[-2000:]
