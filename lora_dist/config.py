"""Run configuration: frozen dataclasses loaded from YAML, with `key=value` overrides.

    lora-dist train --config configs/smoke.yaml train.epochs=1 output_dir=runs/x

Every value is checked against its field's type; an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from .errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a config dataclass (`build`)

# The lists of choices, each defined here once (the command line's flags and the modules that check them read these)
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = typing.get_args(PrecisionChoice)
PoolingChoice = Literal["last_real", "last", "first", "mean", "mean_all"]
POOLINGS: tuple[str, ...] = typing.get_args(PoolingChoice)
# dist.strategy's choices: auto, or a backend of train/registry.py's STRATEGIES (which checks it names these)
StrategyChoice = Literal["auto", "none", "ddp", "deepspeed"]
STRATEGY_NAMES: tuple[str, ...] = typing.get_args(StrategyChoice)[1:]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "gpt2-small"  # gpt2-small|medium|large|xl, the book's "gpt2-small (124M)", or tiny
    weights: str = "pretrained"  # pretrained | random | a directory with config.json + model.safetensors
    num_classes: int | None = None  # default: the number of labels in the data
    dropout: float = 0.0  # the book fine-tunes with drop_rate 0.0
    context_length: int | None = None  # shorten the positional table (tiny/random models only)
    activation_checkpointing: bool = False
    # Which hidden state the head classifies: the last real token (default), the last position after
    # padding (the book), the first token, or the mean over the real tokens (or over every position).
    pooling: PoolingChoice = "last_real"
    causal_mask: bool = True  # false: every token attends to every position (the book's row 17)

    def __post_init__(self) -> None:
        _check(
            self.num_classes is None or self.num_classes >= 2, "model.num_classes must be >= 2 (or null: from the data)"
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")


BALANCE = ("undersample", "weight", "none")


@dataclass(frozen=True)
class DataConfig:
    source: str = (
        "sms"  # "sms" (UCI SMS Spam Collection), or a CSV/TSV/JSONL/Parquet file, a directory of them or a glob
    )
    url: str = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    download: bool = (
        False  # false: the copy shipped in the package (the same file, same sha256); true: fetch it from `url`
    )
    # undersample: every class cut to the smallest one, as the book does; weight: keep every message and weight the
    # loss by inverse class frequency on the training split; none: neither. true/false mean undersample/none.
    balance: Any = "undersample"
    labels: tuple[str, ...] | None = None  # the class labels in order (default: the data's, sorted)
    train_frac: float = 0.7
    val_frac: float = 0.1
    seed: int = 123
    max_length: int | None = None  # truncate messages to this many tokens (default: the context)
    # longest: every message padded to the longest training message (the book); batch: each batch to its
    # own longest; context: to the model's context length (the book's row 13)
    padding: Literal["longest", "batch", "context"] = "batch"
    bucket: bool = True  # length-bucketed batches (padding=batch only); global batches stay random
    # padding=batch: round each batch's length up to a multiple of this (null: 64 on CUDA where the step is a CUDA
    # graph per shape or compiled, so that they see a handful of shapes; elsewhere 1, the batch's own length). Only
    # where padding changes no prediction (causal attention, pooling last_real, first or mean).
    pad_multiple: int | None = None
    pad_token_id: int = 50256
    # A user's file: the columns (CSV/TSV header, JSONL keys, Parquet fields) that hold the message and its label.
    text_column: str = "text"
    label_column: str = "label"
    # The token cache (`lora-dist prepare`): where (null: $LORA_DIST_CACHE, else $XDG_CACHE_HOME or ~/.cache, then
    # lora_dist/tokens), and how long a process waits for another preparing the same cache directory.
    cache_dir: str | None = None
    cache_timeout_s: float = 3600.0
    # Copies of the splits as CSV files in the run's splits/ (null: for data sets under 100,000 messages). The
    # run always records its splits by reference: splits/splits.json (the cache's key) and splits/index.npz.
    write_splits: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.balance, bool):  # the book's `balance: true`, and `false`
            object.__setattr__(self, "balance", "undersample" if self.balance else "none")
        _check(
            self.balance in BALANCE,
            f"data.balance must be one of {', '.join(BALANCE)} (or true/false); got {self.balance!r}",
        )
        _check(0 < self.train_frac < 1 and 0 < self.val_frac < 1, "data.train_frac and data.val_frac must be in (0, 1)")
        _check(
            self.train_frac + self.val_frac < 1,
            f"data.train_frac + data.val_frac = {self.train_frac + self.val_frac:g} leaves no test set; make their sum < 1",
        )
        _check(self.max_length is None or self.max_length > 0, "data.max_length must be > 0")
        _check(self.cache_timeout_s > 0, "data.cache_timeout_s must be > 0 (seconds)")
        _check(
            bool(self.text_column.strip() and self.label_column.strip()),
            "data.text_column and data.label_column must name columns",
        )
        _check(self.pad_multiple is None or self.pad_multiple >= 1, "data.pad_multiple must be >= 1 (or null: auto)")
        _check(
            self.labels is None or (len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels)),
            "data.labels must list at least two distinct labels (or be null: the labels found in the data)",
        )


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    scaling: Literal["alpha", "alpha/r", "rslora"] = "alpha"
    dropout: float = 0.0
    # Which nn.Linear layers get adapters: "all", or a list of patterns matched against module names
    # (fnmatch), e.g. ["*.att.*"] for attention only, ["*.ff.*"] for the feed-forward block.
    targets: tuple[str, ...] = ("all",)
    head: bool = True  # an adapter on the 2-class head too (the book does)
    train_head: bool = False  # train the head's own weights in full (PEFT's modules_to_save)

    def __post_init__(self) -> None:
        _check(self.rank > 0, f"lora.rank must be > 0, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout must be in [0, 1)")
        _check(len(self.targets) > 0, "lora.targets must name at least one pattern, or 'all'")


@dataclass(frozen=True)
class SelectConfig:
    """train.select: the adapter kept at the end is the one of the evaluation with the best validation metric
    (HF Trainer's load_best_model_at_end / metric_for_best_model); the last one is kept beside it."""

    metric: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    mode: Literal["min", "max"] | None = None  # default: min for val_loss, max for the others
    examples: int | None = None  # select on the first N validation messages (a fixed subset); default: all

    def __post_init__(self) -> None:
        _check(self.examples is None or self.examples > 0, "train.select.examples must be > 0 (or null: all)")

    @property
    def direction(self) -> str:
        return self.mode or ("min" if self.metric == "val_loss" else "max")


@dataclass(frozen=True)
class EarlyStopConfig:
    """train.early_stop: end the run after `patience` selection evaluations without an improvement of more than
    `min_delta` (HF's EarlyStoppingCallback), checkpointed. It watches train.select's metric (default val_loss)."""

    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _check(self.patience >= 1, f"train.early_stop.patience must be >= 1, got {self.patience}")
        _check(self.min_delta >= 0, f"train.early_stop.min_delta must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 8  # the GLOBAL batch: per-rank micro-batch = batch_size / (world_size * grad_accum)
    grad_accum: int = 1
    # What is trained: LoRA adapters (lora.*), or, as the book's --trainable_layers, the head alone
    # (last_layer), the head with the final LayerNorm and the last one or two blocks, or everything.
    trainable: Literal["lora", "last_layer", "last_block", "last_two_blocks", "all"] = "lora"
    lr: float = 5e-5
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs, tests)
    eval_every: int = 50  # steps between train/val loss estimates
    eval_batches: int = 5  # batches used for those estimates and the per-epoch accuracies
    seed: int = 123
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: PrecisionChoice = "auto"  # auto: bf16 where native (strategy.resolve_precision)
    tf32: bool = True  # fp32 on CUDA: TF32 tensor-core matmuls (A100 and newer); false: full fp32
    compile: bool = False  # torch.compile the model's forward (parameter names stay as they are)
    # Capture the whole training step (forward, backward, clipping, AdamW) as one CUDA graph per batch shape and
    # replay it: null (auto) where it applies (one CUDA process, bf16 or fp32, grad_accum 1, no compile, no
    # activation checkpointing), true to insist (an error says what stands in the way), false never.
    cuda_graphs: bool | None = None
    # On a GPU under bf16/fp16 autocast: cast every adapter's A and B for a forward pass all at once (one
    # multi-tensor copy, and one for their gradients) instead of autocast's cast at each use. The same numbers;
    # whether it pays is for a GPU to measure (bench/gpu_check.sh's a-castonce), so off by default.
    lora_cast_once: bool = False
    num_workers: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0: only at epoch ends)
    keep_checkpoints: int = 2
    resume: str = "never"  # never | auto | a checkpoint directory
    resume_other_data: bool = False  # resume even though the data differs from the checkpoint's (its fingerprint)
    # Evaluated on the validation split at every eval_every step and at the end (train/selection.py):
    select: SelectConfig | None = None  # null: the last step's adapter is kept
    early_stop: EarlyStopConfig | None = None  # null: train every step

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _check(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _check(self.grad_accum > 0, f"train.grad_accum must be > 0, got {self.grad_accum}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas must be two numbers in [0, 1)"
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm must be > 0 (or null)")
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps must be > 0 (or null)")
        _check(self.eval_every > 0 and self.eval_batches > 0, "train.eval_every and train.eval_batches must be > 0")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.num_workers >= 0, "train.num_workers must be >= 0")


@dataclass(frozen=True)
class DistConfig:
    strategy: StrategyChoice = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = 600  # collective timeout: a dead rank never leaves the others hanging forever
    deepspeed_config: str | None = None  # configs/deepspeed/zero2.yaml etc.
    # torch: torch's fused AdamW (nothing to compile); deepspeed: DeepSpeed's own, FusedAdam on GPUs or
    # DeepSpeedCPUAdam under optimizer offload, compiled at first use (nvcc matching torch's CUDA; ninja)
    deepspeed_optimizer: Literal["torch", "deepspeed"] = "torch"

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "dist.timeout_s must be > 0")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline if wandb is installed
    project: str = "lora-dist"
    entity: str | None = None
    name: str | None = None
    group: str | None = None  # default: the launcher's job id (Slurm job id or torchrun run id)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: int = 10  # steps between metric lines / progress updates

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "tracking.log_every must be > 0")


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/default"
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(
            bool(self.output_dir.strip()),
            "output_dir is empty, which would write the run into the current directory; "
            "pass output_dir=runs/NAME (or output_dir=. to mean the current directory)",
        )

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the resolved config; ranks compare it at start-up."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, and validate."""
    raw = read_raw(path, overrides)
    if "sweep" in raw:
        where = f"config file {path} has" if path else "the overrides give"
        raise UserError(
            f"{where} a sweep: section, which trains many adapters; run it with lora-dist sweep --config FILE "
            f"(or remove the section to train one adapter)"
        )
    return build(Config, raw, "")


