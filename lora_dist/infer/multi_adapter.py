"""Many trained adapters over one frozen base, a batch mixing them in one forward pass (what `serve` runs).

    from lora_dist import MultiAdapterClassifier
    m = MultiAdapterClassifier.from_pretrained(None, {"spam": "runs/a", "support": "runs/b"})
    m.predict(["WINNER!! Claim your prize", "my order never came"], adapters=["spam", "support"])

`base`: None (the base each adapter names) or a directory holding it, as `Classifier.from_pretrained`'s.
The model is the one training builds (`build.build_model(..., trainable="none")`, base checked by `build.base_config`); each
adapter's tensors are checked against its own model structure by `lora.load_adapter_state_dict` (on the
meta device: no copy of the base), then stacked by `multi_lora`. Each row gives what that adapter alone
gives through `Classifier` (to float rounding), labels, truncation and padding included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..adapter import AdapterSpec, default_labels, with_labels
from ..build import base_config, build_device, build_model, check_fits, read_adapter
from ..data import Collate, batch_plan, encode
from ..device import autocast, pick_device, resolve_precision
from ..errors import UserError
from ..lora import load_adapter_state_dict
from ..multi_lora import Rows, stack_adapters
from .classifier import results

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Loaded:
    """One adapter as read from disk and checked: its name, description, tensors and where it came from."""

    name: str
    spec: AdapterSpec
    tensors: dict
    source: str


def read_adapters(
    adapters: dict[str, str | Path], base: str | Path | None = None, labels: Mapping[str, str | list[str]] | None = None
) -> list[Loaded]:
    """Read and check every adapter (cheap: no base weights): names, kinds, one base, one input rule. `base`: the
    directory holding the base, for PEFT adapters that name none (or another); `labels`: {adapter name: names for
    its classes}, for adapters that name none (LABEL_0, LABEL_1, ...); key "*": for every such adapter."""
    labels = labels or {}
    unknown = sorted(set(labels) - set(adapters) - {"*"})
    if unknown:
        raise UserError(f"labels are given for {unknown[0]!r}, which is not among the adapters ({', '.join(adapters)})")
    if not adapters:
        raise UserError("no adapters given; name at least one, e.g. spam=runs/smoke")
    out = []
    for name, path in adapters.items():
        if not NAME.match(name):
            raise UserError(
                f"adapter name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        spec, tensors, source = read_adapter(path, None if base is None else str(base), labels.get(name))
        if name not in labels and "*" in labels and default_labels(spec.labels):  # labels for any that has none
            spec = with_labels(spec, labels["*"], source)
        if spec.kind != "lora":
            raise UserError(
                f"adapter '{name}' ({source}) trains whole layers (train.trainable={spec.trainable}), which "
                f"replace base weights; only LoRA adapters share a base: use `lora-dist classify` for it"
            )
        if spec.overrides:
            raise UserError(
                f"adapter '{name}' ({source}) replaces base tensors ({', '.join(spec.overrides[:3])}); "
                f"only adapters that leave the base untouched can share it"
            )
        out.append(Loaded(name, spec, tensors, source))
        lora_parts(out[-1])  # its structure, on the meta device: a misfit is refused before anything is built
    first = out[0]
    for a in out[1:]:
        why = first.spec.base.mismatch(a.spec.base)
        if why:
            raise UserError(
                f"adapter '{a.name}' ({a.source}) was trained on {a.spec.base.describe()}, but adapter "
                f"'{first.name}' ({first.source}) on {first.spec.base.describe()} ({why}); serve adapters "
                f"of one base together, one service per base"
            )
        for key in ("pooling", "causal_mask"):
            if getattr(a.spec, key) != getattr(first.spec, key):
                raise UserError(
                    f"adapter '{a.name}' reads the model with {key}={getattr(a.spec, key)}, adapter "
                    f"'{first.name}' with {key}={getattr(first.spec, key)}; serve them separately"
                )
    return out


def lora_parts(a: Loaded) -> tuple[dict[str, tuple], tuple[torch.Tensor, torch.Tensor]]:
    """({layer: (A, B, scale)}, (head weight, head bias)) of one adapter, its head's LoRA folded in (fp32)."""
    cfg = a.spec.to_config()
    structure = replace(cfg.model, weights="random", name=a.spec.base.name)
    with torch.device("meta"):  # the adapter's own model structure: names and shapes, no weights
        model, wrapped = build_model(replace(cfg, model=structure), len(a.spec.labels))
    check_fits(a.spec, model, a.source)
    load_adapter_state_dict(model, a.tensors, source=a.source)
    assert a.spec.lora is not None  # read_adapters keeps LoRA adapters only
    t, scale = a.tensors, float(a.spec.lora["scale"])
    layers = {n: (t[f"{n}.lora.A"], t[f"{n}.lora.B"], scale) for n in wrapped if n != "head"}
    if "head" in wrapped:
        w = t["head.linear.weight"].float() + scale * (t["head.lora.A"].float() @ t["head.lora.B"].float()).t()
        return layers, (w, t["head.linear.bias"].float())
    return layers, (t["head.weight"].float(), t["head.bias"].float())


