"""The classifier model as training and inference both build it: base GPT-2, fresh head, what is trained;
and the one reader of a trained adapter (lora-dist's own or PEFT's) that rebuilds it.

    python -c "from lora_dist.build import *; from lora_dist.config import *; print(build_model(load_config('configs/smoke.yaml'), 2)[1])"

`train.trainable` picks what is trained: LoRA adapters (`lora`, injected by `lora.inject_lora`), or the
book's `--trainable_layers`: the head alone (`last_layer`), the head with the final LayerNorm and the last
one or two blocks (`last_block`, `last_two_blocks`), or every weight (`all`). Whatever is trained is what
`lora.adapter_state_dict` saves, the optimizer sees and DDP all-reduces. `trainable="none"` builds the bare
frozen base with its head (what `multi_lora` stacks many adapters over).
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import peft
from .adapter import AdapterSpec, base_of, find, with_labels
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


def num_classes(cfg: Config, labels: tuple[str, ...]) -> int:
    """`model.num_classes`, which follows from the data unless set (and must then agree with it)."""
    n = cfg.model.num_classes
    if n is not None and n != len(labels):
        raise UserError(
            f"model.num_classes={n} but the data has {len(labels)} labels ({', '.join(labels)}); "
            f"drop model.num_classes (it follows from the data) or set data.labels"
        )
    return len(labels)


def build_model(
    cfg: Config, num_classes: int, trainable: str | None = None, device: str | torch.device | None = None
) -> tuple[GPT2, list[str]]:
    """The frozen GPT-2 with a fresh `num_classes` head, made trainable as `trainable` (default:
    `train.trainable`) says, on `device` (default: the CPU). Returns the model and the names of the Linear
    layers that carry LoRA adapters.

    What it builds is a function of the config alone, the same on every rank: random base weights are drawn
    from `train.seed` (on `device`'s generator), and the head and the adapters from `train.seed` again, so
    they do not depend on how the base was made (read from a file, or drawn on the CPU or a GPU)."""
    model = build_base(cfg, device)
    return model, add_trainable(model, cfg, num_classes, trainable)


def build_base(cfg: Config, device: str | torch.device | None = None) -> GPT2:
    """The frozen GPT-2 that `model.*` names, still with its language-model head; random weights are drawn
    from `train.seed`."""
    m = cfg.model
    seed_everything(cfg.train.seed)
    return load_gpt2(
        m.name, m.weights, dropout=m.dropout, context_length=m.context_length, causal=m.causal_mask, device=device
    )


def add_trainable(model: GPT2, cfg: Config, num_classes: int, trainable: str | None = None) -> list[str]:
    """A fresh `num_classes` head and what is trained (`make_trainable`), drawn from `train.seed`; returns
    the LoRA-wrapped layers."""
    torch.manual_seed(cfg.train.seed)
    model.set_classifier(num_classes, cfg.model.pooling)
    model.activation_checkpointing = cfg.model.activation_checkpointing
    return make_trainable(model, cfg, trainable or cfg.train.trainable)


def shared_copy(model: GPT2) -> GPT2:
    """Another model object over the same tensors: no weight is copied. One frozen base under many heads and
    adapters (a sweep's), each `add_trainable` on a copy of its own."""
    same = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, same)


def make_trainable(model: GPT2, cfg: Config, mode: str) -> list[str]:
    """Freeze the model, then unfreeze what `mode` names (`train.trainable`'s values, or `none`); returns the
    LoRA-wrapped layers."""
    if mode == "lora":
        return inject_lora(model, cfg.lora)
    model.requires_grad_(mode == "all")
    if mode in LAST_BLOCKS:
        n = LAST_BLOCKS[mode]
        chosen = [model.head] + ([model.final_norm, *model.blocks[len(model.blocks) - n :]] if n else [])
        for module in chosen:
            module.requires_grad_(True)
    return []


def base_config(spec: AdapterSpec, source: str, base: str | None = None) -> Config:
    """The config that rebuilds an adapter's model, once its base weights are found to be the ones it was
    trained on. `base` points at another directory holding them (checked by SHA-256)."""
    cfg = spec.to_config()
    if base is not None:
        cfg = replace(cfg, model=replace(cfg.model, weights=str(base)))
    if spec.base.source != "random":
        found = base_of(cfg)
        why = spec.base.mismatch(found)
        if why:
            raise UserError(
                f"{source} was trained on {spec.base.describe()}, but the base found is {found.describe()} "
                f"({why}); use the base it was trained on (--base DIR)"
            )
    return cfg


def read_adapter(
    path: str | Path, base: str | None = None, labels: str | list[str] | None = None
) -> tuple[AdapterSpec, dict[str, torch.Tensor], str]:
    """(description, tensors in lora-dist's names, source) of whatever holds a trained adapter: a run, its
    adapter/ (or weights/) directory, or a PEFT adapter directory (whose base `base` replaces the one it names).
    `labels` names the classes of an adapter that names none (`adapter.with_labels`)."""
    if peft.is_peft_dir(path):
        spec, tensors = peft.read(Path(path), base)
        return with_labels(spec, labels, str(path)), tensors, str(path)
    a = find(path)
    return with_labels(a.spec, labels, str(a.dir)), a.tensors(), str(a.tensor_file)


def check_fits(spec: AdapterSpec, model: GPT2, source: str) -> None:
    """UserError when the description asks for more than its base holds: messages longer than the base's
    context (the positional table has no row for them), or a pad token outside its vocabulary."""
    ctx, vocab = model.cfg.context_length, model.cfg.vocab_size
    if spec.max_length > ctx:
        raise UserError(
            f"{source}: max_length is {spec.max_length} tokens, longer than its base's context of {ctx}; no run "
            f"writes that: restore the adapter's description (max_length at most {ctx})"
        )
    if spec.pad_token_id >= vocab:
        raise UserError(
            f"{source}: pad_token_id {spec.pad_token_id} is outside its base's vocabulary of {vocab} tokens; "
            f"restore the adapter's description"
        )


def build_device(spec: AdapterSpec, source: str, device: str | torch.device | None = None) -> torch.device | None:
    """Where to build an adapter's base: on `device` when it is read from a file; random weights where they
    were drawn (`BaseModel.device`), for torch's generators differ between the CPU and CUDA."""
    b = spec.base
    if b.source != "random":
        return None if device is None else torch.device(device)
    if b.device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"{source} was trained on {b.describe()}, which only a CUDA GPU draws again; use it on a machine "
            f"with a GPU, or train it with pretrained weights (or on the CPU)"
        )
    want = torch.device(device) if device is not None else torch.device("cuda")
    return want if want.type == "cuda" else torch.device("cuda")


def load_trained(
    spec: AdapterSpec,
    tensors: dict[str, torch.Tensor],
    source: str,
    base: str | None = None,
    device: str | torch.device | None = None,
) -> GPT2:
    """The model an adapter description (`adapter.AdapterSpec`) names, with its tensors loaded, frozen and
    in eval mode, built on `device` where it can be (see `build_device`; the caller moves it). `base` points
    at another directory holding the same base weights (checked by SHA-256)."""
    cfg = base_config(spec, source, base)
    model, _ = build_model(cfg, len(spec.labels), device=build_device(spec, source, device))
    check_fits(spec, model, source)
    tensors = dict(tensors)
    overrides = {k: tensors.pop(k) for k in spec.overrides if k in tensors}
    load_adapter_state_dict(model, tensors, source=source)
    own = model.state_dict()
    with torch.no_grad():
        for k, t in overrides.items():
            if k not in own or own[k].shape != t.shape:
                raise UserError(
                    f"{source}: base tensor '{k}' {list(t.shape)} does not fit this model; "
                    f"use the base the adapter was made for"
                )
            own[k].copy_(t)
    return model.requires_grad_(False).eval()
