"""Thousands of adapters on disk, a bounded few on the model's device: the directory's catalog and the LRU slots.

    lora-dist serve --adapters-dir runs/sweep --max-loaded 64
    python -c "from lora_dist import MultiAdapterClassifier as M; print(M.from_pretrained(None, 'runs/sweep', max_loaded=8).names)"

`Catalog` finds every run or adapter directory under a directory (a sweep's output works as it is) and names
each by its path relative to it; it reads descriptions only (adapter_config.json), never tensors, checks them
against one reference (same base, pooling, causal mask, a layout the slots hold), and leaves a broken one out
with one log line. The walk is bounded (depth, directories visited) and follows no symbolic link. `rescan`
finds what was added, changed or removed since.

`read_raw` reads an adapter's tensors when it is first asked for: the tensor file is read into memory once,
between two looks at its size, mtime and inode (an adapter rewritten meanwhile, by a running sweep, is refused
and asked for again, never half read), then `materialize` parses and checks it against its description. For
lora-dist's adapters both run on the reader thread without a torch compute op (safetensors' parser, the bytes
wrapped as tensors, the NaN check and B's scale in NumPy), so the model thread's part of a miss is one copy
per tensor into the slot (`Slots.put`).

`Slots` holds `n` adapters in a fixed pool on the model's device: every wrapped layer's stacked A/B (and the
stacked heads, `multi_lora`) has `n` rows, and an adapter's load overwrites one row in place, the least
recently used one's: a miss costs one adapter's copy, never a restack. Only the model thread touches it.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, deserialize

from .. import peft
from ..adapter import LAYOUT, AdapterSpec, check_values, find
from ..build import read_adapter
from ..errors import UserError
from ..multi_lora import MultiHead, MultiLoRALinear

SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_NAME = 255
MAX_DEPTH = 6  # directories below DIR that are looked into (a sweep's adapters sit 2 deep: adapters/NAME)
MAX_DIRS = 200_000  # directories looked into in one scan, at most


class Gone(UserError):
    """The adapter is no longer on disk (or no longer listed): a request for it gets 404."""


class Unavailable(Exception):
    """The adapter cannot be read now (being rewritten, damaged, changed since the last scan): 503."""


def valid_name(name: str) -> bool:
    """A name of one or more '/'-separated segments of letters, digits, '_', '-', '.' (none starting with '.')."""
    return 0 < len(name) <= MAX_NAME and all(SEGMENT.match(s) for s in name.split("/"))


def stamp(files: list[Path]) -> tuple:
    """What changes when any of `files` is rewritten: size, mtime and inode of each."""
    out = []
    for f in files:
        s = os.stat(f)
        out.append((s.st_size, s.st_mtime_ns, s.st_ino))
    return tuple(out)


@dataclass(frozen=True)
class Entry:
    """One adapter of the catalog: its name, directory, description and the files' stamp when it was read."""

    name: str
    path: Path
    spec: AdapterSpec
    source: str  # the tensor file (or the PEFT directory)
    stamp: tuple
    peft: bool = False

    @property
    def files(self) -> list[Path]:
        if self.peft:
            return [self.path / "adapter_config.json", self.path / "adapter_model.safetensors"]
        sub, tensors, desc = LAYOUT["lora"]
        d = self.path / sub if (self.path / sub / desc).is_file() else self.path
        return [d / desc, d / tensors]


def is_adapter_dir(p: Path) -> bool:
    sub, _, desc = LAYOUT["lora"]
    wsub, _, wdesc = LAYOUT["weights"]
    return any(f.is_file() for f in (p / desc, p / sub / desc, p / wdesc, p / wsub / wdesc))


