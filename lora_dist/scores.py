"""Classification scores from a confusion matrix: accuracy, and precision, recall and F1 per class and macro.

    python -c "from lora_dist.scores import scores; print(scores([[134, 15], [14, 137]], ['ham', 'spam']))"

A confusion matrix here is `confusion[true][predicted]`, as `results.json` stores it: for the SMS data,
[[ham->ham, ham->spam], [spam->ham, spam->spam]].
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("precision", "recall", "f1")


def scores(confusion: Sequence[Sequence[int]], labels: Sequence[str] | None = None) -> dict:
    """{"count", "accuracy", "per_class": {label: {precision, recall, f1, support}}, "macro": {precision,
    recall, f1}}. A precision or recall with nothing to divide by is 0.0 (scikit-learn's zero_division=0)."""
    k = len(confusion)
    if k < 2 or any(len(row) != k for row in confusion):
        raise ValueError(f"a confusion matrix must be square and at least 2x2, got {confusion!r}")
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    if len(labels) != k:
        raise ValueError(f"{len(labels)} labels for a {k}x{k} confusion matrix")
    total = sum(sum(row) for row in confusion)
    per_class = {}
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        predicted = sum(confusion[i][c] for i in range(k))  # tp + fp
        actual = sum(confusion[c])  # tp + fn
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    macro = {m: sum(v[m] for v in per_class.values()) / k for m in METRICS}
    return {
        "count": total,
        "accuracy": sum(confusion[i][i] for i in range(k)) / total if total else 0.0,
        "per_class": per_class,
        "macro": macro,
    }
