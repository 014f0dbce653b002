"""The book's figures, as PNG files in `RUN_DIR/plots/`, drawn from `metrics.jsonl` and `results.json`.

    lora-dist report runs/smoke        # writes plots/loss.png, plots/accuracy.png, plots/confusion-test.png

`plot_values` is the book's (chapter 6): a value against epochs, with examples seen on a second x axis.
Figures are drawn with matplotlib's object API (no pyplot), so no display is ever needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .files import parse_json, read_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a line cut short by a crash is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(parse_json(line))
        except ValueError:  # cut short, or nested too deeply: no record a run wrote
            continue
    return records


def latest_by_step(records: list[dict], key: str) -> list[dict]:
    """Records holding `key`, one per step in step order; after a resume the later record of a step wins."""
    by_step = {r["step"]: r for r in records if key in r and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def steps_per_epoch(records: list[dict]) -> float | None:
    """From the start record, else from an epoch-end record (step / completed epochs)."""
    for r in reversed(records):
        if r.get("event") == "start" and r.get("steps_per_epoch"):
            return float(r["steps_per_epoch"])
    for r in records:
        if "val_acc" in r and r.get("epoch"):
            return r["step"] / r["epoch"]
    return None


def plot_values(
    epochs_seen: Sequence[float],
    examples_seen: Sequence[float],
    train_values: Sequence[float],
    val_values: Sequence[float],
    label: str,
    path: Path,
) -> Path:
    """The book's `plot_values`: training and validation `label` against epochs, examples seen on top."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=150)
    ax1 = fig.add_subplot()
    marker = "o" if len(epochs_seen) < 10 else None
    ax1.plot(epochs_seen, train_values, marker=marker, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, marker=marker, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()
    ax2.plot(examples_seen, train_values, alpha=0)  # invisible: only aligns the examples-seen ticks
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, path: Path
) -> Path:
    """Named curves in one figure, one line each (a sweep's validation loss, one line per adapter)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=150)
    ax = fig.add_subplot()
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) < 10 else None, markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(curves) <= 20:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with the counts written in."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.2), dpi=150)
    ax = fig.add_subplot()
    ax.imshow(confusion, cmap="Blues")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > peak / 2 else "black")
    ax.set_xticks(range(len(classes)), labels=classes)
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(run_dir: Path) -> list[Path]:
    """loss.png and accuracy.png from metrics.jsonl (when it holds the values), confusion-test.png from
    results.json; returns the files written."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "plots"
    written = []
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    per_epoch = steps_per_epoch(records)
    losses = latest_by_step(records, "val_loss")
    if losses:
        epochs = [r["step"] / per_epoch for r in losses] if per_epoch else [r["epoch"] for r in losses]
        written.append(
            plot_values(
                epochs,
                [r["examples_seen"] for r in losses],
                [r["train_loss"] for r in losses],
                [r["val_loss"] for r in losses],
                "loss",
                out_dir / "loss.png",
            )
        )
    accs = latest_by_step(records, "val_acc")
    if accs:
        written.append(
            plot_values(
                [r["step"] / per_epoch for r in accs] if per_epoch else [r["epoch"] for r in accs],
                [r["examples_seen"] for r in accs],
                [r["train_acc"] for r in accs],
                [r["val_acc"] for r in accs],
                "accuracy",
                out_dir / "accuracy.png",
            )
        )
    results_path = run_dir / "results.json"
    if results_path.is_file():
        results = read_json(results_path, "rerun the training or restore the file")
        test = (results.get("confusion") or {}).get("test")
        if test:
            classes = results.get("classes") or [str(i) for i in range(len(test))]
            written.append(plot_confusion(test, classes, "Test split", out_dir / "confusion-test.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path
