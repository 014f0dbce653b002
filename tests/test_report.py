"""report.md, the plots, the scores behind them, and `lora-dist eval` on a saved adapter."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from lora_dist.cli import main
from lora_dist.errors import UserError
from lora_dist.infer.evaluate import evaluate_run
from lora_dist.plots import latest_by_step, write_plots
from lora_dist.report import load_results, render
from lora_dist.scores import scores


@pytest.fixture(scope="module")
def finished_run(smoke_run):
    """The session's smoke run (conftest.py), which writes its report when it ends."""
    out, proc = smoke_run
    assert f"report: {out / 'report.md'}" in proc.stdout
    return out


# ---------------------------------------------------------------------------------------- scores


def test_scores_match_a_hand_computed_confusion_matrix():
    # 100 messages: 60 ham (50 right, 10 called spam), 40 spam (35 caught, 5 missed).
    s = scores([[50, 10], [5, 35]], ["ham", "spam"])
    assert s["count"] == 100
    assert s["accuracy"] == pytest.approx(85 / 100)
    spam, ham = s["per_class"]["spam"], s["per_class"]["ham"]
    assert spam["precision"] == pytest.approx(35 / 45)  # tp / (tp + fp)
    assert spam["recall"] == pytest.approx(35 / 40)  # tp / (tp + fn)
    assert spam["f1"] == pytest.approx(14 / 17)  # 2 tp / (2 tp + fp + fn) = 70 / 85
    assert ham["precision"] == pytest.approx(50 / 55) and ham["recall"] == pytest.approx(50 / 60)
    assert ham["f1"] == pytest.approx(100 / 115) and (ham["support"], spam["support"]) == (60, 40)
    assert s["macro"]["f1"] == pytest.approx((14 / 17 + 100 / 115) / 2)
    assert s["macro"]["precision"] == pytest.approx((35 / 45 + 50 / 55) / 2)


