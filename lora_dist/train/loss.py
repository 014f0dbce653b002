"""The training loss: cross-entropy, weighted per class under data.balance=weight.

    python -c "import torch; from lora_dist.train.loss import loss; print(loss(torch.zeros(2, 2), torch.tensor([0, 1])))"

Weighted, it is the mean over the micro-batch's messages of weight[label] x cross-entropy (Keras' class_weight),
not torch's weighted mean, which divides by the batch's sum of weights: so a global batch's loss (and gradient)
is the same however it is cut into ranks and micro-batches, as the unweighted loss is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` (float) against `labels`, each message weighted by `weight[label]`."""
    if weight is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, weight=weight, reduction="sum") / labels.shape[0]
