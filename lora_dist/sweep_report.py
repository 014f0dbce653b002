"""A sweep's summary: `RUN/sweep.json`, `RUN/sweep.md` and `RUN/plots/validation-loss.png`.

    lora-dist report runs/sweep      # (re)writes them from the adapters' run directories, prints sweep.md

`sweep.json` is `{"adapters": [...]}`, best first: each adapter's `name`, `run_dir` (a run as `lora-dist
train` leaves it), `status`, `overrides` (the `key=value` strings that train it alone with `lora-dist train
--config FILE`, FILE without its sweep section), `settings`, and its figures: accuracy and loss per split of
the adapter it saved (`results.json`), test macro F1, and the best validation accuracy and loss it reached
while training (`metrics.jsonl`). Adapters are sorted by validation accuracy, then validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UserError
from .files import parse_json, read_json, write_atomic
from .plots import latest_by_step, plot_curves, read_metrics, steps_per_epoch
from .report import num, pct
from .scores import scores

FINAL = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_accuracy", "steps", "epochs")


def figures(run_dir: Path) -> dict:
    """An adapter's figures, from its run directory (empty where it has none yet)."""
    out: dict = {}
    if (run_dir / "results.json").is_file():
        r = read_json(run_dir / "results.json", "retrain the adapter or restore the file")
        out |= {k: r[k] for k in FINAL if k in r}
        out["examples_per_second"] = r.get("examples_per_second")
        test = (r.get("confusion") or {}).get("test")
        if test:
            out["test_macro_f1"] = scores(test, r.get("classes"))["macro"]["f1"]
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    accs = trained(latest_by_step(records, "val_acc"))
    if accs:
        best = max(accs, key=lambda r: r["val_acc"])
        out |= {
            "best_val_accuracy": best["val_acc"],
            "best_val_accuracy_epoch": best["epoch"],
            "best_val_accuracy_step": best["step"],
        }
    losses = trained(latest_by_step(records, "val_loss"))
    if losses:
        best = min(losses, key=lambda r: r["val_loss"])
        out |= {"best_val_loss": best["val_loss"], "best_val_loss_step": best["step"]}
    return out


def trained(evaluations: list[dict]) -> list[dict]:
    """The evaluations that may be called "best": not the one after step 1 (the adapter is its initial state
    after one update), unless that step was the last (a one-step run)."""
    last = max((r["step"] for r in evaluations), default=0)
    return [r for r in evaluations if r["step"] > 1 or r["step"] == last]


def _order(e: dict) -> tuple[bool, float, float, str]:
    return (e.get("status") != "done", -(e.get("val_accuracy") or 0.0), e.get("val_loss") or float("inf"), e["name"])


def adapter_dir(sweep_dir: Path, entry: dict) -> Path:
    """An entry's run directory: as the sweep named it, else under this sweep directory (moved since)."""
    named = Path(entry["run_dir"])
    return named if named.is_dir() else Path(sweep_dir) / "adapters" / entry["name"]


def write_summary(sweep_dir: Path, entries: list[dict]) -> Path:
    """sweep.json, the validation-loss plot and sweep.md from `entries` (name, run_dir, status, overrides,
    settings) and the figures in their run directories; returns sweep.md's path."""
    sweep_dir = Path(sweep_dir)
    entries = sorted(({**e, **figures(adapter_dir(sweep_dir, e))} for e in entries), key=_order)
    write_atomic(sweep_dir / "sweep.json", json.dumps({"adapters": entries}, indent=2) + "\n")
    curves = {}
    for e in entries:
        d = adapter_dir(sweep_dir, e)
        records = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []
        losses, per_epoch = latest_by_step(records, "val_loss"), steps_per_epoch(records)
        if losses and per_epoch:
            curves[e["name"]] = ([r["step"] / per_epoch for r in losses], [r["val_loss"] for r in losses])
    plot = None
    try:
        plot = (
            plot_curves(curves, "Epochs", "Validation loss", sweep_dir / "plots" / "validation-loss.png")
            if curves
            else None
        )
    except Exception:  # noqa: BLE001 - a missing or broken matplotlib costs the plot, not the summary
        plot = None
    return write_atomic(sweep_dir / "sweep.md", render(sweep_dir, entries, plot))