class MultiAdapterClassifier:
    def __init__(self, model, adapters: list[Loaded], rows, device: torch.device, precision: str):
        self.model, self.rows, self.device, self.precision = model, rows, device, precision
        self.specs = {a.name: a.spec for a in adapters}
        self.number = {a.name: i for i, a in enumerate(adapters)}
        self.sources = {a.name: a.source for a in adapters}

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None,
        adapters: dict[str, str | Path],
        *,
        device: str = "auto",
        precision: str = "fp32",
        labels: Mapping[str, str | list[str]] | None = None,
    ) -> MultiAdapterClassifier:
        """`labels`: {adapter name: names for its classes}, for adapters that name none (LABEL_0, LABEL_1, ...)."""
        return cls.from_loaded(read_adapters(adapters, base, labels), base, device=device, precision=precision)

    @classmethod
    def from_loaded(
        cls, loaded: list[Loaded], base: str | Path | None = None, *, device: str = "auto", precision: str = "fp32"
    ) -> MultiAdapterClassifier:
        parts = [lora_parts(a) for a in loaded]
        first = loaded[0]
        cfg = base_config(first.spec, first.source, None if base is None else str(base))
        dev = pick_device(device, key="device")
        where = build_device(first.spec, first.source, dev)
        model, _ = build_model(cfg, len(first.spec.labels), trainable="none", device=where)  # the bare frozen base
        precision = resolve_precision(precision, dev, key="precision")
        model = model.eval().to(dev)
        rows = Rows()
        stack_adapters(model, [p[0] for p in parts], [p[1] for p in parts], rows)
        return cls(model, loaded, rows, dev, precision)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def labels(self, name: str) -> list[str]:
        return list(self.specs[name].labels)

    def check(self, adapters: list[str]) -> None:
        unknown = sorted(set(adapters) - set(self.specs))
        if unknown:
            raise UserError(f"unknown adapter {unknown[0]!r}; loaded: {', '.join(self.specs)}")

    # --------------------------------------------------------------------------------------- batches
    def encode(self, texts: list[str], adapters: list[str]) -> list[list[int]]:
        """Token ids as in training (`data.encode`), each truncated to its adapter's max_length."""
        ids, _ = encode(texts)
        return [i[: self.specs[a].max_length] for i, a in zip(ids, adapters, strict=True)]

    def batches(self, ids: list[list[int]], adapters: list[str], batch_size: int):
        """(positions, Batch) over `ids`, as `Classifier.batches` makes them: rows share a padded batch when
        padding changes nothing (`AdapterSpec.padding_free`), else per (pad length, pad token), and with no
        pad length each row alone. Inside a batch rows go by adapter: one LoRA segment per adapter."""
        groups = []
        for i, a in enumerate(adapters):
            s = self.specs[a]
            groups.append(() if s.padding_free() else ((s.pad_to, s.pad_token_id) if s.pad_to else ("alone", i)))
        number = [self.number[a] for a in adapters]
        for chunk in batch_plan([len(i) for i in ids], batch_size, groups, order=number):
            s = self.specs[adapters[chunk[0]]]
            yield chunk, Collate(s.pad_token_id, s.pad_to)([(ids[i], 0) for i in chunk])

    @torch.inference_mode()
    def logits(self, texts: list[str], adapters: list[str] | str, batch_size: int = 32) -> torch.Tensor:
        """(N, most labels) fp32 logits in input order; a row's labels past its adapter's own are -inf."""
        if isinstance(texts, str):
            raise TypeError("pass a list of messages, not one string")
        adapters = [adapters] * len(texts) if isinstance(adapters, str) else list(adapters)
        if len(adapters) != len(texts):
            raise UserError(f"{len(texts)} messages but {len(adapters)} adapter names; give one per message")
        self.check(adapters)
        ids = self.encode(texts, adapters)
        out = torch.empty(len(ids), self.model.head.W.shape[1])
        number = torch.tensor([self.number[a] for a in adapters], dtype=torch.long)
        for chunk, batch in self.batches(
            ids, adapters, batch_size
        ):  # the model packs a batch: its padding costs nothing
            self.rows.set(number[chunk].to(self.device), [max(len(ids[i]), 1) for i in chunk])
            with autocast(self.device, self.precision):
                logits = self.model(batch.ids.to(self.device), batch.last.to(self.device))  # (B, L_max)
            out[chunk] = logits.float().cpu()
        return out

    def predict(self, texts: list[str], adapters: list[str] | str, batch_size: int = 32) -> list[dict]:
        """[{"text", "adapter", "label", "probs": {label: p}}] in input order, each over its adapter's labels."""
        adapters = [adapters] * len(texts) if isinstance(adapters, str) else list(adapters)
        probs = self.logits(texts, adapters, batch_size).softmax(dim=-1)
        out = []
        for i, (t, a) in enumerate(zip(texts, adapters, strict=True)):
            labels = self.specs[a].labels
            row = results([t], probs[i : i + 1, : len(labels)], labels)[0]
            out.append({"text": t, "adapter": a, "label": row["label"], "probs": row["probs"]})
        return out
