"""lora-dist sweep: every adapter equals the same config trained alone (1 and 2 processes), queued or not; kill -9
and resume give the same adapters; each adapter's directory is a run the other commands take; the summary."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest
import torch
import yaml
from conftest import ROOT, SMOKE, cli_env, lora_dist_cmd, read_metrics, run_cli, torchrun
from test_distributed import _wait_for_step, adapter, assert_same_adapter, results, step_losses

from lora_dist.train.sweep_config import load_sweep

# Mixed ranks, target sets, learning rates, schedules, clipping, batch sizes, data orders, label sets, padding
# rules, scalings, step counts and dropout, in one sweep.
ADAPTERS = [
    {"name": "r4", "lora.rank": 4, "train.lr": 1.0e-3},
    {
        "name": "ff-cosine",
        "lora.rank": 2,
        "lora.targets": ["*.ff.*"],
        "lora.train_head": False,
        "train.batch_size": 4,
        "train.schedule": "cosine",
        "train.warmup_steps": 3,
        "train.max_grad_norm": 0.5,
        "data.seed": 7,
    },
    {
        "name": "att-dropout",
        "lora.rank": 8,
        "lora.targets": ["*.att.*"],
        "lora.dropout": 0.1,
        "lora.head": False,
        "train.lr": 5.0e-4,
    },
    {
        "name": "three-labels",
        "data.source": "THREE",
        "data.padding": "longest",
        "lora.scaling": "rslora",
        "train.max_steps": 12,
    },
]
SHORT = ("train.max_steps=24", "train.eval_every=5", "train.eval_batches=2", "tracking.wandb.mode=disabled")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """(the config without its sweep section, the sweep config) over 200 SMS messages, and a 3-label file."""
    from lora_dist.data import read_sms, shipped_sms_path

    d = tmp_path_factory.mktemp("sweep-configs")
    frame = read_sms(shipped_sms_path())
    frame.groupby("label").head(100)[["text", "label"]].to_csv(d / "small.csv", index=False)
    three = frame.head(300).copy()
    three.loc[three.index % 3 == 0, "label"] = "other"
    three[["text", "label"]].to_csv(d / "three.csv", index=False)
    base = yaml.safe_load(SMOKE.read_text())
    base["data"]["source"] = str(d / "small.csv")
    base["train"]["epochs"] = 2
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    adapters = [{k: (str(d / "three.csv") if v == "THREE" else v) for k, v in a.items()} for a in ADAPTERS]
    (d / "sweep.yaml").write_text(yaml.safe_dump({**base, "sweep": {"adapters": adapters}}))
    return d / "base.yaml", d / "sweep.yaml"


def sweep_cli(config, out, *overrides, timeout=600):
    proc = run_cli("sweep", "--config", str(config), f"output_dir={out}", *SHORT, *overrides, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "sweep.json").read_text())["adapters"]


@pytest.fixture(scope="module")
def swept(configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    return out, sweep_cli(configs[1], out)


@pytest.fixture(scope="module")
def alone(configs, swept, tmp_path_factory):
    """Each adapter trained by `lora-dist train --config BASE OVERRIDES`, the overrides sweep.json gives."""
    d = tmp_path_factory.mktemp("alone")
    runs = {}
    for e in swept[1]:
        proc = run_cli("train", "--config", str(configs[0]), *e["overrides"], f"output_dir={d / e['name']}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[e["name"]] = d / e["name"]
    return runs


def assert_same_runs(a, b, rtol=1e-5):
    """Every step's loss within `rtol` relative, the adapter within `rtol` (0: bit for bit), the same accuracies."""
    la, lb = step_losses(a), step_losses(b)
    assert len(la) == len(lb) > 0
    if rtol == 0.0:
        assert la == lb
    else:
        assert max(abs(x - y) / abs(y) for x, y in zip(la, lb, strict=True)) <= rtol
    assert_same_adapter(adapter(a), adapter(b), rtol=rtol)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert results(a)[key] == results(b)[key], key


@pytest.mark.slow  # trains each adapter alone too (the `alone` fixture)
def test_each_adapter_equals_its_config_trained_alone(swept, alone):
    """The central claim: mixed ranks, targets, learning rates (and the rest) in one sweep, each adapter as if
    trained alone, every step's loss and the final adapter to 1e-5 (in practice bit for bit on one process)."""
    out, entries = swept
    assert [e["name"] for e in entries] and {e["name"] for e in entries} == {a["name"] for a in ADAPTERS}
    for e in entries:
        assert e["status"] == "done" and e["run_dir"] == str(out / "adapters" / e["name"])
        assert_same_runs(out / "adapters" / e["name"], alone[e["name"]])
    assert len(step_losses(out / "adapters" / "three-labels")) == 12  # its own end, before the others'
    assert results(out / "adapters" / "three-labels")["classes"] == ["ham", "other", "spam"]


