"""Re-evaluate a run's saved adapter on one of its splits, or on a labelled file of your own.

    lora-dist eval runs/smoke                          # the test split the run was trained against
    lora-dist eval runs/smoke --split validation
    lora-dist eval runs/smoke --data my_messages.csv   # CSV/TSV with a header holding text and label

The model is the run's adapter (or trained weights) on its base, loaded as `Classifier` loads it; messages
are truncated and padded as in training. Scores are computed in fp32 unless --precision says otherwise (then
one line on stderr says so, and the result's `precision` names it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter import find
from ..config import load_config
from ..data import read_table
from ..device import precision_note
from ..errors import UserError
from ..scores import scores
from ..token_cache import cache_limit, open_cache, read_split_record
from .classifier import Classifier

SPLITS = ("train", "validation", "test")


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    precision: str = "fp32",
) -> dict:
    """{"source", "count", "loss", "accuracy", "per_class", "macro", "confusion", "classes", "precision"}."""
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the output_dir of a lora-dist training run")
    find(run_dir)  # a run with a saved adapter, or one clear error
    file = Path(data) if data else run_dir / "splits" / f"{split}.csv"
    by_reference = not data and not file.is_file() and (run_dir / "splits" / "splits.json").is_file()
    if not data and not file.is_file() and not by_reference:
        raise UserError(
            f"{run_dir} lacks its saved splits ({file}); pass a directory written by lora-dist train, "
            f"or --data with a labelled file"
        )
    clf = Classifier.from_pretrained(run_dir, device=device, precision=precision)
    note = precision_note(precision, clf.precision, clf.device)
    if note:
        print(note, file=sys.stderr, flush=True)
    labels = clf.labels
    if by_reference:
        ids, target = _split_ids(run_dir, split, labels)
        logits = clf.logits_of(ids, batch_size)
    else:
        target, logits = _file_logits(clf, file, batch_size)
    k = len(labels)
    confusion = torch.bincount(target * k + logits.argmax(-1), minlength=k * k).view(k, k).tolist()
    loss = F.cross_entropy(logits, target).item() if len(target) else 0.0
    return {
        "source": str(data) if data else split,
        "loss": loss,
        **scores(confusion, labels),
        "confusion": confusion,
        "classes": labels,
        "precision": clf.precision,
    }


def _file_logits(clf: Classifier, file: Path, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    frame = read_table(file)
    labels = clf.labels
    unknown = sorted(set(frame["label"]) - set(labels))
    if unknown:
        raise UserError(
            f"{file} has label {unknown[0]!r}, which is not one of the model's labels {labels}; "
            f"relabel the file or evaluate a model trained on these labels"
        )
    target = torch.tensor([labels.index(x) for x in frame["label"]])
    return target, clf.logits(frame["text"].tolist(), batch_size)  # (N, classes)


def _split_ids(run_dir: Path, split: str, labels: list[str]) -> tuple[list[list[int]], torch.Tensor]:
    """A split the run recorded by reference (splits/splits.json, index.npz): its rows' token ids from the cache."""
    record, index = read_split_record(run_dir)
    cfg = load_config(run_dir / "config.yaml").data
    cache = open_cache(cfg, cache_limit(cfg), say=lambda m: print(m, file=sys.stderr))
    if cache.key != record["cache"]["key"]:
        raise UserError(
            f"data.source={cfg.source} changed since {run_dir} was trained (its token cache key was "
            f"{record['cache']['key'][:12]}, now {cache.key[:12]}); evaluate with --data FILE instead"
        )
    rows = index[split]
    off = cache.offsets
    ids = [cache.ids[off[r] : off[r + 1]].tolist() for r in rows]
    names = cache.label_names
    target = torch.tensor([labels.index(names[i]) for i in cache.labels[rows]], dtype=torch.long)
    return ids, target


def format_result(r: dict) -> str:
    """A few plain lines for the terminal: accuracy, per-class and macro scores, the confusion matrix."""
    classes = r["classes"]
    width = max(18, *(len(c) for c in classes))
    cell = max(8, *(len(c) for c in classes))
    head = "true \\ predicted"
    rows = [f"  {head:>{width}} " + " ".join(f"{c:>{cell}}" for c in classes)]
    rows += [
        f"  {name:>{width}} " + " ".join(f"{n:>{cell},}" for n in row)
        for name, row in zip(classes, r["confusion"], strict=True)
    ]
    per = [
        f"  {name:>{width}}  precision {v['precision'] * 100:6.2f}%  recall {v['recall'] * 100:6.2f}%  "
        f"F1 {v['f1'] * 100:6.2f}%  ({v['support']:,} messages)"
        for name, v in r["per_class"].items()
    ]
    m = r["macro"]
    per.append(
        f"  {'macro':>{width}}  precision {m['precision'] * 100:6.2f}%  recall {m['recall'] * 100:6.2f}%  "
        f"F1 {m['f1'] * 100:6.2f}%"
    )
    return "\n".join(
        [
            f"{r['source']}: {r['count']:,} messages, loss {r['loss']:.4f}, accuracy {r['accuracy'] * 100:.2f}%",
            *per,
            "confusion matrix:",
            *rows,
        ]
    )


def main(
    run_dir: str,
    split: str = "test",
    data: str | None = None,
    device: str = "auto",
    as_json: bool = False,
    precision: str = "fp32",
    batch_size: int = 32,
) -> int:
    result = evaluate_run(Path(run_dir), split, data, device, batch_size, precision)
    print(json.dumps(result, indent=2) if as_json else format_result(result))
    return 0
