"""Classify messages with a trained adapter: the Python API behind `lora-dist classify` and `eval`.

    from lora_dist import Classifier
    clf = Classifier.from_pretrained("runs/smoke")             # a run, its adapter/, or a PEFT export
    clf.predict(["WINNER!! Claim your prize", "see you at 6"])  # [{"text", "label", "probs"}, ...]
    clf.logits(["see you at 6"])                                 # (N, classes) tensor

The model is the one training built (`build.load_trained`), messages are tokenized, truncated and padded as
in training, and run in batches sorted by length, so a batch holds little padding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .adapter import AdapterSpec
from .errors import UserError


class Classifier:
    def __init__(self, model, spec: AdapterSpec, device: str | torch.device = "auto", precision: str = "auto",
                 merge: bool = False):
        from .strategy import pick_device, resolve_precision

        self.spec = spec
        self.device = pick_device(device, 0) if isinstance(device, str) else device
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}")
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise UserError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.model = model.to(self.device)
        self.merged = False
        if merge:
            self.merge()
        self.truncated = 0  # messages cut to max_length by the last call

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", precision: str = "auto", merge: bool = False,
                        base: str | None = None) -> "Classifier":
        """PATH: a training run, its adapter/ (or weights/) directory, or a PEFT export of one."""
        spec, tensors, source = read(path, base)
        from .build import load_trained

        return cls(load_trained(spec, tensors, source, base), spec, device, precision, merge)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def merge(self) -> None:
        """Fold LoRA into the base weights (inference only; exact up to rounding in the weights' dtype)."""
        from .lora import merge

        merge(self.model)
        self.merged = True

    # --------------------------------------------------------------------------------------- batches
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as in training: text only (never control tokens), truncated to max_length."""
        from .tokenizer import get_tokenizer

        if isinstance(texts, str):
            raise TypeError("pass a list of messages, not one string")
        tok, limit = get_tokenizer(), self.spec.max_length
        ids = tok.encode_batch([str(t) for t in texts], disallowed_special=())
        self.truncated = sum(len(i) > limit for i in ids)
        return [i[:limit] for i in ids]

    def batches(self, ids: list[list[int]], batch_size: int):
        """(positions, Batch) over `ids`, longest first, each batch padded as in training."""
        from .data import Collate

        collate = Collate(self.spec.pad_token_id, self.spec.pad_to)
        if self.spec.pad_to is None and not padding_free(self.spec):
            batch_size = 1  # padding would change what the head reads: each message alone, as it trained
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            yield chunk, collate([(ids[i], 0) for i in chunk])

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 32, progress: bool | None = False) -> torch.Tensor:
        """(N, classes) fp32 logits, in input order."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1; got {batch_size}")
        ids = self.encode(texts)
        out = torch.empty(len(ids), len(self.spec.labels))
        bar = _progress(len(ids), progress)
        for chunk, batch in self.batches(ids, batch_size):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
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


def padding_free(spec: AdapterSpec) -> bool:
    """Whether right-padding leaves a message's prediction unchanged: causal attention read at the last
    real token, the first token, or the mean over real tokens."""
    return spec.causal_mask and spec.pooling in ("last_real", "first", "mean")


def results(texts: list[str], probs: torch.Tensor, labels) -> list[dict]:
    """The objects `predict`, `classify --json` and the service return, one per message."""
    best = probs.argmax(dim=-1).tolist()
    rows = probs.tolist()
    return [{"text": t, "label": labels[b], "probs": {label: p for label, p in zip(labels, row)}}
            for t, b, row in zip(texts, best, rows)]


def read(path: str | Path, base: str | None = None) -> tuple[AdapterSpec, dict[str, torch.Tensor], str]:
    """(description, tensors in lora-dist's names, source) of a run, an adapter, or a PEFT adapter (whose
    base `base` replaces the one it names)."""
    from . import adapter as adapters
    from .export import is_peft_dir, read_peft

    if is_peft_dir(path):
        spec, tensors = read_peft(Path(path), base)
        return spec, tensors, str(path)
    a = adapters.find(path)
    return a.spec, a.tensors(), str(a.tensor_file)


def _progress(total: int, enabled: bool | None):
    """A tqdm bar on stderr: None (off), or True / None for "on a terminal, for large inputs"."""
    if enabled is False or (enabled is None and (total < 1000 or not sys.stderr.isatty())):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="msg", file=sys.stderr, dynamic_ncols=True, leave=False)