def write_report(sweep_dir: Path) -> Path:
    """`lora-dist report RUN` on a sweep: the summary again, from sweep.json and the adapters' directories."""
    path = Path(sweep_dir) / "sweep.json"
    try:
        entries = parse_json(path.read_text())["adapters"]
        kept = [
            {k: e[k] for k in ("name", "run_dir", "status", "overrides", "settings", "error", "pruned") if k in e}
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is not a lora-dist sweep summary ({type(e).__name__}); rerun the sweep with train.resume=auto"
        ) from e
    return write_summary(sweep_dir, kept)


def best_line(sweep_dir: Path) -> str:
    """ "best: NAME (validation accuracy X%, test Y%)", the first adapter of sweep.json (best first), or ""."""
    try:
        entries = json.loads((Path(sweep_dir) / "sweep.json").read_text())["adapters"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    done = [e for e in entries if isinstance(e, dict) and e.get("status") == "done" and "val_accuracy" in e]
    if not done:
        return ""
    e = done[0]
    return (
        f"best: {e['name']} (validation accuracy {pct(e.get('val_accuracy'))}, test {pct(e.get('test_accuracy'))}, "
        f"in {e.get('run_dir')})"
    )


def is_sweep(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def render(sweep_dir: Path, entries: list[dict], plot: Path | None) -> str:
    cfg: dict = {}
    if (sweep_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((sweep_dir / "config.yaml").read_text()) or {}
    model = cfg.get("model", {})
    done = sum(e.get("status") == "done" for e in entries)
    lines = [
        f"# lora-dist sweep: {sweep_dir.resolve().name}",
        "",
        f"{len(entries)} adapters ({done} done) over {model.get('name', '?')} ({model.get('weights', '?')} weights), "
        f"trained in one job. Sorted by validation accuracy of the saved adapter, then validation loss; "
        f'"best" is the best estimate while training (on train.eval_batches batches of the validation split, '
        f"after the first step); val acc and val loss are the saved adapter's, on the whole split.",
        "",
        "| # | adapter | settings | val acc | val loss | best val acc (step) | test acc | test macro F1 | test loss | steps | status |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, e in enumerate(entries, 1):
        settings = ", ".join(f"{k}={v}" for k, v in (e.get("settings") or {}).items()) or "(the config as is)"
        best = e.get("best_val_accuracy")
        step = e.get("best_val_accuracy_step", e.get("best_val_accuracy_epoch"))
        best_text = f"{pct(best)} ({step})" if best is not None else ""
        lines.append(
            f"| {i} | {e['name']} | {settings} | {pct(e.get('val_accuracy'))} | {num(e.get('val_loss'), 4)} | {best_text} "
            f"| {pct(e.get('test_accuracy'))} | {pct(e.get('test_macro_f1'))} | {num(e.get('test_loss'), 4)} "
            f"| {e.get('steps', '')} | {e.get('status', '')} |"
        )
    pruned = [e for e in entries if isinstance(e.get("pruned"), dict)]
    if pruned:
        lines += ["", "Pruned by successive halving (sweep.prune): stopped at a rung, their adapters kept."]
        lines += [
            f"- {e['name']}: step {e['pruned'].get('step')}, {k} {num(v, 4)}, rank {e['pruned'].get('rank')} of "
            f"{e['pruned'].get('of')} at that rung"
            for e in pruned
            for k, v in e["pruned"].items()
            if k.startswith("val_")
        ]
    failed = [e for e in entries if e.get("error")]
    if failed:
        lines += ["", *[f"- {e['name']} failed: {e['error']}" for e in failed]]
    if plot is not None:
        lines += ["", f"![validation loss of every adapter]({plot.relative_to(sweep_dir)})"]
    lines += [
        "",
        "Each adapter's directory is a run as `lora-dist train` leaves it (`classify`, `eval`, `export` and `serve` "
        "take it); `overrides` in sweep.json train one alone: `lora-dist train --config FILE KEY=VALUE...`, FILE "
        "without its sweep section.",
    ]
    return "\n".join(lines) + "\n"
