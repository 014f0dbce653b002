"""`report.md` for a finished run: scores per split and per class, confusion matrices, parameters, time, plots.

    lora-dist report runs/smoke         # (re)writes runs/smoke/report.md and runs/smoke/plots/, prints the report

Training writes it at the end too. Every number comes from `results.json` (precision, recall and F1, per
class and macro, are computed from its confusion matrices); the header comes from `config.yaml` and the run's start record.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from .errors import UserError
from .files import read_json, write_atomic
from .plots import read_metrics, write_plots
from .scores import scores

SPLITS = (("train", "train"), ("validation", "val"), ("test", "test"))  # confusion key, results.json prefix


def load_results(run_dir: Path) -> dict:
    """results.json of a finished run, or a UserError that says what RUN_DIR should be."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the output_dir of a lora-dist training run")
    path = run_dir / "results.json"
    if not path.is_file():
        hint = (
            "it holds checkpoints but never finished: resume it with train.resume=auto"
            if (run_dir / "checkpoints").is_dir()
            else "pass the output_dir of a run that finished training"
        )
        raise UserError(f"{run_dir} is not a finished lora-dist run (no results.json); {hint}")
    results = read_json(path, "rerun the training or restore the file")
    if not isinstance(results, dict) or "test_accuracy" not in results:
        raise UserError(
            f"{path} is not a lora-dist results file (no test_accuracy); pass the output_dir of a lora-dist run"
        )
    return results


