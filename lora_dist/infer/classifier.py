"""Classify messages with a trained adapter: the Python API behind `lora-dist classify` and `eval`.

    from lora_dist import Classifier
    clf = Classifier.from_pretrained("runs/smoke")             # a run, its adapter/, or a PEFT export
    clf.predict(["WINNER!! Claim your prize", "see you at 6"])  # [{"text", "label", "probs"}, ...]
    clf.logits(["see you at 6"])                                 # (N, classes) tensor

The model is the one training built (`build.read_adapter`, `build.load_trained`); messages are tokenized,
truncated and padded as in training, and run in batches sorted by length, so a batch holds little padding
(`infer/batching.py`, shared with `MultiAdapterClassifier`). It computes in fp32 unless `precision` says otherwise
(`auto`: bf16 where the hardware runs it natively; faster, and probabilities move by up to about 1e-2).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapter import AdapterSpec
from ..build import load_trained, read_adapter
from ..data import Batch
from ..device import autocast, bound_kernel_caches, pick_device, resolve_precision
from ..errors import UserError
from ..lora import merge as merge_lora
from ..model import GPT2
from .batching import plan, tokenize


class Classifier:
    def __init__(
        self,
        model: GPT2,
        spec: AdapterSpec,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        merge: bool = False,
    ) -> None:
        bound_kernel_caches()  # before the first forward pass: memory stays flat over a long run of shapes
        self.spec = spec
        self.device = pick_device(device, key="device")
        self.precision = resolve_precision(precision, self.device, key="precision")
        self.model = model.to(self.device)
        self.merged = False
        if merge:
            self.merge()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        merge: bool = False,
        base: str | None = None,
        labels: str | list[str] | None = None,
    ) -> Classifier:
        """PATH: a training run, its adapter/ (or weights/) directory, or a PEFT export of one. `labels`: names for
        the classes of an adapter that has none (LABEL_0, LABEL_1, ...), e.g. ["ham", "spam"]."""
        spec, tensors, source = read_adapter(path, base, labels)
        dev = pick_device(device, key="device")
        return cls(load_trained(spec, tensors, source, base, device=dev), spec, dev, precision, merge)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def merge(self) -> None:
        """Fold LoRA into the base weights (inference only; exact up to rounding in the weights' dtype)."""
        merge_lora(self.model)
        self.merged = True

    # --------------------------------------------------------------------------------------- batches
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as in training (`data.encode`), truncated to the adapter's max_length."""
        return self.tokenize(texts)[0]

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """(token ids, how many messages were cut to the adapter's max_length); `logits_of` takes the ids."""
        return tokenize(texts, [self.spec.max_length] * len(texts))

    def batches(self, ids: list[list[int]], batch_size: int) -> Iterator[tuple[list[int], Batch]]:
        """(positions, Batch) over `ids`, longest first, each batch padded as in training (`batching.plan`)."""
        return plan(ids, [self.spec] * len(ids), batch_size)

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 32, progress: bool | None = False) -> torch.Tensor:
        """(N, classes) fp32 logits, in input order."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1; got {batch_size}")
        return self.logits_of(self.encode(texts), batch_size, progress)

    @torch.inference_mode()
    def logits_of(self, ids: list[list[int]], batch_size: int = 32, progress: bool | None = False) -> torch.Tensor:
        """(N, classes) fp32 logits of token ids (cut to the adapter's max_length, as `encode` cuts), in input order."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1; got {batch_size}")
        ids = [i[: self.spec.max_length] for i in ids]
        out = torch.empty(len(ids), len(self.spec.labels))
        bar = _progress(len(ids), progress)
        for chunk, batch in self.batches(ids, batch_size):
            with autocast(self.device, self.precision):
                logits = self.model(batch.ids.to(self.device), batch.last.to(self.device))  # (B, classes)
            out[chunk] = logits.float().cpu()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def predict(self, texts: list[str], batch_size: int = 32, progress: bool | None = False) -> list[dict]:
        """[{"text", "label", "probs": {label: p}}], in input order."""
        probs = self.logits(texts, batch_size, progress).softmax(dim=-1)
        return results(texts, probs, self.spec.labels)


def results(texts: Sequence[str], probs: torch.Tensor, labels: Sequence[str]) -> list[dict]:
    """The objects `predict`, `classify --json` and the service return, one per message."""
    best = probs.argmax(dim=-1).tolist()
    rows = probs.tolist()
    return [
        {"text": t, "label": labels[b], "probs": {label: p for label, p in zip(labels, row, strict=True)}}
        for t, b, row in zip(texts, best, rows, strict=True)
    ]


def _progress(total: int, enabled: bool | None) -> tqdm | None:
    """A tqdm bar on stderr: None (off), or True / None for "on a terminal, for large inputs"."""
    if enabled is False or (enabled is None and (total < 1000 or not sys.stderr.isatty())):
        return None
    return tqdm(total=total, unit="msg", file=sys.stderr, dynamic_ncols=True, leave=False)
