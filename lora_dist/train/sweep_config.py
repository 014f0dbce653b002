"""A sweep's config: the usual config plus a `sweep:` section, expanded into one config per adapter.

    lora-dist sweep --config configs/sweep-smoke.yaml

    sweep:
      grid: {lora.rank: [4, 8, 16], train.lr: [1e-4, 5e-4]}   # every combination (6 adapters), and/or
      adapters: [{name: small, lora.rank: 4}, {name: att, lora.targets: ["*.att.*"]}]
      max_concurrent: 4                                         # adapters trained at a time; the rest queue

Each adapter is the config with its own `key=value` overrides applied as `lora-dist train` applies them, so
`lora-dist train --config FILE KEY=VALUE...` (FILE without its sweep section) trains the same adapter alone.
Only what leaves the shared frozen base alone may vary between adapters; any other key is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import Config, apply_override, build, read_raw
from ..errors import UserError
from .registry import STRATEGIES

# What an adapter may set: its data, its LoRA, its optimisation and its W&B name. The rest is the job's.
VARY = ("model.num_classes", "data.", "lora.", "tracking.wandb.name", "tracking.wandb.tags") + tuple(
    f"train.{k}"
    for k in (
        "epochs batch_size lr weight_decay betas schedule warmup_steps max_grad_norm max_steps eval_every "
        "eval_batches seed"
    ).split()
)
# Keys that make another frozen base (what the adapters share): refused with that reason.
BASE = ("model.", "train.precision", "train.trainable", "train.tf32")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the rule for `serve`'s adapter names
# The most adapters one sweep makes: each is set up (its data, its head and LoRA, its run directory) and
# summarised on its own; sweep.max_concurrent of them train at a time, the rest queue.
MAX_ADAPTERS = 1024
# The command line's overrides that do not make an adapter (where the sweep writes, whether it resumes).
JOB_ONLY = ("output_dir=", "overwrite=", "train.resume=", "sweep.")


@dataclass(frozen=True)
class PruneConfig:
    """sweep.prune: successive halving (asynchronous, as Ray Tune's ASHA). Each adapter is evaluated on the
    validation split at its rungs, steps min_steps x eta^k; one whose metric is not in the best 1/eta of those
    recorded at that rung so far stops there (its adapter kept, marked pruned), and a queued adapter takes its slot."""

    method: Literal["successive_halving"] = "successive_halving"
    min_steps: int = 50  # the first rung: every adapter trains at least this many steps
    eta: int = 3  # the reduction factor: about 1 in eta adapters goes on at each rung
    metric: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    mode: Literal["min", "max"] | None = None  # default: min for val_loss, max for the others
    examples: int | None = None  # evaluate the first N validation messages (a fixed subset); default: all

    def __post_init__(self) -> None:
        if self.min_steps < 1:
            raise UserError(f"sweep.prune.min_steps must be >= 1, got {self.min_steps}")
        if self.eta < 2:
            raise UserError(
                f"sweep.prune.eta must be >= 2 (the share of adapters kept at a rung is 1/eta), got {self.eta}"
            )
        if self.examples is not None and self.examples < 1:
            raise UserError("sweep.prune.examples must be >= 1 (or null: the whole validation split)")

    @property
    def direction(self) -> str:
        return self.mode or ("min" if self.metric == "val_loss" else "max")

    def rungs(self, total_steps: int) -> list[int]:
        """The steps, before `total_steps`, at which an adapter of that many steps is judged."""
        out, r = [], self.min_steps
        while r < total_steps:
            out.append(r)
            r *= self.eta
        return out


@dataclass(frozen=True)
class SweepConfig:
    grid: dict[str, tuple[Any, ...]] | None = None  # dotted key -> its values: every combination is an adapter
    adapters: tuple[dict[str, Any], ...] = ()  # explicit adapters: {name: ..., dotted key: value, ...}
    max_concurrent: int | None = None  # adapters trained at once (default: all); the rest wait for a free slot
    prune: PruneConfig | None = None  # null: every adapter trains to its end

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise UserError(
                f"sweep.max_concurrent must be >= 1 (or null: every adapter at once), got {self.max_concurrent}"
            )


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    overrides: tuple[str, ...]  # what makes it: `lora-dist train --config FILE` plus these (FILE without sweep:)
    settings: dict  # its own keys and values, as the sweep gave them
    cfg: Config  # its resolved config, writing into the sweep's adapters/NAME/


@dataclass(frozen=True)
class SweepPlan:
    cfg: Config  # the config without its sweep section: the job's settings and the shared base
    sweep: SweepConfig
    adapters: tuple[AdapterPlan, ...]
    resolved: dict  # the whole sweep config, resolved: what config.yaml holds

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def digest(self) -> str:
        """A short hash of the whole resolved sweep config; ranks compare it at start-up."""
        return _hash(self.resolved)

    def identity(self) -> str:
        """A short hash of what the sweep trains: its adapters and the job's settings, but not where it writes
        or whether it resumes. A checkpoint is resumed only by a sweep of the same identity."""
        job = {**self.cfg.to_dict(), "output_dir": None, "overwrite": None}
        job["train"] = {**job["train"], "resume": None}
        prune = [dataclasses.asdict(self.sweep.prune)] if self.sweep.prune is not None else []
        return _hash([job, [(a.name, a.overrides) for a in self.adapters], *prune])


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepPlan:
    """The sweep config FILE with its command line's overrides: the job's config and one config per adapter,
    each checked as a config file is."""
    raw = read_raw(path, overrides)
    section = raw.pop("sweep", None)
    if section is None:
        raise UserError(
            f"config file {path} has no sweep: section; add one (e.g. sweep: {{grid: {{lora.rank: [4, 8]}}}}), "
            f"or train one adapter with lora-dist train"
        )
    sweep = build(SweepConfig, section, "sweep.")
    cfg = build(Config, copy.deepcopy(raw), "")
    _check_job(cfg)
    made = [o for o in overrides if not o.startswith(JOB_ONLY)]
    plans: list[AdapterPlan] = []
    seen: dict[str, int] = {}
    for name, settings in _adapters(sweep):
        if name in seen:
            raise UserError(
                f"two adapters of the sweep are named '{name}' (numbers {seen[name] + 1} and {len(plans) + 1}); "
                f"give each a name of its own, or drop the one that repeats another's settings"
            )
        seen[name] = len(plans)
        plans.append(_plan(name, settings, raw, cfg, made))
    resolved = {**cfg.to_dict(), "sweep": dataclasses.asdict(sweep)}
    return SweepPlan(cfg, sweep, tuple(plans), json.loads(json.dumps(resolved, default=list)))


def _adapters(sweep: SweepConfig) -> list[tuple[str, dict]]:
    """(name, {dotted key: value}) of every adapter: the grid's combinations, then the listed adapters."""
    out = []
    if sweep.grid is not None:
        if not sweep.grid:
            raise UserError("sweep.grid is empty; give keys and their values, e.g. grid: {lora.rank: [4, 8]}")
        for key, values in sweep.grid.items():
            if not values:
                raise UserError(f"sweep.grid {key} has no values; list at least one, e.g. {key}: [...]")
        sizes = [len(v) for v in sweep.grid.values()]
        n = math.prod(sizes) + len(sweep.adapters)
        if n > MAX_ADAPTERS:  # counted before one is made: a 100 x 100 grid is refused at once
            listed = f" + {len(sweep.adapters)} listed" if sweep.adapters else ""
            raise UserError(
                f"the sweep makes {n:,} adapters ({' x '.join(map(str, sizes))} from sweep.grid{listed}), more than "
                f"one sweep trains (at most {MAX_ADAPTERS:,}); list fewer values, or split it into several sweeps"
            )
        keys = list(sweep.grid)
        for combo in itertools.product(*sweep.grid.values()):
            settings = dict(zip(keys, combo, strict=True))
            out.append((_auto_name(settings), settings))
    for entry in sweep.adapters:
        settings = _flat(entry)
        name = settings.pop("name", None)
        out.append((str(name) if name is not None else _auto_name(settings), settings))
    if not out:
        raise UserError("the sweep has no adapters (N = 0); list values in sweep.grid or adapters in sweep.adapters")
    for name, _ in out:
        if not NAME.match(name):
            raise UserError(
                f"sweep adapter name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                f"or digit; set name: in sweep.adapters"
            )
    return out


def _flat(entry: dict, prefix: str = "") -> dict:
    """{lora: {rank: 8}} and {lora.rank: 8} alike -> {"lora.rank": 8}."""
    out: dict = {}
    for k, v in entry.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def _auto_name(settings: dict) -> str:
    """e.g. rank8-lr0.0001: each key's last part and its value (the whole key where two share a last part)."""
    if not settings:
        return "base"
    short = [k.rsplit(".", 1)[-1] for k in settings]
    parts = []
    for key, s in zip(settings, short, strict=True):
        label = s if short.count(s) == 1 else key
        value = settings[key]
        text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        parts.append(label + re.sub(r"[^A-Za-z0-9_.+-]", "_", text).replace("+", "_"))
    name = "-".join(parts)
    return name if len(name) <= 64 else hashlib.sha256(name.encode()).hexdigest()[:12]


def override_text(key: str, value: Any) -> str:
    """`key=value` that reads back (as `lora-dist train` reads overrides) as `value`."""
    text = value if isinstance(value, str) else _yaml(value)
    try:
        same = yaml.safe_load(text) == value
    except yaml.YAMLError:
        same = False
    return f"{key}={text if same else _yaml(value)}"


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _plan(name: str, settings: dict, raw: dict, job: Config, made: list[str]) -> AdapterPlan:
    own = [override_text(k, v) for k, v in settings.items()]
    mine = copy.deepcopy(raw)
    try:
        for item in own:
            apply_override(mine, item)
        cfg = build(Config, mine, "")
    except UserError as e:
        raise UserError(f"sweep adapter '{name}': {e}") from e
    _check_adapter(name, cfg, job)
    run = Path(job.output_dir) / "adapters" / name
    w = cfg.tracking.wandb
    cfg = dataclasses.replace(
        cfg,
        output_dir=str(run),
        overwrite=False,  # the sweep replaces (or resumes) its whole directory itself
        tracking=dataclasses.replace(
            cfg.tracking, wandb=dataclasses.replace(w, group=w.group or Path(job.output_dir).resolve().name)
        ),
    )
    return AdapterPlan(name, tuple(made + own), settings, cfg)


def _flat_config(cfg: Config) -> dict:
    return _flat(cfg.to_dict())


def _check_adapter(name: str, cfg: Config, job: Config) -> None:
    """Refuse what an adapter may not change: the shared base, and the job's own settings."""
    mine, base = _flat_config(cfg), _flat_config(job)
    for key in mine:
        if mine[key] == base[key] or key.startswith(VARY):
            continue
        if key.startswith(BASE):
            raise UserError(
                f"sweep adapter '{name}' sets {key}, which changes the frozen base that a sweep's adapters share; "
                f"set it outside sweep: (one base per sweep), or run one sweep per value"
            )
        raise UserError(
            f"sweep adapter '{name}' sets {key}, which is one setting for the whole sweep job; set it outside sweep:"
        )
    if job.model.weights == "random" and cfg.train.seed != job.train.seed:
        raise UserError(
            f"sweep adapter '{name}' sets train.seed={cfg.train.seed}, but with model.weights=random train.seed also "
            f"draws the base the adapters share; write that base once and point model.weights at it: python -c "
            f'"import torch, lora_dist as L; torch.manual_seed({job.train.seed}); '
            f"L.save_hf_checkpoint(L.load_gpt2('{job.model.name}', 'random'), 'runs/base')\" then model.weights=runs/base"
        )
    if job.model.activation_checkpointing and cfg.lora.dropout > 0:
        raise UserError(
            f"sweep adapter '{name}' sets lora.dropout={cfg.lora.dropout:g} with model.activation_checkpointing, "
            f"whose recomputed dropout masks a sweep cannot keep each adapter's own; drop one of the two"
        )


def _check_job(cfg: Config) -> None:
    """What a sweep cannot do exactly, refused before anything is written."""
    why = None
    if cfg.train.trainable != "lora":
        why = f"train.trainable={cfg.train.trainable} trains base layers, which a sweep's adapters share; use lora"
    elif cfg.dist.strategy in STRATEGIES and STRATEGIES[cfg.dist.strategy].owns_optimizer:
        why = (
            f"dist.strategy={cfg.dist.strategy} runs one optimizer with one gradient clip over every trained tensor, but each "
            "adapter of a sweep has its own; use dist.strategy=ddp (or auto), which all-reduces the adapters' "
            "gradients in one bucket"
        )
    elif cfg.train.precision == "fp16":
        why = "train.precision=fp16 shares one loss scale, so one adapter's overflow would skip the others' steps; use bf16 or fp32"
    elif cfg.model.dropout > 0:
        why = (
            f"model.dropout={cfg.model.dropout:g} drops activations of the shared base, whose random masks cannot "
            f"be each adapter's own; use model.dropout=0 (adapters may set lora.dropout)"
        )
    elif cfg.train.compile:
        why = "train.compile=true: a sweep's batches change shape as adapters join and leave; drop it"
    if why:
        raise UserError(f"a sweep cannot run with {why}")
