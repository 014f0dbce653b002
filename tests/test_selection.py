"""train.select (the best step's adapter), train.early_stop, data.balance=weight (the weighted loss)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, run_cli, torchrun, train_args
from safetensors.torch import load_file

from lora_dist.config import DataConfig, load_config
from lora_dist.data import inverse_frequency
from lora_dist.errors import UserError
from lora_dist.infer.evaluate import evaluate_run
from lora_dist.train.loss import loss as classification_loss
from lora_dist.train.selection import Selection

# 30 steps of the smoke run, evaluated for selection at steps 1, 11, 21 and 30 (the last).
SHORT = ("train.max_steps=30", "train.eval_every=10")


def _selection(**train) -> Selection:
    return Selection(load_config(None, [f"train.{k}={v}" for k, v in train.items()]).train)


def test_selection_follows_the_metric_and_patience():
    """Best: strictly better (min for val_loss, max otherwise); patience counts evaluations that did not improve
    by more than min_delta, as HF's EarlyStoppingCallback does."""
    s = _selection(**{"select.metric": "val_loss", "early_stop.patience": 2, "early_stop.min_delta": 0.1})
    assert s.mode == "min" and s.keeps_best
    seen = [(s.observe(step, v), s.waited, s.should_stop()) for step, v in ((1, 1.0), (2, 0.95), (3, 0.8), (4, 0.85))]
    # 0.95 is better (the new best) but by less than min_delta: it counts toward patience; 0.8 resets it
    assert seen == [(True, 0, False), (True, 1, False), (True, 0, False), (False, 1, False)]
    assert (s.best_step, s.best_value) == (3, 0.8)
    s.observe(5, float("nan"))  # never a best
    assert s.should_stop() and s.best_step == 3
    acc = _selection(**{"select.metric": "val_macro_f1"})
    assert acc.mode == "max" and [acc.observe(i, v) for i, v in enumerate((0.5, 0.7, 0.7, 0.6))] == [
        True,
        True,
        False,
        False,
    ]
    assert not acc.should_stop()  # no early_stop: never


def test_config_keys():
    assert DataConfig(balance=True).balance == "undersample" and DataConfig(balance=False).balance == "none"
    assert load_config(None, ["data.balance=weight"]).data.balance == "weight"
    assert load_config(None).data.balance == "undersample"  # the book's default
    for bad, word in (
        ("data.balance=oversample", "data.balance must be one of undersample, weight, none"),
        ("train.select.metric=f1", "train.select.metric must be one of"),
        ("train.early_stop.patience=0", "patience must be >= 1"),
        ("train.select.examples=0", "train.select.examples must be > 0"),
    ):
        with pytest.raises(UserError, match=word):
            load_config(None, [bad])
    # early stopping alone watches val_loss and keeps the last step's adapter
    s = _selection(**{"early_stop.patience": 3})
    assert (s.metric, s.mode, s.keeps_best) == ("val_loss", "min", False)


