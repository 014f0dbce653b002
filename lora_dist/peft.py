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
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapter import AdapterSpec, BaseModel, check_values, finite_number, whole
from .errors import UserError
from .files import read_json
from .lora import adapter_key
from .model import ALIASES, HUB_REPOS
from .weights import from_hf, key_map, load_gpt2

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


def is_peft_dir(path) -> bool:
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
    cfg = _config(path)
    tensors = _tensors(path)
    template = _sidecar(path / SIDECAR)
    base_model = template.base if template else _base(cfg.get("base_model_name_or_path"), base, path)
    gpt = _gpt_config(base_model, base)
    C = gpt.emb_dim
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if m:
            lora.setdefault(m[1], {})[m[2]] = t.float()
        elif "lora_" in name:
            raise UserError(
                f"{path}: tensor '{key}' has no lora-dist form (only lora_A/lora_B weights on GPT-2's "
                f"Linear layers are read)"
            )
        else:
            saved[name] = t.float()
    table: dict[str, list] = {}
    for ours, (hf, slot) in hf_modules(gpt.n_layers).items():
        table.setdefault(hf, []).append((slot, ours))
    dims = {"c_attn": (C, 3 * C), "c_proj": None, "c_fc": (C, 4 * C)}
    parts, head_delta = {}, None
    for hf, ab in lora.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: '{hf}' has only {sorted(ab)}; the adapter file is incomplete")
        A, B = ab["lora_A"], ab["lora_B"]  # (r, in), (out, r)
        r_cfg, alpha = (
            _pattern(cfg, "rank_pattern", hf, cfg.get("r", 8)),
            _pattern(cfg, "alpha_pattern", hf, cfg.get("lora_alpha", 8)),
        )
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] != int(r_cfg):
            raise UserError(
                f"{path}: '{hf}' has lora_A {list(A.shape)} and lora_B {list(B.shape)}, which do not "
                f"fit rank {r_cfg} of adapter_config.json; the file is damaged or from another adapter"
            )
        s = float(alpha) / (math.sqrt(r_cfg) if cfg.get("use_rslora") else r_cfg)
        if hf == "score":
            head_delta = s * (B @ A)  # (classes, C)
            continue
        if hf not in table:
            raise UserError(
                f"{path}: PEFT adapts '{hf}', which lora-dist has no LoRA layer for (it adapts the "
                f"attention, feed-forward and score layers of GPT-2)"
            )
        kind = hf.rsplit(".", 1)[-1]
        want = dims[kind] or ((C, C) if ".attn." in hf else (4 * C, C))
        if (A.shape[1], B.shape[0]) != want:
            raise UserError(
                f"{path}: '{hf}' maps {A.shape[1]} -> {B.shape[0]} features, but this base's layer is "
                f"{want[0]} -> {want[1]}; the adapter is for another GPT-2 size (pass the right --base)"
            )
        for slot, ours in table[hf]:
            rows = B if slot is None else B[slot * C : (slot + 1) * C]  # (out, r)
            cols = rows.abs().sum(dim=0).nonzero().flatten()
            if len(cols):
                parts[ours] = (A[cols].t(), rows[:, cols].t() * s)  # (in, k), (k, out), scale folded in
    if not parts:
        raise UserError(f"{path} holds no LoRA tensors for GPT-2's layers; it is not a LoRA adapter lora-dist can use")
    if "score.weight" not in saved:
        raise UserError(
            f"{path} does not save the 'score' layer (modules_to_save), so the classification head it "
            f"was trained with is missing; save the adapter with task_type SEQ_CLS"
        )
    W = saved.pop("score.weight") + (head_delta if head_delta is not None else 0)
    out = {"head.weight": W, "head.bias": saved.pop("score.bias", torch.zeros(W.shape[0]))}
    overrides = _overrides(saved, gpt, path)
    out |= overrides
    order = list(hf_modules(gpt.n_layers))
    R = max(a.shape[1] for a, _ in parts.values())
    scale = template.lora["scale"] if template and template.lora else 1.0
    for ours in sorted(parts, key=order.index):
        a, b = parts[ours]
        A, B = torch.zeros(a.shape[0], R), torch.zeros(R, b.shape[1])
        A[:, : a.shape[1]], B[: b.shape[0]] = a, b / scale
        out[adapter_key(ours, "A")], out[adapter_key(ours, "B")] = A, B
    lora_spec = {
        "rank": R,
        "alpha": scale,
        "scaling": "alpha",
        "scale": scale,
        "dropout": float(cfg.get("lora_dropout") or 0.0),
        "targets": sorted(parts, key=order.index),
        "head": False,
        "train_head": False,
    }
    if template and template.lora and template.lora["rank"] == R:
        lora_spec |= {k: template.lora[k] for k in ("alpha", "scaling")}
    labels = template.labels if template else _labels(base_model, base, W.shape[0])
    if len(labels) != W.shape[0]:
        raise UserError(
            f"{path}: score has {W.shape[0]} rows but {SIDECAR} names {len(labels)} labels; restore the export"
        )
    spec = AdapterSpec(
        kind="lora",
        base=base_model,
        labels=tuple(labels),
        lora=lora_spec,
        max_length=template.max_length if template else gpt.context_length,
        pad_to=template.pad_to if template else None,
        pad_token_id=template.pad_token_id if template else 50256,
        overrides=tuple(overrides),
        extra={"peft": str(path)},
    )
    spec.check(str(path))
    return spec, out


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


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        pickle = (
            " (adapter_model.bin is a pickle, which lora-dist never loads: re-save it with safe_serialization=True)"
        )
        raise UserError(f"{file} not found{pickle if (path / 'adapter_model.bin').exists() else ''}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read ({e}); it is damaged, export or download it again") from e
    check_values(tensors, str(file))
    return tensors


def _sidecar(file: Path) -> AdapterSpec | None:
    if not file.is_file():
        return None
    fix = "restore it, or delete it to read the adapter as PEFT describes it"
    return AdapterSpec.from_json(read_json(file, fix), str(file))


def _pattern(cfg: dict, key: str, module: str, default):
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


def _gpt_config(b: BaseModel, base: str | None):
    """The base's shape (built on the meta device: nothing read but a config.json)."""
    where = base or (b.name if b.source == "random" or b.source in HUB_REPOS.values() else b.source)
    with torch.device("meta"):
        return load_gpt2(where, "random", context_length=b.context_length).cfg


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


def _overrides(saved: dict[str, torch.Tensor], gpt, path: Path) -> dict[str, torch.Tensor]:
    """Saved base modules (modules_to_save other than score) in lora-dist's names."""
    table = key_map(gpt)
    out: dict[str, torch.Tensor] = {}
    for name, t in saved.items():
        key = name.removeprefix("transformer.")
        if key not in table:
            raise UserError(f"{path} saves '{name}', which lora-dist has no place for")
        ours, kind = table[key]
        out |= dict(zip(ours, from_hf(t, kind, len(ours), gpt.emb_dim), strict=True))
    return out