# Bounds on what a YAML text can make the loader build: nesting (a config is 3 levels deep, a sweep's a few
# more) and aliases (*name: a few lines of them expand to billions of values, "billion laughs").
MAX_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and nesting deeper than MAX_DEPTH, as a YAMLError (ComposerError)
    at once, before anything is built from them."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{event.anchor} is not allowed in a lora-dist config (aliases can expand to billions of "
                f"values); write the value out",
                event.start_mark,
            )
        if self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, bounded: aliases and nesting deeper than MAX_DEPTH are a yaml.YAMLError."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """The YAML file as a plain mapping (or an empty one), with `a.b=value` overrides applied; not yet
    checked against the config's types."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found; pass --config with an existing YAML file (see configs/)")
        try:
            raw = load_yaml(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise UserError(f"config file {p} is not UTF-8 (bad byte at offset {e.start}); re-save it as UTF-8") from e
        except OSError as e:
            raise UserError(f"config file {p} cannot be read ({e.strerror}); check its permissions") from e
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML ({_first_line(e)}); fix the syntax") from e
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must hold a mapping of keys to values, not {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b=value` (the value read as YAML) in the plain mapping `raw`."""
    if "=" not in item:
        raise UserError(f"override {item!r:.200} is not key=value; write e.g. train.epochs=3")
    key, value = item.split("=", 1)
    try:
        parsed = load_yaml(value) if value != "" else ""
    except yaml.YAMLError:  # e.g. [*.att.*]: '*' is YAML's alias sign; read a bracketed list by hand
        v = value.strip()
        parsed = [x.strip() for x in v[1:-1].split(",") if x.strip()] if v[:1] == "[" and v[-1:] == "]" else value
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r:.200}: {part} is not a section")
    node[parts[-1]] = parsed


def build(cls: type[T], raw: Any, prefix: str) -> T:
    """Build dataclass `cls` from a plain mapping, checking keys and value types."""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r:.200}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        where = f"in section '{prefix.rstrip('.')}'" if prefix else "at the top level"
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        mean = f"did you mean '{prefix}{close[0]}'? " if close else ""
        raise UserError(
            f"unknown config key '{prefix}{str(unknown[0])[:100]}' {where}; {mean}valid keys: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:  # a value checked where it is used (a sweep's values, by the key they set)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r:.200}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping; got {value!r:.200}")
        return {_coerce(key_type, k, key): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list; got {value!r:.200}")
        return tuple(_coerce(elem, v, key) for v in value)
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{key} must be a finite number; got {value!r:.200}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise UserError(f"{key} must be {tp.__name__}; got {value!r:.200} ({type(value).__name__})")


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts (for help text and tests)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += valid_keys(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out