def render(run_dir: Path, results: dict, plots: Sequence[Path] = ()) -> str:
    """The report as Markdown."""
    run_dir = Path(run_dir)
    lines = [f"# lora-dist report: {run_dir.resolve().name}", "", *_header(run_dir, results), *_selection(results), ""]
    classes = results.get("classes") or ["ham", "spam"]
    confusion = results.get("confusion") or {}
    lines += [
        "## Scores per split (precision, recall and F1: macro, the mean over the classes)",
        "",
        "| split | examples | accuracy | precision | recall | F1 | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, prefix in SPLITS:
        acc, loss = results.get(f"{prefix}_accuracy"), results.get(f"{prefix}_loss")
        if split in confusion:
            s = scores(confusion[split], classes)
            m = s["macro"]
            lines.append(
                f"| {split} | {s['count']:,} | {pct(acc)} | {pct(m['precision'])} | {pct(m['recall'])} "
                f"| {pct(m['f1'])} | {num(loss, 4)} |"
            )
        else:
            lines.append(f"| {split} | | {pct(acc)} | | | | {num(loss, 4)} |")
    if "test" in confusion:
        lines += [
            "",
            "## Per class, test split",
            "",
            "| class | messages | precision | recall | F1 |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, v in scores(confusion["test"], classes)["per_class"].items():
            lines.append(f"| {name} | {v['support']:,} | {pct(v['precision'])} | {pct(v['recall'])} | {pct(v['f1'])} |")
    if confusion:
        lines += ["", "## Confusion matrices (rows: true class, columns: predicted class)"]
        for split, _ in SPLITS:
            if split in confusion:
                lines += [
                    "",
                    f"**{split}**",
                    "",
                    "| true \\ predicted | " + " | ".join(classes) + " |",
                    "|---|" + "---:|" * len(classes),
                ]
                lines += [
                    f"| {name} | " + " | ".join(f"{n:,}" for n in row) + " |"
                    for name, row in zip(classes, confusion[split], strict=True)
                ]
    total, trainable = results.get("total_params"), results.get("trainable_params")
    share = f" ({trainable / total * 100:.3f}% of total)" if total and trainable else ""
    lines += [
        "",
        "## Parameters",
        "",
        "| | count |",
        "|---|---:|",
        f"| total (base model) | {as_int(total)} |",
        f"| trainable | {as_int(trainable)}{share} |",
    ]
    lines += [
        "",
        "## Time and throughput",
        "",
        "| | value |",
        "|---|---:|",
        f"| wall time (the whole run: setup, training, evaluations, checkpoints) | {num(results.get('wall_seconds'), 1)} s |",
        f"| training time (the optimizer steps) | {num(results.get('train_seconds'), 1)} s |",
        f"| final evaluation (every split) | {num(results.get('eval_seconds'), 1)} s |",
        f"| steps | {as_int(results.get('steps'))} |",
        f"| epochs | {as_int(results.get('epochs'))} |",
        f"| examples seen | {as_int(results.get('examples_seen'))} |",
        f"| examples per second | {num(results.get('examples_per_second'), 1)} |",
        f"| tokens per second | {num(results.get('tokens_per_second'), 1)} |",
    ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, run_dir)})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> Path:
    """Plots, then report.md (written whole, then renamed); returns report.md's path."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    plots = write_plots(run_dir)
    return write_atomic(run_dir / "report.md", render(run_dir, results, plots))


def finish_report(run_dir: Path, say: Callable[[str], None] = print) -> None:
    """What training calls at the end (rank 0): the report must never fail a finished run."""
    try:
        path = write_report(run_dir)
        say(f"report: {path}")
    except Exception as e:  # noqa: BLE001
        say(f"warning: could not write the report ({type(e).__name__}: {e}); retry with: lora-dist report {run_dir}")


def _header(run_dir: Path, results: dict) -> list[str]:
    cfg: dict = {}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    start: dict = {}
    if (run_dir / "metrics.jsonl").is_file():
        start = next((r for r in reversed(read_metrics(run_dir / "metrics.jsonl")) if r.get("event") == "start"), {})
    model, lora, train = cfg.get("model", {}), cfg.get("lora", {}), cfg.get("train", {})
    trained = (
        f"LoRA rank {lora.get('rank', '?')}, alpha {lora.get('alpha', '?')}, scaling {lora.get('scaling', '?')}"
        + (f", {start['lora_layers']} layers" if "lora_layers" in start else "")
        if train.get("trainable", "lora") == "lora"
        else f"trained: {train['trainable']} (no LoRA)"
    )
    out = [
        f"- model: {model.get('name', '?')} ({model.get('weights', '?')} weights); {trained}; "
        f"pooling {model.get('pooling', 'last_real')}" + ("" if model.get("causal_mask", True) else ", no causal mask"),
        f"- run: strategy {results.get('strategy', '?')}, {results.get('world_size', '?')} process(es), "
        f"precision {train.get('precision', '?')}, global batch {train.get('batch_size', '?')}, lr {train.get('lr', '?')}",
    ]
    if start.get("git_commit"):
        out.append(
            f"- git commit: {start['git_commit']}" + (" (with uncommitted changes)" if start.get("git_dirty") else "")
        )
    return out


def _selection(results: dict) -> list[str]:
    """train.select / train.early_stop: which step's adapter the scores are of, and why."""
    sel = results.get("selection")
    if not isinstance(sel, dict):
        return []
    metric, n = sel.get("metric"), len(sel.get("evaluations") or [])
    over = f"the first {sel['examples']:,} validation messages" if sel.get("examples") else "the whole validation split"
    if sel.get("kept") == "best":
        line = (
            f"- adapter: step {sel.get('chosen_step')} of {sel.get('last_step')}, the best {metric} "
            f"({num(sel.get('best_value'), 4)}, {sel.get('mode')}) of {n} evaluations on {over}; the scores below "
            f"are its; the last step's adapter is in adapter-last/"
        )
    else:
        line = f"- adapter: the last step's ({sel.get('last_step')}); {metric} evaluated {n} times on {over}"
    es = sel.get("early_stop")
    if isinstance(es, dict):
        line += f"; early stopping (patience {es.get('patience')}, min_delta {es.get('min_delta')}) " + (
            "ended the run there" if es.get("stopped") else "did not stop the run"
        )
    return [line]


def pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.2f}%"


def num(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def as_int(x: float | None) -> str:
    return "" if x is None else f"{int(x):,}"
