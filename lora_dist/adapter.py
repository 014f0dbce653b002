"""What a run leaves behind to be used: the trained tensors, and a description that rebuilds the model.

    lora-dist adapter info runs/smoke          # or runs/smoke/adapter

A LoRA run writes `adapter/` (`adapter_model.safetensors` + `adapter_config.json`); a run that trains
whole layers (`train.trainable: last_block`, ...) writes `weights/` (`model.safetensors` +
`weights_config.json`) instead. Both descriptions have one schema, `AdapterSpec`: the base model (its name,
where its weights come from, their SHA-256, or for random weights the seed that redraws them), what is
trained (LoRA layers, rank, alpha, scaling), the labels in order, the tokenizer, the truncation and padding
lengths and the pooling rule. That is everything needed to use it without the run directory. Adapters of
the first format (`lora-dist/1`) are read through their run's `config.yaml`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Config, LoRAConfig, ModelConfig, TrainConfig, load_config
from .config import build as build_config
from .data import build_datasets, fixed_length, read_table
from .errors import UserError
from .files import WRITE_ERRORS, read_json, save_file, write_atomic, write_error
from .lora import adapter_key, scale_factor
from .model import ALIASES, HUB_REPOS, PADDING_FREE, canonical_name
from .weights import base_dir, load_gpt2, weights_sha256

FORMAT = "lora-dist/2"
TOKENIZER = "gpt2-bpe"  # GPT-2's byte-level BPE (tiktoken's "gpt2"), shipped in lora_dist/assets
# kind -> (directory in a run, tensor file, description file)
LAYOUT = {
    "lora": ("adapter", "adapter_model.safetensors", "adapter_config.json"),
    "weights": ("weights", "model.safetensors", "weights_config.json"),
}


@dataclass(frozen=True)
class BaseModel:
    """Which frozen GPT-2 an adapter belongs to."""

    name: str  # gpt2-small | gpt2-medium | gpt2-large | gpt2-xl | tiny (or the name the run gave)
    source: str  # a hub repo id ("openai-community/gpt2"), a local directory, or "random"
    sha256: str | None = None  # of model.safetensors (pretrained and local weights)
    seed: int | None = None  # random weights: torch.manual_seed(seed) before the model is built redraws them
    context_length: int | None = None  # a shortened positional table (model.context_length)
    # Random weights: where they were drawn, "cpu" or "cuda" (the model is built on the device it trains on,
    # and torch's CPU and CUDA generators give different numbers for one seed).
    device: str = "cpu"

    def describe(self) -> str:
        if self.source == "random":
            drawn = "" if self.device == "cpu" else f", drawn on {self.device}"
            return f"{self.name} with random weights (seed {self.seed}{drawn})"
        digest = f", sha256 {self.sha256[:12]}..." if self.sha256 else ""
        return f"{self.name} from {self.source}{digest}"

    def mismatch(self, other: BaseModel) -> str | None:
        """Why `other` is not this base, or None when it is."""
        canon = lambda n: ALIASES.get(n.strip().lower(), n.strip().lower())  # noqa: E731
        if canon(self.name) != canon(other.name) and not (self.sha256 and self.sha256 == other.sha256):
            return "another model"
        if (self.source == "random") != (other.source == "random"):
            return "random against pretrained weights"
        if self.source == "random" and self.seed != other.seed:
            return "random weights of another seed"
        if self.source == "random" and self.device != other.device:
            return "random weights drawn on another kind of device"
        if self.sha256 and other.sha256 and self.sha256 != other.sha256:
            return "other weights (SHA-256 differs)"
        if (self.context_length or 0) != (other.context_length or 0):
            return "another context length"
        return None


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # lora | weights
    base: BaseModel
    labels: tuple[str, ...]
    trainable: str = "lora"  # train.trainable
    lora: dict | None = None  # rank, alpha, scaling, scale, targets (module names), head, train_head
    pooling: str = "last_real"
    causal_mask: bool = True
    max_length: int = 1024  # messages are truncated to this many tokens
    pad_to: int | None = None  # every batch padded to this length (padding longest/context), else dynamic
    pad_token_id: int = 50256
    # Base tensors (lora-dist names) that the tensor file replaces, e.g. `final_norm.bias` from a PEFT
    # adapter's modules_to_save; empty for adapters lora-dist trains.
    overrides: tuple[str, ...] = ()
    tokenizer: str = TOKENIZER
    format: str = FORMAT
    extra: dict = field(default_factory=dict, compare=False)  # informative: training config, counts

    def padding_free(self) -> bool:
        """Whether right-padding leaves a message's prediction unchanged: causal attention read at the last
        real token, the first token, or the mean over real tokens. Such messages may share a padded batch."""
        return self.causal_mask and self.pooling in PADDING_FREE

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def for_run(
        cls, cfg: Config, labels: Iterable[str], length: int, modules: list[str], base: BaseModel
    ) -> AdapterSpec:
        """The description of what `cfg` trains (train/loop.py calls this when it saves the result)."""
        lora = None
        if cfg.train.trainable == "lora":
            lora = {
                "rank": cfg.lora.rank,
                "alpha": cfg.lora.alpha,
                "scaling": cfg.lora.scaling,
                "scale": scale_factor(cfg.lora),
                "dropout": cfg.lora.dropout,
                "targets": list(modules),
                "head": "head" in modules,
                "train_head": cfg.lora.train_head,
            }
        return cls(
            kind="lora" if lora else "weights",
            base=base,
            labels=tuple(labels),
            trainable=cfg.train.trainable,
            lora=lora,
            pooling=cfg.model.pooling,
            causal_mask=cfg.model.causal_mask,
            max_length=length,
            pad_to=fixed_length(cfg.data, length),
            pad_token_id=cfg.data.pad_token_id,
        )

    def to_config(self) -> Config:
        """A Config from which `build.build_model` rebuilds this model (base, head, adapters)."""
        b = self.base
        weights = "random" if b.source == "random" else ("pretrained" if _is_hub_id(b.source) else b.source)
        raw: dict = {
            "model": {
                "name": b.name,
                "weights": weights,
                "num_classes": len(self.labels),
                "context_length": b.context_length,
                "pooling": self.pooling,
                "causal_mask": self.causal_mask,
            },
            "data": {"pad_token_id": self.pad_token_id},
            "train": {"trainable": self.trainable, "seed": b.seed if b.seed is not None else 123},
        }
        if self.lora:
            targets = [t for t in self.lora["targets"] if t != "head"] or ["head"]
            raw["lora"] = {key: self.lora[key] for key in ("rank", "alpha", "scaling", "head", "train_head")}
            raw["lora"]["targets"] = targets
        return build_config(Config, raw, "")  # checked as a config file is

    # ---------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["overrides"] = list(self.overrides)
        if self.base.device == "cpu":
            del d["base"]["device"]  # the default: what adapters written before the field say
        extra = d.pop("extra")
        return {"format": d.pop("format"), **d, **extra}

    @classmethod
    def from_json(cls, d: dict, source: str) -> AdapterSpec:
        if not isinstance(d, dict):
            raise UserError(
                f"{source} is not a lora-dist adapter description (it holds {type(d).__name__}, not an object); "
                f"restore the file the run wrote"
            )
        try:
            labels = d["labels"]
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise TypeError(f"labels must be a list of names, not {labels!r}"[:200])
            known = {f for f in cls.__dataclass_fields__ if f != "extra"}
            kw = {k: v for k, v in d.items() if k in known}
            kw["base"] = BaseModel(**d["base"])
            kw["labels"] = tuple(labels)
            kw["overrides"] = tuple(d.get("overrides") or ())
            spec = cls(**kw, extra={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{source} is not a lora-dist adapter description ({type(e).__name__}: {e}); "
                f"retrain, or restore the file the run wrote"
            ) from e
        spec.check(source)
        return spec

    def check(self, source: str) -> None:
        """UserError naming the first field that no run could have written (a wrong type, an impossible value)."""
        why = self.problem()
        if why:
            raise UserError(
                f"{source} is not a valid lora-dist adapter description ({why}); restore the file the run wrote"
            )

    def problem(self) -> str | None:
        """What makes this description unusable, or None."""
        b, n = self.base, self.max_length
        checks = (
            (self.kind in LAYOUT, f"kind {self.kind!r} is neither lora nor weights"),
            (isinstance(b.name, str) and isinstance(b.source, str), "base.name and base.source must be strings"),
            (
                b.sha256 is None or (isinstance(b.sha256, str) and re.fullmatch("[0-9a-f]{64}", b.sha256)),
                "base.sha256 must be 64 hex digits or null",
            ),
            (b.seed is None or whole(b.seed, 0), f"base.seed must be a whole number or null, not {b.seed!r}"),
            (
                b.context_length is None or whole(b.context_length, 1),
                f"base.context_length must be a whole number >= 1 or null, not {b.context_length!r}",
            ),
            (
                len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels) and all(self.labels),
                f"labels must be two or more distinct, non-empty names; got {list(self.labels)}"[:300],
            ),
            (self.trainable in _choices(TrainConfig, "trainable"), f"trainable {self.trainable!r} is unknown"),
            ((self.kind == "lora") == bool(self.lora), f"kind {self.kind!r} does not match lora {self.lora!r}"[:200]),
            (self.lora is None or not _lora_problem(self.lora), f"lora.{_lora_problem(self.lora or {})}"),
            (self.pooling in _choices(ModelConfig, "pooling"), f"pooling {self.pooling!r} is unknown"),
            (isinstance(self.causal_mask, bool), f"causal_mask must be true or false, not {self.causal_mask!r}"),
            (whole(n, 1), f"max_length must be a whole number of tokens >= 1, not {n!r}"),
            (
                self.pad_to is None or whole(self.pad_to, 1, n if whole(n, 1) else 1),
                f"pad_to must be null or a whole number from 1 to max_length ({n}), not {self.pad_to!r}",
            ),
            (whole(self.pad_token_id, 0), f"pad_token_id must be a token id >= 0, not {self.pad_token_id!r}"),
            (
                self.tokenizer == TOKENIZER,
                f"tokenizer {self.tokenizer!r} is not one lora-dist has (only {TOKENIZER!r}, GPT-2's BPE)"[:200],
            ),
            (all(isinstance(o, str) for o in self.overrides), "overrides must be a list of tensor names"),
            (".." not in Path(str(b.name)).parts, f"base.name {b.name!r:.80} must not hold '..'"),
        )
        return next((why for ok, why in checks if not ok), None) or self.fit_problem()

    def fit_problem(self) -> str | None:
        """What the description asks of its base that the base does not have (the base's shape only, read from
        its name or its directory's config.json; no weights): a max_length past its context, a pad token
        outside its vocabulary, a LoRA target that is none of its layers. The one check for adapter info,
        classify and serve; None where the base cannot be found here (loading it says so)."""
        shape = _base_shape(self.base.name, self.base.source, self.base.context_length)
        if shape is None:
            return None
        ctx, vocab, layers = shape
        targets = [t for t in (self.lora or {}).get("targets", []) if t not in layers and t != "head"]
        checks = (
            (
                self.max_length <= ctx,
                f"max_length is {self.max_length} tokens, longer than its base's context of {ctx}; no run writes "
                f"that (max_length at most {ctx})",
            ),
            (
                self.pad_token_id < vocab,
                f"pad_token_id {self.pad_token_id} is outside its base's vocabulary of {vocab} tokens",
            ),
            (
                not targets,
                f"lora.targets names {targets[0]!r:.80}, which is no layer of {self.base.name}" if targets else "",
            ),
        )
        return next((why for ok, why in checks if not ok), None)


@lru_cache(maxsize=64)
def _base_shape(name: str, source: str, context_length: int | None) -> tuple[int, int, frozenset[str]] | None:
    """(context length, vocabulary size, Linear layer names) of a base, laid out on the meta device (nothing
    allocated, no weights read); None where it cannot be found here."""
    where = source if source not in ("random",) and not _is_hub_id(source) else name
    try:
        with torch.device("meta"):
            model = load_gpt2(where, "random", context_length=context_length)
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None
    layers = frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return model.cfg.context_length, model.cfg.vocab_size, layers


def default_labels(labels: Iterable[str]) -> bool:
    """Whether `labels` are transformers' stand-ins (LABEL_0, LABEL_1, ...): an adapter that names no classes."""
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def with_labels(spec: AdapterSpec, labels: str | list[str] | tuple[str, ...] | None, source: str) -> AdapterSpec:
    """`spec` with the label names given by the user (`--labels ham,spam`, `labels=[...]`), in the order of the
    adapter's classes. Only an adapter that names none (LABEL_0, LABEL_1, ...) takes new names; one that names
    its own keeps them (the same names again are accepted)."""
    if labels is None:
        return spec
    names = [x.strip() for x in labels.split(",")] if isinstance(labels, str) else [str(x).strip() for x in labels]
    n = len(spec.labels)
    if len(names) != n or not all(names) or len(set(names)) != n:
        raise UserError(
            f"labels {names!r:.200} do not fit {source}: it has {n} classes, so give {n} distinct, non-empty names "
            f"in the order of its classes, e.g. --labels {','.join(['ham', 'spam', 'other'][:n]) if n <= 3 else '...'}"
        )
    if tuple(names) == spec.labels:
        return spec
    if not default_labels(spec.labels):
        raise UserError(
            f"{source} already names its labels ({', '.join(spec.labels)[:200]}); --labels only names the classes of "
            f"an adapter that has none (LABEL_0, LABEL_1, ...): drop it"
        )
    return replace(spec, labels=tuple(names))


def whole(v: object, lo: int, hi: int | None = None) -> bool:
    """Whether `v` is an int (not a bool, not a float such as 1e12) in [lo, hi]."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@functools.cache  # get_type_hints compiles every annotation: most of the time of reading 1,000 descriptions
def _choices(cls: type, name: str) -> tuple:
    return typing.get_args(typing.get_type_hints(cls)[name])


def _lora_problem(lora: object) -> str | None:
    """What is wrong with an adapter description's `lora` object, or None."""
    if not isinstance(lora, dict):
        return "lora must be an object"
    missing = [k for k in ("rank", "alpha", "scaling", "scale", "targets", "head", "train_head") if k not in lora]
    if missing:
        return f"{missing[0]} is missing"
    checks = (
        (whole(lora["rank"], 1), f"rank must be a whole number >= 1, not {lora['rank']!r}"),
        (finite_number(lora["alpha"]), f"alpha must be a finite number, not {lora['alpha']!r}"),
        (lora["scaling"] in _choices(LoRAConfig, "scaling"), f"scaling {lora['scaling']!r} is unknown"),
        (finite_number(lora["scale"]), f"scale must be a finite number, not {lora['scale']!r}"),
        (
            isinstance(lora["targets"], list) and lora["targets"] and all(isinstance(t, str) for t in lora["targets"]),
            "targets must be a list of layer names",
        ),
        (
            isinstance(lora["head"], bool) and isinstance(lora["train_head"], bool),
            "head and train_head must be booleans",
        ),
    )
    return next((why[:200] for ok, why in checks if not ok), None)


def _is_hub_id(source: str) -> bool:
    return source in HUB_REPOS.values()


# ------------------------------------------------------------------------------------------- on disk


@dataclass(frozen=True)
class Adapter:
    """An adapter (or trained weights) on disk: its directory, description and tensor file."""

    dir: Path
    spec: AdapterSpec

    @property
    def tensor_file(self) -> Path:
        return self.dir / LAYOUT[self.spec.kind][1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor file's tensors, checked: floating point, finite, and of the rank the description names."""
        try:
            tensors = load_file(str(self.tensor_file))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.tensor_file} cannot be read ({e}); it is damaged, retrain or restore it") from e
        check_values(tensors, str(self.tensor_file))
        rank = self.spec.lora["rank"] if self.spec.lora else None
        factor_a = adapter_key("", "A")  # every layer's A, named `<layer>.lora.A`
        for k, t in tensors.items():
            if rank is not None and k.endswith(factor_a) and (t.dim() != 2 or t.shape[1] != rank):
                raise UserError(
                    f"{self.tensor_file}: tensor '{k}' has shape {list(t.shape)}, but the description says rank "
                    f"{rank}; the adapter's files do not belong together, restore the ones the run wrote"
                )
        return tensors


def check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """UserError unless every tensor is floating point and finite (a NaN adapter answers NaN for every message)."""
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise UserError(
                f"{source}: tensor '{k}' is {str(t.dtype).removeprefix('torch.')}; adapters hold floating-point "
                f"tensors, so this file was not written by training: restore it"
            )
        if not torch.isfinite(t).all():
            raise UserError(
                f"{source}: tensor '{k}' holds NaN or infinite values; the adapter is damaged (or was saved after "
                f"the loss diverged): retrain, or restore an earlier copy"
            )


def find(path: str | Path) -> Adapter:
    """PATH may be a run directory or its adapter/ (weights/) directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"adapter path {p} not found; pass a training run's output_dir or its adapter/ directory")
    for sub, tensors, desc in LAYOUT.values():
        for d in (p, p / sub):
            if (d / desc).is_file():
                spec = _read_spec(d / desc, d)
                if not (d / tensors).is_file():
                    raise UserError(
                        f"{d} has {desc} but no {tensors}; the run did not finish, resume it with train.resume=auto"
                    )
                return Adapter(d, spec)
    names = sweep_adapters(p)
    if names is not None:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        one = p / "adapters" / (names[0] if names else "NAME")
        raise UserError(
            f"{p} is a sweep's directory, not one adapter; its adapters: {shown or 'none finished yet'}. Name one, "
            f"e.g. {one}, or give the folder to a command that takes many (serve --adapters-dir {p / 'adapters'})"
        )
    hint = (
        "it holds checkpoints but never finished: resume it with train.resume=auto"
        if (p / "checkpoints").is_dir()
        else "pass the output_dir of a run that finished training, or its adapter/ directory"
    )
    raise UserError(
        f"{p} is not a lora-dist adapter (no adapter/adapter_config.json or weights/weights_config.json); {hint}"
    )


def sweep_adapters(path: Path) -> list[str] | None:
    """The names of a sweep directory's finished adapters (`RUN/adapters/NAME/` holding an adapter), or None when
    `path` is no sweep's directory (`lora-dist sweep` leaves sweep.json, or a config.yaml with a sweep section)."""
    config = path / "config.yaml"
    if not (path / "sweep.json").is_file() and not (
        (path / "adapters").is_dir() and config.is_file() and re.search(r"^sweep:", config.read_text(), re.M)
    ):
        return None
    found = sorted(
        d.name
        for d in (path / "adapters").glob("*")
        if any((d / sub / desc).is_file() for sub, _, desc in LAYOUT.values())
    )
    return found[:10_000]


# PEFT's pickle files: never loaded (unpickling runs code), only named in the message that refuses them.
PICKLES = ("adapter_model.bin", "pytorch_model.bin")


def _read_spec(file: Path, directory: Path) -> AdapterSpec:
    d = read_json(file, "restore the file the run wrote")
    if not isinstance(d, dict):
        raise UserError(f"{file} is not a lora-dist adapter description; restore the file the run wrote")
    if "peft_type" in d:
        pickles = [n for n in PICKLES if (directory / n).is_file()]
        if pickles and not (directory / "adapter_model.safetensors").is_file():
            raise UserError(
                f"{directory} is a PEFT adapter whose only weights are {pickles[0]}, a pickle, which lora-dist never "
                f"loads (unpickling can run code); re-save it with save_pretrained(..., safe_serialization=True)"
            )
        raise UserError(
            f"{file} is a PEFT adapter; load it with Classifier.from_pretrained or lora-dist classify, "
            f"which read PEFT exports"
        )
    if d.get("format") == "lora-dist/1":
        return _legacy_spec(d, directory.parent)
    if d.get("format") != FORMAT:
        fmt = d.get("format")
        if isinstance(fmt, str) and fmt.startswith("lora-dist/"):
            raise UserError(
                f"{file} is of format {fmt}, newer than this lora-dist reads (lora-dist/1, {FORMAT}); upgrade lora-dist"
            )
        raise UserError(f"{file} names no lora-dist format (format: {fmt!r}); restore the file the run wrote")
    return AdapterSpec.from_json(d, str(file))


def _legacy_spec(d: dict, run_dir: Path) -> AdapterSpec:
    """A first-format adapter: rebuilt from its run's config.yaml and splits, as training wrote them."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(
            f"{run_dir / 'adapter'} is an adapter of the first format, which needs its run's config.yaml; "
            f"pass the whole run directory"
        )
    cfg = load_config(cfg_file)
    labels = tuple(d.get("classes") or ("ham", "spam"))
    with torch.device("meta"):
        ctx = load_gpt2(cfg.model.name, "random", context_length=cfg.model.context_length).cfg.context_length
    length = min(cfg.data.max_length or ctx, ctx)
    if cfg.data.padding == "longest" and (run_dir / "splits" / "train.csv").is_file():
        splits = {k: read_table(run_dir / "splits" / "train.csv") for k in ("train", "validation", "test")}
        _, length = build_datasets(splits, cfg.data, ctx, labels)
    return AdapterSpec.for_run(
        cfg, labels, length, list(d.get("target_modules") or []), base_of(cfg, hash_weights=False)
    )


def base_of(cfg: Config, hash_weights: bool = True, device_type: str = "cpu") -> BaseModel:
    """The base model a run's config names (the weights' SHA-256 read from the HF cache, or computed once);
    random weights drawn on a device of `device_type`."""
    m = cfg.model
    if m.weights == "random":
        return BaseModel(
            m.name, "random", None, cfg.train.seed, m.context_length, "cuda" if device_type == "cuda" else "cpu"
        )
    if m.weights == "pretrained" and not _looks_local(m.name):
        name = canonical_name(m.name)
        sha = weights_sha256(base_dir(name)) if hash_weights else None
        return BaseModel(name, HUB_REPOS.get(name, name), sha, None, m.context_length)
    directory = Path(m.weights if m.weights != "pretrained" else m.name).resolve()
    sha = weights_sha256(directory) if hash_weights else None
    return BaseModel(m.name, str(directory), sha, None, m.context_length)


def _looks_local(name: str) -> bool:
    return os.sep in name or name.startswith(".") or Path(name).is_dir()


def save(run_dir: Path, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the tensors, then the description, each under a temporary name renamed into place."""
    sub, tensor_name, desc = LAYOUT[spec.kind]
    d = Path(run_dir) / sub
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{tensor_name}.tmp"
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, str(tmp), metadata={"format": "pt", "lora_dist": spec.format})
        os.replace(tmp, d / tensor_name)
    except WRITE_ERRORS as e:
        tmp.unlink(missing_ok=True)
        needed = sum(t.nbytes for t in cpu.values())
        raise write_error(d, needed, e, tensor_name, "free some space, then resume with train.resume=auto") from e
    counts = {"tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))}
    spec = replace(spec, extra={**spec.extra, **counts})
    write_atomic(d / desc, json.dumps(spec.to_json(), indent=2) + "\n")
    return d


def info(path: str | Path) -> str:
    """`lora-dist adapter info PATH`: the description, the tensor count and the size on disk."""
    a = find(path)
    s = a.spec
    tensors = a.tensors()
    size = a.tensor_file.stat().st_size
    what = (
        f"LoRA rank {s.lora['rank']}, alpha {s.lora['alpha']:g} ({s.lora['scaling']}, scale {s.lora['scale']:g}) on "
        f"{len(s.lora['targets'])} layers" + (", head trained in full" if s.lora["train_head"] else "")
        if s.lora
        else f"trained weights ({s.trainable})"
    )
    lines = [
        f"{a.dir}  ({s.format}, {s.kind})",
        f"base:      {s.base.describe()}",
        f"trained:   {what}",
        f"labels:    {', '.join(s.labels)}",
        f"input:     tokenizer {s.tokenizer}, truncated to {s.max_length} tokens, "
        + (f"padded to {s.pad_to}" if s.pad_to else "padded per batch")
        + f" with {s.pad_token_id}, "
        f"pooling {s.pooling}" + ("" if s.causal_mask else ", no causal mask"),
        f"tensors:   {len(tensors)} ({sum(t.numel() for t in tensors.values()):,} values) in {a.tensor_file.name}, "
        f"{size:,} bytes ({size / 2**20:.2f} MiB)",
        "",
        json.dumps(s.to_json(), indent=2),
    ]
    return "\n".join(lines)
