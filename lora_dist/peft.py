"""PEFT's layout for transformers' GPT2ForSequenceClassification, and reading a PEFT LoRA adapter as a
lora-dist adapter.

    python -c "from lora_dist import Classifier; print(Classifier.from_pretrained('exports/smoke-peft').predict(['hi']))"

`hf_modules`, `PREFIX` and `SIDECAR` name where our layers sit in PEFT's files (`export.write_peft` writes
them). `read` is the inverse of `export.write_peft`, for lora-dist's own exports and for adapters trained elsewhere with
PEFT. Each LoRA block becomes adapters on our separate Linear layers: the fused `c_attn`'s rows split into
query, key and value, each keeping only the columns of lora_B its rows use (a lora-dist export's
block-diagonal B gives back the original ranks; a dense one gives each projection the whole block). PEFT's
per-block scale is folded into B, and every layer is zero-padded to the largest rank, so one lora-dist
rank and scale describe them all, exactly. `score` becomes the head (bias zero), other saved modules
(`ln_f`, ...) replace the base's tensors (`AdapterSpec.overrides`). What has no lora-dist form (LoRA on the
embeddings, DoRA, LoRA biases, other PEFT methods) is refused by name.

`describe` gives `read`'s AdapterSpec without reading a tensor (adapter_config.json, the sidecar and the
safetensors header): what a service's catalog lists at start (`infer/adapter_store.py`). Only the values tell
which columns of lora_B a layer uses, so without the sidecar it counts every layer of a block at the block's
rank; `agrees` says whether what `read` then gives fits that description.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapter import AdapterSpec, BaseModel, check_values, finite_number, whole
from .errors import UserError
from .files import read_json
from .lora import adapter_key
from .model import ALIASES, HUB_REPOS, GPTConfig
from .weights import from_hf, key_map, load_gpt2

T = TypeVar("T")
MAX_HEADER = 100_000_000  # bytes of a safetensors header, at most (safetensors' own bound)
SIDECAR = "lora_dist.json"  # the lora-dist description beside a PEFT export: labels, base, input rules
PREFIX = "base_model.model."  # what PEFT puts before the model's own parameter names
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters",
}

# adapter_config.json's keys that lora-dist reads, and what PEFT writes into them
CONFIG_TYPES = {
    "r": lambda v: whole(v, 1),
    "lora_alpha": finite_number,
    "lora_dropout": lambda v: v is None or finite_number(v),
    "rank_pattern": lambda v: v is None or (isinstance(v, dict) and all(map(finite_number, v.values()))),
    "alpha_pattern": lambda v: v is None or (isinstance(v, dict) and all(map(finite_number, v.values()))),
    "base_model_name_or_path": lambda v: v is None or isinstance(v, str),
}


def hf_modules(n_layers: int) -> dict[str, tuple[str, int | None]]:
    """Our LoRA-able Linear layers -> (module of GPT2ForSequenceClassification, slot in the fused c_attn)."""
    m: dict[str, tuple[str, int | None]] = {}
    for i in range(n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        m |= {
            b + "att.query": (h + "attn.c_attn", 0),
            b + "att.key": (h + "attn.c_attn", 1),
            b + "att.value": (h + "attn.c_attn", 2),
            b + "att.out": (h + "attn.c_proj", None),
            b + "ff.fc": (h + "mlp.c_fc", None),
            b + "ff.proj": (h + "mlp.c_proj", None),
        }
    return m


def is_peft_dir(path: str | Path) -> bool:
    """Whether PATH is a PEFT adapter directory (adapter_config.json with a peft_type)."""
    f = Path(path) / "adapter_config.json"
    try:
        config = read_json(f, "") if f.is_file() else None
    except UserError:
        return False
    return isinstance(config, dict) and "peft_type" in config


def read(path: Path, base: str | None) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """(AdapterSpec, tensors in lora-dist's names) of a PEFT LoRA adapter for GPT2ForSequenceClassification:
    a lora-dist export (its lora_dist.json gives labels, base and input rules) or one trained elsewhere."""
    cfg = _config(path)  # adapter_config.json, checked
    tensors = {k: t.float() for k, t in sorted(_tensors(path).items())}  # every one finite
    template, base_model, gpt = _base_of(path, cfg, base)
    blocks, saved = _group(tensors, path)  # LoRA blocks by PEFT's module, and the modules saved in full
    table = _table(gpt.n_layers)
    scales = {hf: _check_block(hf, _shapes(ab), cfg, gpt, table, path) for hf, ab in blocks.items()}
    parts = _split_blocks(blocks, scales, table, gpt.emb_dim)  # the blocks on our layers
    _check_found(bool(parts), set(saved), path)
    score = blocks.get("score")
    n = _classes(tuple(saved["score.weight"].shape), _shapes(score) if score else None, gpt.emb_dim, path)
    W = saved.pop("score.weight") + (_delta(score, scales["score"]) if score else 0)  # the head, its LoRA merged
    out = {"head.weight": W, "head.bias": saved.pop("score.bias", torch.zeros(n))}
    overrides = _overrides(saved, gpt, path)  # the other saved modules replace the base's tensors
    out |= overrides
    order = list(hf_modules(gpt.n_layers))
    targets = sorted(parts, key=order.index)
    R = max(a.shape[1] for a, _ in parts.values())
    scale = template.lora["scale"] if template and template.lora else 1.0
    out |= _padded({ours: parts[ours] for ours in targets}, R, scale)
    return _spec(path, cfg, template, base_model, gpt, base, targets, R, n, tuple(overrides)), out


def describe(path: Path, base: str | None) -> AdapterSpec:
    """The AdapterSpec `read` gives, from adapter_config.json, lora-dist's description beside an export and the
    tensor file's header alone: no tensor is read (a service lists thousands at start, `infer/adapter_store.py`).
    Everything `read` checks on names and shapes is checked here; the values (finite, and B's columns that
    are zero) only `read` sees, so its layers and rank may be fewer (`agrees`)."""
    cfg = _config(path)
    shapes = _header(path)
    template, base_model, gpt = _base_of(path, cfg, base)
    blocks, saved = _group(shapes, path)
    table = _table(gpt.n_layers)
    for hf, ab in blocks.items():
        _check_block(hf, ab, cfg, gpt, table, path)
    targets, R = _outline(blocks, table, template, gpt.n_layers)
    _check_found(bool(targets), set(saved), path)
    n_classes = _classes(saved.pop("score.weight"), blocks.get("score"), gpt.emb_dim, path)
    saved.pop("score.bias", None)
    overrides = _override_names(saved, gpt, path)
    return _spec(path, cfg, template, base_model, gpt, base, targets, R, n_classes, overrides)


def agrees(read_spec: AdapterSpec, described: AdapterSpec) -> bool:
    """Whether `read`'s spec is the one `describe` gave, but for layers and rank that B's zero columns leave out
    (a layer whose rows of a fused c_attn are all zero is no target; fewer columns, a lower rank): the slots
    sized for the described one hold it."""
    a, d = read_spec.lora or {}, described.lora or {}
    loose = ("rank", "targets", "alpha", "scaling")
    return (
        replace(read_spec, lora=d) == described
        and {k: v for k, v in a.items() if k not in loose} == {k: v for k, v in d.items() if k not in loose}
        and a.get("rank", 0) <= d.get("rank", 0)
        and set(a.get("targets", ())) <= set(d.get("targets", ()))
    )


# ------------------------------------------------------------------------------------ read's steps


def _base_of(path: Path, cfg: dict, base: str | None) -> tuple[AdapterSpec | None, BaseModel, GPTConfig]:
    """(lora-dist's description beside an export or None, the base, the base's shape): the sidecar names the
    base of a lora-dist export; otherwise base_model_name_or_path (or --base) does."""
    template = _sidecar(path / SIDECAR)
    base_model = template.base if template else _base(cfg.get("base_model_name_or_path"), base, path)
    return template, base_model, _gpt_config(base_model, base)


def _group(tensors: Mapping[str, T], path: Path) -> tuple[dict[str, dict[str, T]], dict[str, T]]:
    """PEFT's tensors (or their shapes) by what they are, without PEFT's prefix: ({HF module: {"lora_A": .,
    "lora_B": .}}, {saved module's tensor: .}); a LoRA tensor lora-dist has no form for is refused."""
    blocks: dict[str, dict[str, T]] = {}
    saved: dict[str, T] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if m:
            blocks.setdefault(m[1], {})[m[2]] = t
        elif "lora_" in name:
            raise UserError(
                f"{path}: tensor '{key}' has no lora-dist form (only lora_A/lora_B weights on GPT-2's "
                f"Linear layers are read)"
            )
        else:
            saved[name] = t
    return blocks, saved


def _table(n_layers: int) -> dict[str, list[tuple[int | None, str]]]:
    """HF module -> [(slot in the fused c_attn, our layer)]: `hf_modules` inverted."""
    table: dict[str, list[tuple[int | None, str]]] = {}
    for ours, (hf, slot) in hf_modules(n_layers).items():
        table.setdefault(hf, []).append((slot, ours))
    return table


def _check_block(
    hf: str, ab: dict[str, tuple[int, ...]], cfg: dict, gpt: GPTConfig, table: dict[str, list], path: Path
) -> float:
    """PEFT's scale of one LoRA block (alpha / r; alpha / sqrt(r) with rsLoRA), once the shapes of its lora_A
    (r, in) and lora_B (out, r) are checked: both there, of adapter_config.json's rank, on a layer lora-dist
    has, of this base's size."""
    if set(ab) != {"lora_A", "lora_B"}:
        raise UserError(f"{path}: '{hf}' has only {sorted(ab)}; the adapter file is incomplete")
    A, B = ab["lora_A"], ab["lora_B"]
    r_cfg = _pattern(cfg, "rank_pattern", hf, cfg.get("r", 8))
    alpha = _pattern(cfg, "alpha_pattern", hf, cfg.get("lora_alpha", 8))
    if len(A) != 2 or len(B) != 2 or A[0] != B[1] or A[0] != int(r_cfg):
        raise UserError(
            f"{path}: '{hf}' has lora_A {list(A)} and lora_B {list(B)}, which do not "
            f"fit rank {r_cfg} of adapter_config.json; the file is damaged or from another adapter"
        )
    s = float(alpha) / (math.sqrt(r_cfg) if cfg.get("use_rslora") else r_cfg)
    if hf == "score":
        return s
    if hf not in table:
        raise UserError(
            f"{path}: PEFT adapts '{hf}', which lora-dist has no LoRA layer for (it adapts the "
            f"attention, feed-forward and score layers of GPT-2)"
        )
    C = gpt.emb_dim
    kind = hf.rsplit(".", 1)[-1]
    dims = {"c_attn": (C, 3 * C), "c_proj": None, "c_fc": (C, 4 * C)}
    want = dims[kind] or ((C, C) if ".attn." in hf else (4 * C, C))
    if (A[1], B[0]) != want:
        raise UserError(
            f"{path}: '{hf}' maps {A[1]} -> {B[0]} features, but this base's layer is "
            f"{want[0]} -> {want[1]}; the adapter is for another GPT-2 size (pass the right --base)"
        )
    return s


def _split_blocks(
    blocks: dict[str, dict[str, torch.Tensor]], scales: dict[str, float], table: dict[str, list], C: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each block (but score's) as adapters on our layers, {layer: (A (in, k), B (k, out))}, the block's scale
    folded into B: the fused c_attn's rows split into query, key and value, each keeping only the columns of
    lora_B its rows use (a layer whose rows are all zero is left out)."""
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for hf, ab in blocks.items():
        if hf == "score":
            continue
        A, B, s = ab["lora_A"], ab["lora_B"], scales[hf]  # (r, in), (out, r)
        for slot, ours in table[hf]:
            rows = B if slot is None else B[slot * C : (slot + 1) * C]  # (out, r)
            cols = rows.abs().sum(dim=0).nonzero().flatten()
            if len(cols):
                parts[ours] = (A[cols].t(), rows[:, cols].t() * s)  # (in, k), (k, out), scale folded in
    return parts


def _outline(
    blocks: dict[str, dict[str, tuple[int, ...]]], table: dict[str, list], template: AdapterSpec | None, n_layers: int
) -> tuple[list[str], int]:
    """(targets, rank) `_split_blocks` gives, from the blocks' shapes: a lora-dist export's layers and rank as
    its description names them; for other adapters every layer of each block, of the block's rank."""
    order = list(hf_modules(n_layers))
    present = {ours: ab["lora_A"][0] for hf, ab in blocks.items() if hf != "score" for _, ours in table[hf]}
    if template and template.lora:
        named = set(template.lora["targets"])
        targets = [o for o in order if o in present and o in named]
        return targets, int(template.lora["rank"]) if targets else 0
    targets = [o for o in order if o in present]
    return targets, max((present[o] for o in targets), default=0)


def _shapes(ab: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in ab.items()}


def _check_found(layers: bool, saved: set[str], path: Path) -> None:
    """UserError when the adapter adapts none of GPT-2's layers or does not save its classification head."""
    if not layers:
        raise UserError(f"{path} holds no LoRA tensors for GPT-2's layers; it is not a LoRA adapter lora-dist can use")
    if "score.weight" not in saved:
        raise UserError(
            f"{path} does not save the 'score' layer (modules_to_save), so the classification head it "
            f"was trained with is missing; save the adapter with task_type SEQ_CLS"
        )


def _delta(ab: dict[str, torch.Tensor], s: float) -> torch.Tensor:
    """The weight delta (out, in) of one LoRA block: s B A."""
    return s * (ab["lora_B"] @ ab["lora_A"])


def _padded(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], R: int, scale: float) -> dict[str, torch.Tensor]:
    """Our layers' A (in, R) and B (R, out), in lora-dist's names: every layer zero-padded to rank R, B divided
    by the one lora-dist scale (`read` folds each block's own scale into B first)."""
    out: dict[str, torch.Tensor] = {}
    for ours, (a, b) in parts.items():
        A, B = torch.zeros(a.shape[0], R), torch.zeros(R, b.shape[1])
        A[:, : a.shape[1]], B[: b.shape[0]] = a, b / scale
        out[adapter_key(ours, "A")], out[adapter_key(ours, "B")] = A, B
    return out


def _spec(
    path: Path,
    cfg: dict,
    template: AdapterSpec | None,
    base_model: BaseModel,
    gpt: GPTConfig,
    base: str | None,
    targets: list[str],
    R: int,
    n_classes: int,
    overrides: tuple[str, ...],
) -> AdapterSpec:
    """The AdapterSpec of the adapter: rank R and lora-dist's scale (the sidecar's, else 1) over `targets`,
    the head in full; labels, input rules and base from the sidecar, else from the base; checked."""
    scale = template.lora["scale"] if template and template.lora else 1.0
    lora_spec = {
        "rank": R,
        "alpha": scale,
        "scaling": "alpha",
        "scale": scale,
        "dropout": float(cfg.get("lora_dropout") or 0.0),
        "targets": targets,
        "head": False,
        "train_head": False,
    }
    if template and template.lora and template.lora["rank"] == R:
        lora_spec |= {k: template.lora[k] for k in ("alpha", "scaling")}
    labels = template.labels if template else _labels(base_model, base, n_classes)
    if len(labels) != n_classes:
        raise UserError(
            f"{path}: score has {n_classes} rows but {SIDECAR} names {len(labels)} labels; restore the export"
        )
    spec = AdapterSpec(
        kind="lora",
        base=base_model,
        labels=tuple(labels),
        lora=lora_spec,
        max_length=template.max_length if template else gpt.context_length,
        pad_to=template.pad_to if template else None,
        pad_token_id=template.pad_token_id if template else 50256,
        overrides=overrides,
        extra={"peft": str(path)},
    )
    spec.check(str(path))
    return spec


def _config(path: Path) -> dict:
    file = path / "adapter_config.json"
    cfg = read_json(file, "restore the file")
    if not isinstance(cfg, dict):
        raise UserError(f"{file} holds {type(cfg).__name__}, not a PEFT adapter config; restore the file")
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{path} is a PEFT {cfg.get('peft_type')} adapter; lora-dist reads LoRA adapters only")
    if cfg.get("task_type") not in (None, "SEQ_CLS"):
        raise UserError(
            f"{path} is a PEFT adapter for {cfg['task_type']}; lora-dist reads adapters for "
            f"GPT2ForSequenceClassification (task_type SEQ_CLS)"
        )
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise UserError(f"{path} uses {what} ({key}), which lora-dist cannot represent")
    for key, ok in CONFIG_TYPES.items():
        if key in cfg and not ok(cfg[key]):
            raise UserError(f"{file}: {key} has the value {cfg[key]!r:.80}, which PEFT never writes; restore the file")
    return cfg


def _tensor_file(path: Path) -> Path:
    """The adapter's adapter_model.safetensors, or a UserError (saying so when only PEFT's pickle is there)."""
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        pickle = (
            " (adapter_model.bin is a pickle, which lora-dist never loads: re-save it with safe_serialization=True)"
        )
        raise UserError(f"{file} not found{pickle if (path / 'adapter_model.bin').exists() else ''}")
    return file


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, every one floating point and finite."""
    file = _tensor_file(path)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read ({e}); it is damaged, export or download it again") from e
    check_values(tensors, str(file))
    return tensors


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} from the safetensors header alone (its 8-byte length, then that much JSON), nothing past
    it read; every tensor floating point, as `_tensors` wants them."""
    file = _tensor_file(path)
    damaged = "; it is damaged, export or download it again"
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= MAX_HEADER:
                raise ValueError(f"a header of {n} bytes")
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{file} cannot be read ({e}){damaged}") from e
    if not isinstance(header, dict):
        raise UserError(f"{file} cannot be read (its header is not a JSON object){damaged}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(whole(d, 0) for d in shape) or not isinstance(dtype, str):
            raise UserError(f"{file} cannot be read (tensor {name!r:.80} has no dtype and shape){damaged}")
        if not dtype.startswith(("F", "BF")):
            raise UserError(
                f"{file}: tensor '{name}' is {dtype}; adapters hold floating-point tensors, so this file was not "
                f"written by training: restore it"
            )
        shapes[name] = tuple(shape)
    return dict(sorted(shapes.items()))  # in `_tensors`' order


def _sidecar(file: Path) -> AdapterSpec | None:
    if not file.is_file():
        return None
    fix = "restore it, or delete it to read the adapter as PEFT describes it"
    return AdapterSpec.from_json(read_json(file, fix), str(file))


def _pattern(cfg: dict, key: str, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches the module name or a dotted suffix of it."""
    for pattern, value in (cfg.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _base(ref: str | None, base: str | None, path: Path) -> BaseModel:
    """The base that base_model_name_or_path (or --base) names: a GPT-2 on the hub or a local directory."""
    if base is not None:
        return BaseModel(str(base), str(Path(base).resolve()))
    if not ref:
        raise UserError(f"{path}/adapter_config.json names no base_model_name_or_path; pass --base DIR")
    name = ALIASES.get(ref.strip().lower(), ref.strip().lower())
    if name in HUB_REPOS:
        return BaseModel(name, HUB_REPOS[name])
    if Path(ref).is_dir():
        return BaseModel(ref, str(Path(ref).resolve()))
    raise UserError(
        f"{path}: its base '{ref}' is neither a GPT-2 on the hub lora-dist knows nor a directory here; "
        f"pass --base DIR (config.json + model.safetensors)"
    )


def _gpt_config(b: BaseModel, base: str | None) -> GPTConfig:
    """The base's shape (built on the meta device: nothing read but a config.json), once per base and version of
    its config.json: building it is most of the time of describing an adapter, and a catalog describes thousands."""
    where = base or (b.name if b.source == "random" or b.source in HUB_REPOS.values() else b.source)
    try:
        s = (Path(where) / "config.json").stat()
        version: tuple[int, ...] = (s.st_mtime_ns, s.st_size, s.st_ino)
    except OSError:
        version = ()
    return _shape(where, b.context_length, version)


@functools.lru_cache(maxsize=64)
def _shape(where: str, context_length: int | None, version: tuple[int, ...]) -> GPTConfig:
    with torch.device("meta"):
        return load_gpt2(where, "random", context_length=context_length).cfg


def _labels(b: BaseModel, base: str | None, n: int) -> list[str]:
    """The base's id2label when it has n of them, else transformers' LABEL_0, LABEL_1, ..."""
    f = Path(base or b.source) / "config.json"
    try:
        id2label = json.loads(f.read_text()).get("id2label") or {}
        labels = [id2label[str(i)] for i in range(n)]
        if len(id2label) == n:
            return labels
    except (OSError, ValueError, KeyError, AttributeError, RecursionError):
        pass
    return [f"LABEL_{i}" for i in range(n)]


def _overrides(saved: dict[str, torch.Tensor], gpt: GPTConfig, path: Path) -> dict[str, torch.Tensor]:
    """Saved base modules (modules_to_save other than score) in lora-dist's names."""
    table = key_map(gpt)
    out: dict[str, torch.Tensor] = {}
    for name, t in saved.items():
        ours, kind = table[_place(name, table, path)]
        out |= dict(zip(ours, from_hf(t, kind, len(ours), gpt.emb_dim), strict=True))
    return out


def _override_names(saved: Mapping[str, object], gpt: GPTConfig, path: Path) -> tuple[str, ...]:
    """The names `_overrides` gives, from the saved modules' names alone."""
    table = key_map(gpt)
    return tuple(dict.fromkeys(o for name in saved for o in table[_place(name, table, path)][0]))


def _place(name: str, table: dict[str, tuple[list[str], str]], path: Path) -> str:
    """A saved module's tensor name as `weights.key_map` knows it, or a UserError."""
    key = name.removeprefix("transformer.")
    if key not in table:
        raise UserError(f"{path} saves '{name}', which lora-dist has no place for")
    return key


def _classes(score: tuple[int, ...], block: dict[str, tuple[int, ...]] | None, C: int, path: Path) -> int:
    """The number of classes, once score's weight (classes, C) and its LoRA block, if any, are checked to fit."""
    if len(score) != 2 or score[1] != C or score[0] < 1:
        raise UserError(
            f"{path}: score.weight is {list(score)}, not (classes, {C}) for this base; the file is damaged or "
            f"for another GPT-2 size (pass the right --base)"
        )
    if block is not None and (block["lora_A"][1], block["lora_B"][0]) != (C, score[0]):
        raise UserError(
            f"{path}: score's LoRA maps {block['lora_A'][1]} -> {block['lora_B'][0]} features, but its weight is "
            f"{C} -> {score[0]}; the file is damaged or from another adapter"
        )
    return score[0]