def walk(root: Path, max_depth: int = MAX_DEPTH, max_dirs: int = MAX_DIRS) -> tuple[dict[str, Path], list[str]]:
    """({name: directory}, problems) of the adapter directories under `root`, breadth first. Hidden directories
    (a writer's temporary ones) and symbolic links are skipped; an adapter directory is not looked into."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    if is_adapter_dir(root):
        return {root.resolve().name: root}, problems
    level, seen = [root], 0
    for depth in range(1, max_depth + 1):
        nxt = []
        for d in level:
            try:
                with os.scandir(d) as it:
                    children = sorted((c for c in it if not c.name.startswith(".")), key=lambda c: c.name)
            except OSError as err:
                problems.append(f"{d}: cannot be listed ({err.strerror})")
                continue
            for child in children:
                try:
                    if child.is_symlink() or not child.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                seen += 1
                if seen > max_dirs:
                    problems.append(f"{root}: more than {max_dirs} directories; the rest were not looked into")
                    return found, problems
                p = Path(child.path)
                if is_adapter_dir(p):
                    name = p.relative_to(root).as_posix()
                    if valid_name(name):
                        found[name] = p
                    else:
                        problems.append(f"{p}: its path is not a usable adapter name (letters, digits, _ - . and /)")
                elif depth < max_depth:
                    nxt.append(p)
        level = nxt
    return found, problems


def inside(root: Path, f: Path) -> bool:
    try:
        return f.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def describe(name: str, path: Path, base: str | None = None, root: Path | None = None) -> Entry:
    """The adapter's description, read and checked (no tensors read), as an Entry."""
    path = Path(path)
    if peft.is_peft_dir(path):  # adapter_config.json and the tensor file's header; its tensors at first use
        spec, source = peft.describe(path, base), str(path)
        e = Entry(name, path, spec, source, (), peft=True)
        e = Entry(name, path, spec, source, stamp(e.files), peft=True)
    else:
        a = find(path)
        e = Entry(name, path, a.spec, str(a.tensor_file), ())
        e = Entry(name, path, a.spec, e.source, stamp(e.files))
    if root is not None and not all(inside(root, f) for f in e.files):
        raise UserError(f"{path}: its files link outside {root}; copy them in")
    s = e.spec
    if s.kind != "lora":
        raise UserError(
            f"{e.source} trains whole layers (train.trainable={s.trainable}), which replace base weights; only "
            f"LoRA adapters share a base: use `lora-dist classify` for it"
        )
    if s.overrides:
        raise UserError(f"{e.source} replaces base tensors ({', '.join(s.overrides[:3])}); it cannot share a base")
    return e


@dataclass
class Layout:
    """What the slots hold: the wrapped layers (name -> (in, out)), the largest rank and label count."""

    layers: dict[str, tuple[int, int]]
    rank: int
    labels: int
    context: int
    vocab: int

    def misfit(self, spec: AdapterSpec) -> str | None:
        assert spec.lora is not None
        targets = [t for t in spec.lora["targets"] if t != "head"]
        extra = [t for t in targets if t not in self.layers]
        if extra:
            return f"it adapts {extra[0]}, which no adapter served at start does (restart the service to add it)"
        if spec.lora["rank"] > self.rank:
            return f"rank {spec.lora['rank']} is over the largest served at start, {self.rank} (restart to serve it)"
        if len(spec.labels) > self.labels:
            return f"{len(spec.labels)} labels, over the most served at start, {self.labels} (restart to serve it)"
        if spec.max_length > self.context:
            return f"max_length {spec.max_length} is over its base's context of {self.context}"
        if spec.pad_token_id >= self.vocab:
            return f"pad_token_id {spec.pad_token_id} is outside its base's vocabulary"
        return None


def mismatch(ref: AdapterSpec, spec: AdapterSpec) -> str | None:
    """Why `spec` cannot share a service with `ref`, or None."""
    why = ref.base.mismatch(spec.base)
    if why:
        return f"it was trained on {spec.base.describe()}, the service's base is {ref.base.describe()} ({why})"
    for key in ("pooling", "causal_mask"):
        if getattr(spec, key) != getattr(ref, key):
            return f"it reads the model with {key}={getattr(spec, key)}, the service with {getattr(ref, key)}"
    return None


