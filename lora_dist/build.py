"""The classifier model as training and inference both build it: base GPT-2, fresh head, what is trained.

    python -c "from lora_dist.build import build_model; from lora_dist.config import load_config; print(build_model(load_config('configs/smoke.yaml'), 2)[1])"

`train.trainable` picks what is trained: LoRA adapters (`lora`, injected by `lora.inject_lora`), or the
book's `--trainable_layers`: the head alone (`last_layer`), the head with the final LayerNorm and the last
one or two blocks (`last_block`, `last_two_blocks`), or every weight (`all`). Whatever is trained is what
`lora.adapter_state_dict` saves, the optimizer sees and DDP all-reduces.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .config import Config
from .errors import UserError
from .lora import inject_lora, load_adapter_state_dict
from .model import GPT2
from .weights import load_gpt2

LAST_BLOCKS = {"last_layer": 0, "last_block": 1, "last_two_blocks": 2}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, num_classes: int) -> tuple[GPT2, list[str]]:
    """The frozen GPT-2 with a fresh `num_classes` head, made trainable as `train.trainable` says (same on
    every rank). Returns the model and the names of the Linear layers that carry LoRA adapters."""
    m = cfg.model
    model = load_gpt2(m.name, m.weights, dropout=m.dropout, context_length=m.context_length, causal=m.causal_mask)
    model.set_classifier(num_classes, m.pooling)
    model.activation_checkpointing = m.activation_checkpointing
    return model, make_trainable(model, cfg)


def make_trainable(model: GPT2, cfg: Config) -> list[str]:
    """Freeze the model, then unfreeze what `train.trainable` names; returns the LoRA-wrapped layers."""
    mode = cfg.train.trainable
    if mode == "lora":
        return inject_lora(model, cfg.lora)
    model.requires_grad_(mode == "all")
    if mode in LAST_BLOCKS:
        n = LAST_BLOCKS[mode]
        chosen = [model.head] + ([model.final_norm, *model.blocks[len(model.blocks) - n:]] if n else [])
        for module in chosen:
            module.requires_grad_(True)
    return []


def base_config(spec, source: str, base: str | None = None) -> Config:
    """The config that rebuilds an adapter's model, once its base weights are found to be the ones it was
    trained on. `base` points at another directory holding them (checked by SHA-256)."""
    from dataclasses import replace

    from .adapter import base_of

    cfg = spec.to_config()
    if base is not None:
        cfg = replace(cfg, model=replace(cfg.model, weights=str(base)))
    if spec.base.source != "random":
        found = base_of(cfg)
        why = spec.base.mismatch(found)
        if why:
            raise UserError(f"{source} was trained on {spec.base.describe()}, but the base found is {found.describe()} "
                            f"({why}); use the base it was trained on (--base DIR)")
    return cfg


def load_trained(spec, tensors: dict[str, torch.Tensor], source: str, base: str | None = None) -> GPT2:
    """The model an adapter description (`adapter.AdapterSpec`) names, with its tensors loaded, frozen and
    in eval mode. `base` points at another directory holding the same base weights (checked by SHA-256)."""
    cfg = base_config(spec, source, base)
    seed_everything(cfg.train.seed)  # random base weights are redrawn exactly as training drew them
    model, _ = build_model(cfg, len(spec.labels))
    tensors = dict(tensors)
    overrides = {k: tensors.pop(k) for k in spec.overrides if k in tensors}
    load_adapter_state_dict(model, tensors, source=source)
    own = model.state_dict()
    with torch.no_grad():
        for k, t in overrides.items():
            if k not in own or own[k].shape != t.shape:
                raise UserError(f"{source}: base tensor '{k}' {list(t.shape)} does not fit this model; "
                                f"use the base the adapter was made for")
            own[k].copy_(t)
    return model.requires_grad_(False).eval()
