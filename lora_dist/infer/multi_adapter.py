"""Many trained adapters over one frozen base, a batch mixing them in one forward pass (what `serve` runs).

    from lora_dist import MultiAdapterClassifier
    m = MultiAdapterClassifier.from_pretrained(None, {"spam": "runs/a", "support": "runs/b"})
    m.predict(["WINNER!! Claim your prize", "my order never came"], adapters=["spam", "support"])

`base`: None (the base each adapter names) or a directory holding it, as `Classifier.from_pretrained`'s.
The model is the one training builds (`build.build_model(..., trainable="none")`, base checked by `build.base_config`); each
adapter's tensors are checked against its own model structure by `lora.load_adapter_state_dict` (on the
meta device: no copy of the base), then stacked by `multi_lora`. Each row gives what that adapter alone
gives through `Classifier` (to float rounding), labels, truncation and padding included.

A directory (a sweep's output) instead of a dict serves every adapter under it, each read when first asked
for, at most `max_loaded` resident, least recently used evicted (`adapter_store`):

    m = MultiAdapterClassifier.from_pretrained(None, "runs/sweep", max_loaded=64)
    m.predict(["see you at 6"], adapters="adapters/lr-0.001")
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..adapter import AdapterSpec, default_labels, with_labels
from ..build import base_config, build_device, build_model, check_fits, read_adapter
from ..data import Batch
from ..device import autocast, bound_kernel_caches, pick_device, resolve_precision
from ..errors import UserError
from ..lora import adapter_from_state, adapter_state_dict, base_key, load_adapter_state_dict
from ..multi_lora import Rows, stack_adapters
from .adapter_store import Catalog, Entry, Gone, Layout, Parts, Slots, Unavailable, materialize, read_raw, valid_name
from .batching import plan, tokenize
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
        if not valid_name(name):
            raise UserError(
                f"adapter name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit "
                f"(or several such, joined by '/')"
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
    layers = {n: adapter_from_state(t, n, scale).factors() for n in wrapped if n != "head"}
    if "head" in wrapped:
        w = t[base_key("head")].float() + adapter_from_state(t, "head", scale).delta_weight()
        return layers, (w, t[base_key("head", "bias")].float())
    return layers, (t["head.weight"].float(), t["head.bias"].float())


_SHAPES: OrderedDict[str, dict[str, tuple]] = OrderedDict()
_SHAPES_LOCK = threading.Lock()


def expected_shapes(spec: AdapterSpec) -> dict[str, tuple]:
    """{tensor name: shape} an adapter of this description holds (its model built on the meta device, once
    per structure: a sweep's thousand adapters share one)."""
    key = json.dumps(
        [spec.lora, len(spec.labels), spec.base.name, spec.base.context_length, spec.pooling, spec.causal_mask],
        sort_keys=True,
        default=str,
    )
    with _SHAPES_LOCK:
        if key not in _SHAPES:
            cfg = spec.to_config()
            structure = replace(cfg.model, weights="random", name=spec.base.name)
            with torch.device("meta"):
                model, _ = build_model(replace(cfg, model=structure), len(spec.labels))
            _SHAPES[key] = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
            while len(_SHAPES) > 32:
                _SHAPES.popitem(last=False)
        _SHAPES.move_to_end(key)
        return _SHAPES[key]


class MultiAdapterClassifier:
    """Adapters over one base. Made from a list of adapters, all are stacked at once and stay; made from a
    `Catalog` (a directory), `slots` holds at most `max_loaded` of them, loaded when first asked for."""

    def __init__(self, model: Any, adapters: list[Loaded], rows: Rows, device: torch.device, precision: str):
        bound_kernel_caches()  # before the first forward pass: memory stays flat over a long run of shapes
        self.model, self.rows, self.device, self.precision = model, rows, device, precision
        self._specs = {a.name: a.spec for a in adapters}
        self.number = {a.name: i for i, a in enumerate(adapters)}
        self.sources = {a.name: a.source for a in adapters}
        self.catalog: Catalog | None = None
        self.slots: Slots | None = None
        self.base: str | None = None
        self.staged: OrderedDict[str, Parts] = OrderedDict()  # read off the model thread, not yet in a slot
        self.staged_lock = threading.Lock()
        self.on: Callable[..., None] = lambda event, name, seconds=0.0: None  # hit, miss, load, evict, stale
        self.log: Callable[[str], None] = lambda msg: None
        self.startup: dict[str, float] = {}  # seconds of each stage of `from_catalog` (bench/serve_many.py --micro)

    @property
    def specs(self) -> dict[str, AdapterSpec]:
        if self.catalog is None:
            return self._specs
        return {n: e.spec for n, e in self.catalog.entries.items()}

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None,
        adapters: dict[str, str | Path] | str | Path,
        *,
        device: str = "auto",
        precision: str = "fp32",
        max_loaded: int | None = None,
        max_adapter_memory: int | None = None,
        labels: Mapping[str, str | list[str]] | None = None,
    ) -> MultiAdapterClassifier:
        """`adapters`: {name: path}, or a directory (every adapter under it, named by its relative path). With a
        directory, or with `max_loaded` / `max_adapter_memory` (bytes), adapters load on demand, LRU-bounded.
        `labels`: {adapter name: names for its classes}, for named adapters that name none (LABEL_0, LABEL_1, ...)."""
        if isinstance(adapters, (str, Path)) or max_loaded is not None or max_adapter_memory is not None:
            if labels:
                raise UserError("labels= names the classes of adapters given by name, not of adapters loaded on demand")
            root, named = (Path(adapters), {}) if isinstance(adapters, (str, Path)) else (None, dict(adapters))
            catalog = Catalog(root, {k: Path(v) for k, v in named.items()}, None if base is None else str(base))
            return cls.from_catalog(
                catalog,
                base,
                device=device,
                precision=precision,
                max_loaded=max_loaded or 64,
                max_adapter_memory=max_adapter_memory,
            )
        return cls.from_loaded(read_adapters(adapters, base, labels), base, device=device, precision=precision)

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        base: str | Path | None = None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        max_loaded: int = 64,
        max_adapter_memory: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> MultiAdapterClassifier:
        """The base with `max_loaded` empty adapter slots (fewer if `max_adapter_memory` bytes hold fewer), the
        layers wrapped being those the catalog's adapters adapt; no adapter tensor is read here."""
        if log is not None:
            catalog.log = log
        if not catalog.entries:
            catalog.scan()
        if not catalog.entries:
            where = catalog.root if catalog.root is not None else "the adapters named"
            raise UserError(f"no usable adapter in {where}; point at a sweep's or a run's output directory")
        specs = [e.spec for e in catalog.entries.values()]
        first = next(iter(catalog.entries.values()))
        cfg = base_config(first.spec, first.source, None if base is None else str(base))
        dev = pick_device(device, key="device")
        t0 = time.perf_counter()
        model, _ = build_model(
            cfg, len(first.spec.labels), trainable="none", device=build_device(first.spec, first.source, dev)
        )
        precision = resolve_precision(precision, dev, key="precision")
        model = model.eval().to(dev)
        t1 = time.perf_counter()
        names = sorted({t for s in specs for t in s.lora["targets"] if t != "head"})  # type: ignore[index]
        shapes: dict[str, tuple[int, int]] = {}
        for n in names:
            linear: Any = model.get_submodule(n)
            shapes[n] = (int(linear.in_features), int(linear.out_features))
        rank = max(s.lora["rank"] for s in specs)  # type: ignore[index]
        labels = max(len(s.labels) for s in specs)
        width = int(model.head.in_features)
        per_slot = 4 * (sum(rank * (i + o) for i, o in shapes.values()) + labels * (width + 1))
        n = max_loaded
        if max_adapter_memory is not None:
            n = min(n, max_adapter_memory // per_slot)
            if n < 1:
                raise UserError(
                    f"--max-adapter-memory {max_adapter_memory} bytes holds no adapter; one takes {per_slot} bytes"
                )
        # the stacked layers' shapes come from one empty adapter of the largest rank; the other slots start as
        # zeros with no layer (rank 0), copied into by nothing
        empty = {k: (torch.zeros(i, rank), torch.zeros(rank, o), 1.0) for k, (i, o) in shapes.items()}
        rows = Rows()
        heads = [(torch.zeros(labels, width), torch.zeros(labels))] * n
        stack_adapters(model, [empty] + [{}] * (n - 1), heads, rows)
        self = cls(model, [], rows, dev, precision)
        self.startup = {"base_s": t1 - t0, "slots_s": time.perf_counter() - t1}
        self.slots = Slots(model, n, on=lambda event, name: self.on(event, name))
        for m in self.slots.layers.values():
            m.rank = [0] * n
        self.catalog, self.base = catalog, None if base is None else str(base)
        catalog.layout = Layout(shapes, rank, labels, model.cfg.context_length, model.cfg.vocab_size)
        for name, e in list(catalog.entries.items()):  # the base's context and vocabulary are known now
            why = catalog.layout.misfit(e.spec)
            if why:
                catalog.log(f"adapter '{name}' left out: {e.source}: {why}")
                catalog.entries = {k: v for k, v in catalog.entries.items() if k != name}
        if not catalog.entries:
            raise UserError("no adapter fits its base (see the lines above)")
        return self

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
        specs = self.specs
        unknown = sorted(set(adapters) - set(specs))
        if unknown:
            some = ", ".join(list(specs)[:10]) + (f" and {len(specs) - 10} more" if len(specs) > 10 else "")
            # with a directory, an adapter a reload removed while its request waited: Gone (the service's 404)
            error = UserError if self.catalog is None else Gone
            raise error(f"unknown adapter {unknown[0]!r}; loaded: {some}")

    # ------------------------------------------------------------------------------------ on demand
    def read(self, e: Entry) -> Parts:
        """`e`'s tensors read from disk, parsed and checked (any thread: no torch compute op), ready for a slot;
        PEFT's adapters are read here and converted on the model thread (`make_resident`)."""
        t0 = time.perf_counter()
        parts = read_raw(e)
        if not e.peft:
            materialize(parts, expected_shapes, self.base)
        self.on("load", e.name, time.perf_counter() - t0)
        return parts

    def stage(self, parts: Parts) -> None:
        """Keep `parts` for the model thread to put in a slot (at most 2 x slots + 8 wait; the oldest go)."""
        assert self.slots is not None
        with self.staged_lock:
            self.staged[parts.entry.name] = parts
            while len(self.staged) > 2 * self.slots.n + 8:
                self.staged.popitem(last=False)

    def resident(self, name: str) -> Entry | None:
        """The version of `name` in a slot, if any (any thread)."""
        got = self.slots.resident.get(name) if self.slots is not None else None
        return got[1] if got is not None else None

    def is_current(self, name: str, e: Entry) -> bool:
        """Whether the model thread needs no read for `e`: in a slot, or staged."""
        if self.resident(name) is e:
            return True
        with self.staged_lock:
            p = self.staged.get(name)
        return p is not None and p.entry is e

    def make_resident(self, group: list[str]) -> dict[str, tuple[int, Entry]]:
        """{name: (slot, version)} for `group` (at most `slots.n` names): hits, staged parts or a read now."""
        assert self.slots is not None and self.catalog is not None
        out, keep = {}, set(group)
        for name in group:
            e = self.catalog.entries.get(name)
            old = self.slots.resident.get(name)
            if e is None:  # no longer listed (a reload removed it)
                if old is not None:
                    self.slots.drop(name)
                raise Gone(f"adapter '{name}' was removed")
            if old is not None and old[1] is e:
                self.slots.touch(name)
                out[name] = old
                continue
            with self.staged_lock:
                parts = self.staged.pop(name, None)
            try:
                if parts is None or parts.entry is not e:
                    parts = self.read(e)
                slot = self.slots.put(materialize(parts, expected_shapes, self.base), keep)
            except Unavailable as err:
                if old is None:
                    raise
                self.log(f"{err}; serving the version loaded before")
                self.on("stale", name)
                self.slots.touch(name)
                out[name] = old
                continue
            out[name] = (slot, e)
        return out

    def forget(self, names: list[str]) -> None:
        """Evict `names` (removed from the catalog); model thread."""
        if self.slots is not None:
            for n in names:
                self.slots.drop(n)

    # --------------------------------------------------------------------------------------- batches
    def encode(
        self, texts: list[str], adapters: list[str], specs: Mapping[str, AdapterSpec] | None = None
    ) -> list[list[int]]:
        """Token ids as in training (`data.encode`), each truncated to its adapter's max_length."""
        return self.tokenize(texts, adapters, specs)[0]

    def tokenize(
        self, texts: list[str], adapters: list[str], specs: Mapping[str, AdapterSpec] | None = None
    ) -> tuple[list[list[int]], int]:
        """(token ids, how many messages were cut), each message cut to its adapter's max_length."""
        specs = specs or self.specs
        return tokenize(texts, [specs[a].max_length for a in adapters])

    def batches(
        self,
        ids: list[list[int]],
        adapters: list[str],
        batch_size: int,
        specs: Mapping[str, AdapterSpec] | None = None,
        number: Mapping[str, int] | None = None,
    ) -> Iterator[tuple[list[int], Batch]]:
        """(positions, Batch) over `ids`, as `Classifier.batches` makes them (`batching.plan`); inside a batch
        rows go by adapter: one LoRA segment per adapter."""
        specs, number = specs or self.specs, number or self.number
        return plan(ids, [specs[a] for a in adapters], batch_size, order=[number[a] for a in adapters])

    @torch.inference_mode()
    def logits(self, texts: list[str], adapters: list[str] | str, batch_size: int = 32) -> torch.Tensor:
        """(N, most labels) fp32 logits in input order; a row's labels past its adapter's own are -inf."""
        if isinstance(texts, str):
            raise TypeError("pass a list of messages, not one string")
        adapters = [adapters] * len(texts) if isinstance(adapters, str) else list(adapters)
        if len(adapters) != len(texts):
            raise UserError(f"{len(texts)} messages but {len(adapters)} adapter names; give one per message")
        self.check(adapters)
        out = torch.empty(len(texts), self.model.head.W.shape[1])
        if self.slots is None:
            self._logits(texts, adapters, batch_size, self._specs, self.number, out)
            return out
        distinct = list(dict.fromkeys(adapters))
        for g in range(0, len(distinct), self.slots.n):  # at most `n` adapters resident at once
            held = self.make_resident(distinct[g : g + self.slots.n])
            rows = [i for i, a in enumerate(adapters) if a in held]
            part = torch.empty(len(rows), out.shape[1])
            self._logits(
                [texts[i] for i in rows],
                [adapters[i] for i in rows],
                batch_size,
                {n: e.spec for n, (_, e) in held.items()},
                {n: slot for n, (slot, _) in held.items()},
                part,
            )
            out[rows] = part
        return out

    def _logits(
        self,
        texts: list[str],
        adapters: list[str],
        batch_size: int,
        specs: Mapping[str, AdapterSpec],
        numbers: Mapping[str, int],
        out: torch.Tensor,
    ) -> None:
        ids = self.encode(texts, adapters, specs)
        number = torch.tensor([numbers[a] for a in adapters], dtype=torch.long)
        for chunk, batch in self.batches(ids, adapters, batch_size, specs, numbers):  # packed: padding is free
            self.rows.set(number[chunk].to(self.device), [max(len(ids[i]), 1) for i in chunk])
            with autocast(self.device, self.precision):
                logits = self.model(batch.ids.to(self.device), batch.last.to(self.device))  # (B, L_max)
            out[chunk] = logits.float().cpu()

    def predict(self, texts: list[str], adapters: list[str] | str, batch_size: int = 32) -> list[dict]:
        """[{"text", "adapter", "label", "probs": {label: p}}] in input order, each over its adapter's labels."""
        adapters = [adapters] * len(texts) if isinstance(adapters, str) else list(adapters)
        probs = self.logits(texts, adapters, batch_size).softmax(dim=-1)
        out = []
        for i, (t, a) in enumerate(zip(texts, adapters, strict=True)):
            labels = self._labels_used(a)
            row = results([t], probs[i : i + 1, : len(labels)], labels)[0]
            out.append({"text": t, "adapter": a, "label": row["label"], "probs": row["probs"]})
        return out

    def _labels_used(self, name: str) -> tuple[str, ...]:
        """The labels of the version of `name` that just ran (the resident one, with slots)."""
        e = self.resident(name)
        return e.spec.labels if e is not None else self.specs[name].labels