@dataclass
class Catalog:
    """Every adapter a service (or a `MultiAdapterClassifier`) may serve: those under `root`, and `named` ones
    (NAME -> PATH). `entries` is replaced whole at each scan (readers never see it half made)."""

    root: Path | None
    named: dict[str, Path] = field(default_factory=dict)
    base: str | None = None
    log: Callable[[str], None] = lambda msg: None
    entries: dict[str, Entry] = field(default_factory=dict)
    reference: AdapterSpec | None = None
    layout: Layout | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scan(self) -> dict[str, list[str]]:
        """Read every description again; returns {"added", "removed", "changed", "broken"} names."""
        with self.lock:  # two scans at once run one after the other
            paths: dict[str, Path] = {}
            problems: list[str] = []
            if self.root is not None:
                if not self.root.is_dir():
                    raise UserError(f"--adapters-dir {self.root} is not a directory")
                paths, problems = walk(self.root)
            for name, p in self.named.items():
                paths[name] = Path(p)
            for problem in problems:
                self.log(f"adapters: {problem}")
            old, read, broken = self.entries, {}, []
            for name, p in paths.items():
                prev = old.get(name)
                try:
                    if prev is not None and prev.path == p and _same_files(prev):
                        read[name] = prev  # unchanged: its description is not read again
                        continue
                    read[name] = describe(name, p, self.base, self.root if name not in self.named else None)
                except (UserError, OSError) as err:
                    broken.append(name)
                    self.log(f"adapter '{name}' left out: {err}")
            if self.reference is None and read:  # the base most adapters share (one odd adapter is left out)
                votes = Counter((e.spec.base, e.spec.pooling, e.spec.causal_mask) for e in read.values())
                top = votes.most_common(1)[0][0]
                self.reference = next(
                    e.spec for e in read.values() if (e.spec.base, e.spec.pooling, e.spec.causal_mask) == top
                )
            new = {}
            for name, e in read.items():
                why = self.check(e)
                if why:
                    broken.append(name)
                    self.log(f"adapter '{name}' left out: {e.source}: {why}")
                else:
                    new[name] = e
            self.entries = dict(sorted(new.items()))
            return {
                "added": sorted(set(new) - set(old)),
                "removed": sorted(set(old) - set(new)),
                "changed": sorted(n for n in set(new) & set(old) if new[n] is not old[n]),
                "broken": sorted(broken),
            }

    def check(self, e: Entry) -> str | None:
        if self.reference is None:
            self.reference = e.spec
        why = mismatch(self.reference, e.spec)
        if why is None and self.layout is not None:
            why = self.layout.misfit(e.spec)
        return why

    def get(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is None:
            raise Gone(name)
        return e


def _same_files(e: Entry) -> bool:
    try:
        return stamp(e.files) == e.stamp
    except OSError:
        return False


@dataclass
class Parts:
    """One adapter on its way to a slot: first the tensor file's bytes (`read_raw`), then {layer: (A, B, scale)}
    and its head, checked (`materialize`). Any thread may make them for lora-dist's adapters (no torch compute
    op); PEFT's are read and converted on the model thread."""

    entry: Entry
    stamp: tuple
    data: bytes | None = None
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
    head: tuple | None = None
    checked: bool = False  # values checked finite (`materialize`, or `Slots.put` for PEFT's)


def read_raw(e: Entry) -> Parts:
    """Read `e`'s tensor file once into memory, between two stamps of its files. Gone if deleted, Unavailable
    if rewritten meanwhile or if its description changed since the scan. No torch call: any thread may run it
    (a second thread running torch ops slows the model thread's, serve/batcher.py)."""
    if e.peft:  # PEFT's files are read and converted by peft.read, on the model thread
        return Parts(e, e.stamp)
    files = e.files
    try:
        before = stamp(files)
        spec = find(e.path).spec
        data = files[1].read_bytes()
        after = stamp(files)
    except FileNotFoundError as err:
        raise Gone(f"adapter '{e.name}' was removed from disk") from err
    except (OSError, UserError) as err:
        raise Unavailable(f"adapter '{e.name}' cannot be read ({err}); retry once it is whole again") from err
    if before != after:
        raise Unavailable(f"adapter '{e.name}' is being rewritten; retry")
    if spec != e.spec:
        raise Unavailable(
            f"adapter '{e.name}' changed on disk since the adapters were last read; reload them "
            f"(SIGHUP or POST /v1/adapters/reload) to serve the new version"
        )
    return Parts(e, after, data)


# safetensors' floating-point dtypes: torch's dtype, and the unsigned integer of the same width with the mask of
# the exponent's bits (all set: infinite or NaN, in every IEEE format)
FLOATS: dict[str, tuple[torch.dtype, str, int]] = {
    "F64": (torch.float64, "<u8", 0x7FF0000000000000),
    "F32": (torch.float32, "<u4", 0x7F800000),
    "F16": (torch.float16, "<u2", 0x7C00),
    "BF16": (torch.bfloat16, "<u2", 0x7F80),
}


def parse(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, checked floating point and finite, with no torch compute op
    (any thread may run it): safetensors' own parser checks the header and the offsets, each tensor's bytes are
    wrapped (`torch.frombuffer`, no copy), and NaN and infinity are found in NumPy (one thread, no OpenMP)."""
    out = {}
    for name, info in deserialize(data):
        kind = info["dtype"]
        if kind not in FLOATS:
            raise UserError(
                f"{source}: tensor '{name}' is {kind}; adapters hold floating-point tensors, so this file was not "
                f"written by training: restore it"
            )
        dtype, bits, mask = FLOATS[kind]
        buf = bytearray(info["data"])  # writable: torch wraps it without a warning
        if buf and bool(((np.frombuffer(buf, dtype=bits) & mask) == mask).any()):
            raise UserError(
                f"{source}: tensor '{name}' holds NaN or infinite values; the adapter is damaged (or was saved "
                f"after the loss diverged): retrain, or restore an earlier copy"
            )
        shape = tuple(info["shape"])
        out[name] = torch.frombuffer(buf, dtype=dtype).view(shape) if buf else torch.empty(shape, dtype=dtype)
    return out


def scaled(b: torch.Tensor, scale: float) -> torch.Tensor:
    """`b.float() * scale` (what `MultiLoRALinear` stacks), computed in NumPy: the same fp32 product (fp32
    times the scale rounded to fp32), bit for bit, without a torch op."""
    if b.dtype == torch.bfloat16:  # NumPy has no bf16: its bits are the top half of the fp32 number's
        f = (b.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        f = b.numpy().astype(np.float32, copy=False)
    return torch.from_numpy(np.multiply(f, np.float32(scale)))


def materialize(parts: Parts, expected: Callable[[AdapterSpec], dict[str, tuple]], base: str | None = None) -> Parts:
    """Parse the bytes and check the tensors' names and shapes against the description (`expected(spec)`:
    {tensor name: shape}) and their values (finite); Unavailable when they do not belong together (a file
    written before its description) or the file is damaged. For lora-dist's adapters no torch compute op runs
    (any thread may call it, and B is scaled here); PEFT's are read by `peft.read` (the model thread)."""
    e = parts.entry
    if parts.layers is not None:
        return parts
    if e.peft:
        try:
            spec, tensors, _ = read_adapter(e.path, base)
        except FileNotFoundError as err:
            raise Gone(f"adapter '{e.name}' was removed from disk") from err
        except (OSError, UserError) as err:
            raise Unavailable(f"adapter '{e.name}' cannot be read ({err})") from err
        if not peft.agrees(spec, e.spec):  # (its tensors may leave out a layer or columns its header has)
            raise Unavailable(f"adapter '{e.name}' changed on disk since the adapters were last read; reload them")
    else:
        spec = e.spec
        assert parts.data is not None, "read_raw(entry) first"
        try:
            tensors = parse(parts.data, e.source)
        except (SafetensorError, ValueError, OSError) as err:
            raise Unavailable(f"adapter '{e.name}': {e.files[1]} cannot be read ({err}); it is damaged") from err
        except UserError as err:
            raise Unavailable(f"adapter '{e.name}': {err}") from err
    want = expected(spec)
    wrong = sorted(set(want) ^ set(tensors))
    if wrong:
        raise Unavailable(f"adapter '{e.name}': {e.source} does not match its description (tensor {wrong[0]!r})")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k]) or not t.is_floating_point():
            raise Unavailable(
                f"adapter '{e.name}': tensor {k!r} is {t.dtype} {list(t.shape)}, its description wants "
                f"{list(want[k])}; the files do not belong together"
            )
    assert spec.lora is not None
    scale = float(spec.lora["scale"])
    a_keys = [k for k in tensors if k.endswith(".lora.A") and not k.startswith("head.")]
    if e.peft:
        parts.layers = {k.removesuffix(".lora.A"): (tensors[k], tensors[k[:-1] + "B"], scale) for k in a_keys}
    else:  # B scaled now, off the model thread: Slots.put copies it as it is
        parts.layers = {
            k.removesuffix(".lora.A"): (tensors[k], scaled(tensors[k[:-1] + "B"], scale), 1.0) for k in a_keys
        }
        parts.checked = True  # by `parse`
    if "head.lora.A" in tensors:
        w = tensors["head.linear.weight"]
        parts.head = (w, tensors["head.linear.bias"], tensors["head.lora.A"], tensors["head.lora.B"])
    else:
        parts.head = (tensors["head.weight"], tensors["head.bias"])
    parts.data = None
    return parts