def test_scores_of_three_classes_and_of_empty_classes():
    # true neg/neu/pos (rows) against predicted (columns).
    s = scores([[4, 1, 0], [2, 2, 1], [0, 0, 5]], ["neg", "neu", "pos"])
    assert s["accuracy"] == pytest.approx(11 / 15)
    assert s["per_class"]["neu"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 5, "f1": 0.5, "support": 5})
    assert s["per_class"]["pos"]["precision"] == pytest.approx(5 / 6)
    never = scores([[7, 0], [3, 0]], ["ham", "spam"])  # spam never predicted: its precision is 0 (zero_division=0)
    assert never["per_class"]["spam"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert never["macro"]["recall"] == pytest.approx(0.5)
    assert scores([[0, 0], [0, 0]])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        scores([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError):
        scores([[1, 2], [3, 4]], ["only-one"])


# ---------------------------------------------------------------------------------------- report


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def number(cell: str) -> float:
    return float(re.sub(r"[,%s ]", "", cell.split("(")[0]))


def test_report_numbers_equal_results_json(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    text = (finished_run / "report.md").read_text()
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        (row,) = table_rows(text, split)
        s = scores(results["confusion"][split], results["classes"])
        assert number(row[1]) == sum(map(sum, results["confusion"][split]))
        assert number(row[2]) == round(results[f"{prefix}_accuracy"] * 100, 2)
        assert number(row[2]) == round(s["accuracy"] * 100, 2)
        assert [number(c) for c in row[3:6]] == [round(s["macro"][k] * 100, 2) for k in ("precision", "recall", "f1")]
        assert number(row[6]) == round(results[f"{prefix}_loss"], 4)
    ham_rows, spam_rows = table_rows(text, "ham"), table_rows(text, "spam")
    per_class = scores(results["confusion"]["test"], results["classes"])["per_class"]
    for name, row in (("ham", ham_rows.pop(0)), ("spam", spam_rows.pop(0))):  # the per-class table comes first
        assert number(row[1]) == per_class[name]["support"]
        assert [number(c) for c in row[2:5]] == [
            round(per_class[name][k] * 100, 2) for k in ("precision", "recall", "f1")
        ]
    for i, split in enumerate(("train", "validation", "test")):  # the confusion tables, in this order
        (hh, hs), (sh, ss) = results["confusion"][split]
        assert [number(c) for c in ham_rows[i][1:]] == [hh, hs] and [number(c) for c in spam_rows[i][1:]] == [sh, ss]
    (total,) = table_rows(text, "total (base model)")
    (trainable,) = table_rows(text, "trainable")
    assert number(total[1]) == results["total_params"] and number(trainable[1]) == results["trainable_params"]
    for label, key, digits in (
        ("wall time (the whole run: setup, training, evaluations, checkpoints)", "wall_seconds", 1),
        ("training time (the optimizer steps)", "train_seconds", 1),
        ("final evaluation (every split)", "eval_seconds", 1),
        ("examples per second", "examples_per_second", 1),
        ("tokens per second", "tokens_per_second", 1),
        ("examples seen", "examples_seen", 0),
        ("steps", "steps", 0),
        ("epochs", "epochs", 0),
    ):
        (row,) = table_rows(text, label)
        assert number(row[1]) == round(results[key], digits), label
    for name in ("loss", "accuracy", "confusion-test"):
        assert f"(plots/{name}.png)" in text


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", ["loss", "accuracy", "confusion-test"])
def test_plots_are_png_images_of_sensible_size(finished_run, name):
    path = finished_run / "plots" / f"{name}.png"
    width, height = png_size(path)
    assert 300 <= width <= 3000 and 300 <= height <= 3000, (width, height)
    assert path.stat().st_size > 5_000  # axes, curves and labels, not an empty canvas
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05


def test_report_command_rewrites_and_prints(finished_run, capsys):
    (finished_run / "report.md").unlink()
    assert main(["report", str(finished_run)]) == 0
    printed = capsys.readouterr().out
    assert printed == (finished_run / "report.md").read_text() and printed.startswith("# lora-dist report")


@pytest.mark.parametrize("command", ["report", "eval"])
def test_a_directory_that_is_not_a_run_is_one_clear_error(tmp_path, capsys, command):
    (tmp_path / "notes.txt").write_text("hello")
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a" in err and "output_dir" in err
    assert main([command, str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_report_of_a_stopped_run_says_to_resume(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="train.resume=auto"):
        load_results(tmp_path)


def test_plots_use_the_latest_record_of_a_resumed_step(tmp_path):
    records = [
        {"event": "start", "steps_per_epoch": 4},
        {"step": 1, "epoch": 0, "examples_seen": 8, "train_loss": 0.9, "val_loss": 1.0},
        {"step": 3, "epoch": 0, "examples_seen": 24, "train_loss": 0.8, "val_loss": 0.7},
        {"event": "resume", "step": 1},
        {"step": 3, "epoch": 0, "examples_seen": 24, "train_loss": 0.5, "val_loss": 0.6},
        {"step": 4, "epoch": 1, "examples_seen": 32, "train_acc": 0.9, "val_acc": 0.8},
    ]
    assert [r["train_loss"] for r in latest_by_step(records, "val_loss")] == [0.9, 0.5]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"cut short')
    assert sorted(p.name for p in write_plots(tmp_path)) == ["accuracy.png", "loss.png"]


def test_render_without_confusion_still_reports_accuracy(tmp_path):
    text = render(tmp_path, {"test_accuracy": 0.5, "train_accuracy": 0.75})
    assert "| test | | 50.00% |" in text and "| train | | 75.00% |" in text


# ------------------------------------------------------------------------------------------ eval


def test_eval_reproduces_the_runs_test_scores(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    r = evaluate_run(finished_run, "test", device="cpu")
    assert r["confusion"] == results["confusion"]["test"]
    assert r["accuracy"] == pytest.approx(results["test_accuracy"])
    assert r["loss"] == pytest.approx(results["test_loss"], rel=1e-4)


def test_eval_on_a_users_own_file(finished_run, tmp_path, capsys):
    data = tmp_path / "mine.tsv"
    data.write_text(
        "label\ttext\nspam\tWINNER!! Claim your free prize now, call 0800 123 456\nham\tSee you at lunch?\n"
        "ham\tRunning late, be there in 10\n"
    )
    assert main(["eval", str(finished_run), "--data", str(data), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["source"] == str(data) and r["count"] == 3 and sum(map(sum, r["confusion"])) == 3
    assert r["classes"] == ["ham", "spam"]
    expected = scores(r["confusion"], ["ham", "spam"])
    assert r["per_class"] == expected["per_class"] and r["macro"] == expected["macro"]
    assert r["per_class"]["spam"]["support"] == 1 and r["per_class"]["ham"]["support"] == 2


def test_eval_without_a_saved_adapter_is_a_clear_error(finished_run, tmp_path):
    (tmp_path / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    with pytest.raises(UserError, match="not a lora-dist adapter"):
        evaluate_run(tmp_path)


def test_a_runs_console_calls_the_few_batch_figures_estimates(smoke_run):
    """Two validation accuracies in one run (5 batches per epoch, the whole split at the end) are told apart: the
    first is named an estimate wherever it is printed, the second is on the whole split."""
    out, proc = smoke_run
    lines = proc.stdout.splitlines()
    epochs = [x for x in lines if re.match(r"epoch \d+: train accuracy", x)]
    steps = [x for x in lines if re.match(r"epoch \d+ step \d+: train loss", x)]
    assert len(epochs) == 3 and steps
    assert all(x.endswith("(estimates on 5 batches of each split)") for x in epochs + steps)
    done = next(x for x in lines if x.startswith("done in "))
    assert "accuracy on the whole splits" in done
    cpu = next(x for x in lines if x.startswith("lora-dist: "))
    assert re.search(r"device cpu \(\d+ threads?\)", cpu)