def test_weighted_loss_by_hand():
    """data.balance=weight: weights n / (k n_c) over the training labels; the loss is the mean over the messages
    of weight x cross-entropy, computed here by hand from log-softmax."""
    w = inverse_frequency([0, 0, 0, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    p = [[2.0, 0.0], [0.5, 1.5], [0.0, 0.0]]
    import math

    def nll(row, c):
        return -(row[c] - math.log(sum(math.exp(x) for x in row)))

    by_hand = (w[0] * nll(p[0], 0) + w[1] * nll(p[1], 1) + w[1] * nll(p[2], 1)) / 3
    assert classification_loss(logits, labels, w).item() == pytest.approx(float(by_hand), rel=1e-6)
    assert classification_loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    # a global batch's loss does not depend on how it is cut into micro-batches (torch's weighted mean would)
    halves = (
        classification_loss(logits[:1], labels[:1], w) * 1 + classification_loss(logits[1:], labels[1:], w) * 2
    ) / 3
    assert halves.item() == pytest.approx(classification_loss(logits, labels, w).item(), rel=1e-6)
    with pytest.raises(UserError, match="no message of class 'spam'"):
        inverse_frequency([0, 0], 2, ("ham", "spam"))


def _copy_as_run(run, adapter_dir, dest):
    """A run directory whose adapter/ is `adapter_dir` (to evaluate adapter-last/ as a run)."""
    dest.mkdir()
    shutil.copytree(run / "splits", dest / "splits")
    shutil.copytree(adapter_dir, dest / "adapter")
    return dest


def test_select_keeps_the_best_step(tmp_path):
    """Selecting the *highest* validation loss makes the best step an early one, not the last: adapter/ is that
    step's adapter (its validation loss, re-evaluated through Classifier, is the one recorded at that step),
    adapter-last/ the last step's; results.json and report.md say which step was chosen and why."""
    out = tmp_path / "run"
    proc = run_cli(*train_args(out, *SHORT, "train.select.metric=val_loss", "train.select.mode=max"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    sel = r["selection"]
    history = {e["step"]: e["val_loss"] for e in sel["evaluations"]}
    assert sorted(history) == [1, 11, 21, 30]
    best = max(history, key=history.get)  # the independent pick, from the recorded evaluations
    assert sel["chosen_step"] == sel["best_step"] == best != 30 and sel["last_step"] == 30
    assert sel["best_value"] == history[best] and sel["last_value"] == history[30]
    # the final evaluation is the chosen adapter's; the whole validation split was used for selection
    assert r["val_loss"] == pytest.approx(history[best], abs=1e-5)
    assert sum(map(sum, r["confusion"]["validation"])) == 149
    chosen = evaluate_run(out, "validation", device="cpu")
    assert chosen["loss"] == pytest.approx(history[best], abs=1e-4)
    last = evaluate_run(_copy_as_run(out, out / "adapter-last", tmp_path / "last"), "validation", device="cpu")
    assert last["loss"] == pytest.approx(history[30], abs=1e-4)
    a, b = (
        load_file(str(out / "adapter" / "adapter_model.safetensors")),
        load_file(str(out / "adapter-last" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    report = (out / "report.md").read_text()
    assert f"adapter: step {best} of 30, the best val_loss" in report and "adapter-last/" in report
    logged = [m for m in read_metrics(out) if "select_val_loss" in m]
    assert [m["step"] for m in logged] == [1, 11, 21, 30]


def _stop_args(out, *extra):
    return train_args(
        out,
        "train.max_steps=80",
        "train.eval_every=10",
        "train.select.metric=val_accuracy",
        "train.early_stop.patience=2",
        "train.early_stop.min_delta=0.02",
        *extra,
    )


def _stopped(out):
    r = json.loads((out / "results.json").read_text())
    return r, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _check_resumed_alike(tmp_path, launch):
    whole = tmp_path / "whole"
    assert (p := launch(_stop_args(whole))).returncode == 0, p.stderr
    r, adapter = _stopped(whole)
    es = r["selection"]["early_stop"]
    assert es["stopped"] and r["steps"] < 80, r["selection"]  # stopped early, every rank at the same step
    assert r["steps"] == r["selection"]["evaluations"][-1]["step"]
    assert (whole / "checkpoints" / f"step-{r['steps']:08d}").is_dir()  # with a checkpoint
    # stopped at step 21 (a selection step) and resumed: the same steps, the same choice, the same adapter
    part = tmp_path / "part"
    assert (p := launch(_stop_args(part, "train.max_steps=21"))).returncode == 0, p.stderr
    assert (p := launch(_stop_args(part, "train.resume=auto"))).returncode == 0, p.stderr
    assert "resumed from" in p.stdout
    r2, adapter2 = _stopped(part)
    assert r2["steps"] == r["steps"] and r2["selection"]["evaluations"] == r["selection"]["evaluations"]
    assert r2["selection"]["best_step"] == r["selection"]["best_step"]
    for k in adapter:
        torch.testing.assert_close(adapter2[k], adapter[k], atol=1e-6, rtol=0)
    # resuming a run that stopped early trains nothing more
    assert (p := launch(_stop_args(whole, "train.resume=auto"))).returncode == 0, p.stderr
    assert _stopped(whole)[0]["steps"] == r["steps"]


@pytest.mark.slow
def test_early_stop_and_resume(tmp_path):
    _check_resumed_alike(tmp_path, lambda args: run_cli(*args))


@pytest.mark.slow
def test_early_stop_under_torchrun(tmp_path):
    _check_resumed_alike(tmp_path, lambda args: torchrun(2, *args))