def read_parts(e: Entry, expected: Callable[[AdapterSpec], dict[str, tuple]], base: str | None = None) -> Parts:
    """`read_raw` then `materialize`: an adapter ready for `Slots.put`."""
    return materialize(read_raw(e), expected, base)


def fold_head(parts: Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's weight with its LoRA folded in, fp32, as `multi_adapter.lora_parts` folds it."""
    h = parts.head
    assert h is not None
    if len(h) == 4:
        scale = float(parts.entry.spec.lora["scale"])  # type: ignore[index]
        w, b, a, bb = h
        return w.float() + scale * (a.float() @ bb.float()).t(), b.float()
    return h[0].float(), h[1].float()


class Slots:
    """`n` adapters resident in the model's stacked layers, least recently used evicted first (model thread)."""

    def __init__(self, model: torch.nn.Module, n: int, on: Callable[[str, str], None] | None = None):
        self.n = n
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
        head = model.head
        assert isinstance(head, MultiHead)
        self.head: MultiHead = head
        self.resident: OrderedDict[str, tuple[int, Entry]] = OrderedDict()  # name -> (slot, version), LRU first
        self.free = list(range(n - 1, -1, -1))
        self.on = on or (lambda event, name: None)

    def slot(self, name: str) -> int | None:
        got = self.resident.get(name)
        return None if got is None else got[0]

    def touch(self, name: str) -> None:
        self.resident.move_to_end(name)

    def put(self, parts: Parts, keep: set[str]) -> int:
        """Write `parts` into a slot (its own old one, a free one, or the least recently used not in `keep`)."""
        name = parts.entry.name
        assert parts.layers is not None and parts.head is not None, "materialize(parts) first"
        if not parts.checked:
            tensors = {f"{k}.A": a for k, (a, _, _) in parts.layers.items()}
            tensors.update({f"{k}.B": b for k, (_, b, _) in parts.layers.items()})
            tensors.update({f"head.{i}": t for i, t in enumerate(parts.head)})
            try:
                check_values(tensors, parts.entry.source)
            except UserError as e:
                raise Unavailable(f"adapter '{name}': {e}") from e
            parts.checked = True
        if name in self.resident:
            i = self.resident.pop(name)[0]
        elif self.free:
            i = self.free.pop()
        else:
            victim = next((v for v in self.resident if v not in keep), None)
            if victim is None:
                raise RuntimeError(f"all {self.n} adapter slots are in use by this batch")  # callers split batches
            i = self.resident.pop(victim)[0]
            self.on("evict", victim)
        with torch.no_grad():
            for lname, m in self.layers.items():
                u = parts.layers.get(lname)
                if u is None:
                    m.rank[i] = 0
                    continue
                a, b, scale = u
                r = a.shape[1]
                m.A[i, :, :r] = a  # as MultiLoRALinear's constructor stacks them, cast to its dtype
                m.B[i, :r] = b if scale == 1.0 else b.float() * scale  # `materialize` scaled lora-dist's B
                m.rank[i] = r
            w, bias = fold_head(parts)
            self.head.W[i].zero_()
            self.head.W[i, : w.shape[0]] = w
            self.head.b[i].fill_(float("-inf"))
            self.head.b[i, : w.shape[0]] = bias
        self.resident[name] = (i, parts.entry)
        return i

    def drop(self, name: str) -> None:
        got = self.resident.pop(name, None)
        if got is not None:
            self.free.append(got[0])
