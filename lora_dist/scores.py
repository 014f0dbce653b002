"""Classification scores from a confusion matrix: accuracy, and precision, recall and F1 for one class.

    python -c "from lora_dist.scores import scores; print(scores([[134, 15], [14, 137]]))"

A confusion matrix here is `confusion[true][predicted]`, as `results.json` stores it: for the SMS data,
[[ham->ham, ham->spam], [spam->ham, spam->spam]]. The positive class is spam (index 1).
"""

from __future__ import annotations

from typing import Sequence

SPAM = 1


def scores(confusion: Sequence[Sequence[int]], positive: int = SPAM) -> dict:
    """Accuracy over all classes; precision, recall and F1 of `positive` (0.0 where undefined)."""
    k = len(confusion)
    if k < 2 or any(len(row) != k for row in confusion):
        raise ValueError(f"a confusion matrix must be square and at least 2x2, got {confusion!r}")
    total = sum(sum(row) for row in confusion)
    correct = sum(confusion[i][i] for i in range(k))
    tp = confusion[positive][positive]
    predicted = sum(confusion[i][positive] for i in range(k))  # tp + fp
    actual = sum(confusion[positive])  # tp + fn
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"count": total, "accuracy": correct / total if total else 0.0,
            "precision": precision, "recall": recall, "f1": f1}