@pytest.mark.slow  # trains each adapter alone too (the `alone` fixture)
def test_each_adapter_directory_is_a_run(swept, alone):
    """What `lora-dist train` writes, config.yaml without the sweep section; classify, eval and export take it."""
    from lora_dist import Classifier

    out, _ = swept
    run = out / "adapters" / "att-dropout"
    for name in ("adapter", "metrics.jsonl", "results.json", "report.md", "plots", "config.yaml", "splits"):
        assert (run / name).exists(), name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert "sweep" not in cfg and cfg["lora"]["targets"] == ["*.att.*"] and cfg["output_dir"] == str(run)
    texts = ["WINNER!! Claim your prize", "see you at 6"]
    got = Classifier.from_pretrained(run, device="cpu").logits(texts)
    want = Classifier.from_pretrained(alone["att-dropout"], device="cpu").logits(texts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    proc = run_cli("eval", str(run), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["accuracy"] == results(run)["test_accuracy"], proc.stderr
    proc = run_cli("export", str(run), "--format", "peft", "--out", str(out.parent / "peft"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out.parent / "peft" / "adapter_model.safetensors").is_file()


def test_summary_and_report(swept):
    out, entries = swept
    for e in entries:
        assert {"name", "run_dir", "overrides", "settings", "val_accuracy", "test_accuracy", "best_val_loss"} <= set(e)
        assert e["overrides"][: len(SHORT)] == list(SHORT)  # the command line's, then the adapter's own
    accs = [e["val_accuracy"] for e in entries]
    assert accs == sorted(accs, reverse=True)
    assert (out / "plots" / "validation-loss.png").stat().st_size > 0
    text = (out / "sweep.md").read_text()
    assert all(f"| {e['name']} |" in text for e in entries)
    proc = run_cli("report", str(out))
    assert proc.returncode == 0 and proc.stdout == (out / "sweep.md").read_text(), proc.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert len(cfg["sweep"]["adapters"]) == len(ADAPTERS)  # the whole sweep config, resolved


def test_shipped_sweep_configs_load_and_say_how_to_run_them():
    for path in sorted((ROOT / "configs" / "sweep").glob("*.yaml")):
        plan = load_sweep(path)
        assert len(plan.adapters) >= 2
        assert any(f"--config configs/sweep/{path.name}" in line for line in path.read_text().splitlines()[:4])


def test_grid_names_and_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        SMOKE.read_text()
        + "sweep:\n  grid: {lora.rank: [4, 8], train.lr: [1e-4, 5.0e-4], lora.targets: [['*.att.*']]}\n"
    )
    plan = load_sweep(path, ["train.epochs=1", "output_dir=runs/x", "sweep.max_concurrent=2"])
    assert [a.name for a in plan.adapters][:2] == ["rank4-lr1e-4-targets_.att._", "rank4-lr0.0005-targets_.att._"]
    first = plan.adapters[0]
    assert first.overrides == ("train.epochs=1", "lora.rank=4", "train.lr=1e-4", "lora.targets=['*.att.*']")
    assert plan.sweep.max_concurrent == 2 and first.cfg.lora.targets == ("*.att.*",) and first.cfg.train.lr == 1e-4
    assert first.cfg.output_dir == "runs/x/adapters/" + first.name


# -------------------------------------------------------------------------------- slow: processes, kill -9


@pytest.mark.slow
def test_two_processes_equal_each_config_trained_alone_on_two(configs, swept, tmp_path):
    """Under torchrun, 2 processes: each adapter as the same config trained alone under torchrun (each rank
    draws its own dropout masks, as alone); only the adapters' gradients are all-reduced, each adapter's once
    a step, in the sweep's one bucket."""
    out = tmp_path / "ddp"
    proc = torchrun(2, "sweep", "--config", str(configs[1]), f"output_dir={out}", *SHORT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sweep done") == 1  # rank 0 alone prints
    for e in swept[1]:
        run = out / "adapters" / e["name"]
        alone = tmp_path / f"alone-{e['name']}"
        p = torchrun(2, "train", "--config", str(configs[0]), *e["overrides"], f"output_dir={alone}", timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert_same_runs(run, alone)
        assert results(run)["world_size"] == 2 and results(run)["strategy"] == "ddp"
        sent = {m["allreduce_bytes"] for m in read_metrics(run) if "allreduce_bytes" in m}
        assert sent == {results(run)["trainable_params"] * 4}, sent


@pytest.fixture(scope="module")
def queued(configs, tmp_path_factory):
    """The sweep two adapters at a time, the rest queued; checkpoints every 5 steps."""
    out = tmp_path_factory.mktemp("queued") / "run"
    return out, sweep_cli(configs[1], out, *QUEUED)


QUEUED = ("sweep.max_concurrent=2", "train.checkpoint_every=5")


@pytest.mark.slow
def test_queued_adapters_equal_the_sweep_of_all_at_once(swept, queued):
    out, entries = queued
    starts = [r for r in read_metrics(out) if "adapters" in r and "step" in r]
    assert max(len(r["adapters"]) for r in starts) == 2
    for e in entries:
        assert_same_runs(out / "adapters" / e["name"], swept[0] / "adapters" / e["name"])


LONG = ("sweep.max_concurrent=2", "train.checkpoint_every=5", "train.max_steps=60")


@pytest.fixture(scope="module")
def long_queued(configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("long-queued") / "run"
    return out, sweep_cli(configs[1], out, *LONG)


@pytest.mark.slow
def test_exact_resume_after_sigkill(configs, long_queued, tmp_path):
    """kill -9 in the middle (r4 done, ff-cosine and att-dropout in training, three-labels queued), then
    train.resume=auto: every adapter bit for bit as in the uninterrupted sweep."""
    out = tmp_path / "killed"
    cmd = lora_dist_cmd("sweep", "--config", str(configs[1]), f"output_dir={out}", *SHORT, *LONG, "train.resume=auto")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # r4 ends at sweep step 34 and att-dropout takes its slot, checkpointed at its steps 5 and 10 (39, 44).
    assert _wait_for_step(out, 45, proc), "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(re.search(r"resumed from \S+step-(\d+) \(sweep step", resumed.stdout).group(1))
    assert step >= 39  # att-dropout had trained: its optimizer, data order and dropout masks carry over
    for e in long_queued[1]:
        assert_same_runs(out / "adapters" / e["name"], long_queued[0] / "adapters" / e["name"], rtol=0.0)


def test_a_sweep_reads_its_own_checkpoints_and_names_a_tampered_one(swept, tmp_path):
    """The sweep's checkpoint passes the sweep's checks (not a training run's: it has no epoch); one whose
    status or file hashes were edited is named and skipped."""
    from lora_dist.errors import UserError
    from lora_dist.train import checkpoint as ckpt

    newest = sorted((swept[0] / "checkpoints").iterdir())[-1]
    state = ckpt.verify(newest, kind="sweep")
    assert set(state["status"]) == {e["name"] for e in swept[1]} and state["step"] > 0
    with pytest.raises(UserError, match="epoch must be a whole number"):
        ckpt.verify(newest, kind="train")
    run = tmp_path / "run"
    shutil.copytree(swept[0], run)
    for key, value, why in [("status", {"r4": "finished"}, "status must give"), ("examples", -1, "examples must")]:
        copy = tmp_path / key
        shutil.copytree(newest, copy)
        edited = json.loads((copy / "state.json").read_text()) | {key: value}
        (copy / "state.json").write_text(json.dumps(edited))
        with pytest.raises(UserError, match=why):
            ckpt.verify(copy, kind="sweep")
    (sorted((run / "checkpoints").iterdir())[-1] / "rng.safetensors").write_bytes(b"x")
    said = []
    path, _ = ckpt.resolve("auto", run, say=said.append, kind="sweep")
    assert path.name < newest.name and "does not match its sha256" in said[0], said


def test_more_adapters_at_once_than_fit_is_refused_before_training(configs, tmp_path, capsys, monkeypatch):
    """With 2.5 GiB free and 1 GiB an adapter, 4 at once are refused before anything is written, naming 2."""
    from lora_dist.cli import main
    from lora_dist.train import sweep_memory

    monkeypatch.setattr(sweep_memory, "available_memory", lambda device: int(2.5 * 2**30))
    monkeypatch.setattr(sweep_memory, "adapter_bytes", lambda *a: 2**30)
    code = main(["sweep", "--config", str(configs[1]), f"output_dir={tmp_path / 'o'}", *SHORT])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the sweep would train 4 adapters at a time"), err
    assert "set sweep.max_concurrent=2" in err and not (tmp_path / "o").exists()


def test_memory_an_adapter_takes_grows_with_its_batch_and_length(configs):
    """cost = rows x activations(tokens) + 4 x trained bytes: the activations about linear in the tokens, the
    rest the adapter's own tensors with their gradients and AdamW's two moments."""
    from lora_dist.build import add_trainable, build_base, shared_copy
    from lora_dist.train.sweep_memory import AdapterData, adapter_bytes

    plan = load_sweep(configs[1])
    cfg, base = plan.adapters[0].cfg, build_base(plan.cfg)

    def cost(rows, tokens):
        return adapter_bytes(base, cfg, AdapterData(("ham", "spam"), 2, tokens, rows), torch.device("cpu"), "fp32")

    model = shared_copy(base)
    add_trainable(model, cfg, 2)
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    act32 = cost(2, 32) - cost(1, 32)
    assert 2 * cost(1, 32) - cost(2, 32) == 4 * trained
    assert 1.8 < (cost(1, 64) - 4 * trained) / act32 < 2.2


@pytest.mark.slow  # 8-10 s: make test runs it, make test-fast not
def test_wandb_one_run_per_adapter_grouped_by_the_sweep(configs, tmp_path):
    """W&B users compare runs: each adapter is a W&B run of its own (its config, metrics, summary and adapter
    artifact, as a lone run has), open side by side in one process, and the sweep is their group."""
    pytest.importorskip("wandb")
    from test_slurm import wandb_groups

    out = tmp_path / "sweep-wandb"
    proc = run_cli(
        "sweep",
        "--config",
        str(configs[0]),
        f"output_dir={out}",
        "train.max_steps=3",
        "train.eval_batches=1",
        "tracking.wandb.mode=offline",
        "sweep.grid={lora.rank: [4, 8]}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = set()
    for name in ("rank4", "rank8"):
        run = out / "adapters" / name
        ids.add((run / "wandb_run_id").read_text().strip())
        assert wandb_groups(run) == [out.name]
        assert len(list((run / "wandb").glob("offline-run-*/*.wandb"))) == 1
        assert f"[{name}] W&B: offline run " in proc.stdout  # one line, with the adapter's name
    assert len(ids) == 2
    console = proc.stdout + proc.stderr
    assert not [x for x in console.splitlines() if x.startswith("wandb:")]  # W&B's own, nameless lines


@pytest.mark.slow  # 15-35 s on 2 busy cores
def test_a_sweep_shorter_than_eval_every_and_its_console(configs, tmp_path):
    """A sweep of 6 steps with eval_every 50: every adapter is evaluated after its last step, and "best" is never
    the state after step 1. Its console names the adapter on each of its lines, counts the sweep's steps, calls
    the 5-batch figures estimates and names the best adapter at the end."""
    out = tmp_path / "short"
    proc = run_cli(
        "sweep",
        "--config",
        str(configs[0]),
        f"output_dir={out}",
        "train.max_steps=6",
        "train.eval_every=50",
        "train.eval_batches=2",
        "tracking.wandb.mode=disabled",
        "sweep.grid={lora.rank: [4, 8]}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads((out / "sweep.json").read_text())["adapters"]
    for e in entries:
        records = read_metrics(out / "adapters" / e["name"])
        assert [r["step"] for r in records if "val_loss" in r] == [1, 6]
        last = next(r for r in records if "val_acc" in r)
        assert last["step"] == 6
        assert e["best_val_loss_step"] == 6 and e["best_val_accuracy"] == last["val_acc"]
        assert e["best_val_accuracy_step"] == 6
    lines = proc.stdout.splitlines()
    for name in ("rank4", "rank8"):
        header = [x for x in lines if x.startswith(f"[{name}]") and "trainable" in x]
        assert len(header) == 1 and "6 steps" in header[0]  # one line per adapter
        assert any(x.startswith(f"[{name}] final evaluation: ") for x in lines)
        done = next(x for x in lines if x.startswith(f"[{name}] done in "))
        assert "on the whole splits" in done and "its share of the sweep's throughput" in done
        step6 = next(x for x in lines if x.startswith(f"[{name}] epoch 1 step 6: "))
        assert "validation accuracy" in step6 and "(estimates on 2 batches of each split)" in step6
    assert not [x for x in lines if x.startswith("final evaluation")]
    assert any(x.startswith("sweep step 6/6: ") for x in lines)
    best = entries[0]
    assert f"best: {best['name']} (validation accuracy {best['val_accuracy'] * 100:.2f}%" in lines[-1]
    table = (out / "sweep.md").read_text()
    assert "best val acc (step)" in table and f"{best['best_val_accuracy'] * 100:.2f}% (6)" in table


def test_the_smoke_sweeps_comment_names_its_adapters_as_the_sweep_does():
    config = ROOT / "configs" / "sweep" / "smoke.yaml"
    named = re.search(r"named (\S+), \.\.\.", config.read_text())
    assert named and named[1] in [a.name for a in load_sweep(config, []).adapters]
