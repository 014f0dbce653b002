"""LoRA, injected after the weights are loaded: the model file knows nothing about it.

    python -c "import lora_dist as L; m = L.load_gpt2('tiny', 'random'); m.set_classifier(2); print(L.inject_lora(m, L.LoRAConfig()))"

`LoRALayer` and `LinearWithLoRA` follow the book (appendix E): A is Kaiming-uniform with a=sqrt(5), B is
zero, so an injected model starts out computing exactly what the base model computes.

Every part of the package reaches adapters through `Adapter` (the protocol below) and this module's lookups,
never by the names of their tensors: training and the grouped sweep path call `forward`, merge and the head's
export `delta_weight`, the stacked serving path and the PEFT export `factors`, and `adapted_layers`,
`adapter_names`, `adapter_key`, `base_key` and `adapter_from_state` find them in a model or a tensor file.
`ADAPTER_TYPES` is the registry a second adapter type (ARCHITECTURE.md: DoRA) joins.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .config import LoRAConfig
from .errors import UserError


def scale_factor(cfg: LoRAConfig) -> float:
    """`alpha` (the book: alpha * x@A@B), `alpha/r` (Hu et al., PEFT's default) or `rslora` (alpha/sqrt(r))."""
    return {"alpha": cfg.alpha, "alpha/r": cfg.alpha / cfg.rank, "rslora": cfg.alpha / math.sqrt(cfg.rank)}[cfg.scaling]


ADAPTER_ATTR = "lora"  # where a wrapped layer keeps its adapter: `<layer>.lora.<tensor>`
BASE_ATTR = "linear"  # where it keeps its base layer: `<layer>.linear.weight`


class Adapter(Protocol):
    """What one adapter type gives every part of the package, for one Linear layer (in -> out)."""

    kind: ClassVar[str]  # its name in ADAPTER_TYPES
    tensors: ClassVar[tuple[str, ...]]  # its own tensors' names, in file order (`adapter_key`)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Its contribution to the layer's output for input x, or with `y` (the base layer's output) the sum."""
        ...

    def delta_weight(self) -> torch.Tensor:
        """Its update in nn.Linear's (out, in) layout, fp32: what merging adds to the base weight."""
        ...

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (in, r), B (r, out), scale) with delta_weight = scale * (A @ B).t(): the stacked serving path and
        PEFT's lora_A/lora_B. (A type with no such form raises, and serves through `__call__` instead.)"""
        ...

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Its trainable tensors by name (the names of `tensors`)."""
        ...


class LoRALayer(nn.Module):
    kind: ClassVar[str] = "lora"
    tensors: ClassVar[tuple[str, ...]] = ("A", "B")
    # (A, B) in the autocast dtype for the forward pass under way, set by `cast_adapters_once` (else None: A and B
    # as they are, which autocast casts at their use)
    cast: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, in_dim: int, out_dim: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """scale * (x @ A) @ B, or with `y` given, y + that as one addmm (the scale and the sum ride on the
        matmul). Always entered through the module call, so hooks (DeepSpeed ZeRO-3's fetches) see it."""
        a, b = self.cast or (self.A, self.B)
        xa = self.dropout(x) @ a  # (..., in) -> (..., r)
        if y is None:
            return self.scale * (xa @ b)  # (..., out)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b, alpha=self.scale)
        return out.view(y.shape)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's (out, in) layout, computed in fp32."""
        return self.scale * (self.A.float() @ self.B.float()).t()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A.detach(), self.B.detach(), self.scale

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}


ADAPTER_TYPES: dict[str, type[LoRALayer]] = {"lora": LoRALayer}  # a second type (DoRA) is one more entry


def adapter_key(layer: str, tensor: str) -> str:
    """The name of adapter tensor `tensor` of the adapter on `layer` in a model's or a file's state."""
    return f"{layer}.{ADAPTER_ATTR}.{tensor}"


def base_key(layer: str, tensor: str = "weight") -> str:
    """The name of the base layer's `tensor` of an adapted `layer`."""
    return f"{layer}.{BASE_ATTR}.{tensor}"


def adapter_from_state(state: dict[str, torch.Tensor], layer: str, scale: float, kind: str = "lora") -> Adapter:
    """The adapter on `layer` as a tensor file holds it (its tensors as they are stored, not trainable)."""
    cls = ADAPTER_TYPES[kind]
    a = cls.__new__(cls)
    nn.Module.__init__(a)
    for t in cls.tensors:
        setattr(a, t, nn.Parameter(state[adapter_key(layer, t)], requires_grad=False))
    a.scale, a.dropout = scale, nn.Identity()
    return a


class LinearWithLoRA(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, scale, dropout)
        # A and B in fp32 at least, whatever the base's storage (bf16 on a GPU, where a sweep casts its shared base
        # before injecting): autocast computes in bf16 either way, but most of a bf16 A could not move by a
        # 5e-5 step, and the optimizer's state would be bf16 too
        self.lora.to(device=linear.weight.device, dtype=torch.promote_types(linear.weight.dtype, torch.float32))
        self._original: torch.Tensor | None = None  # the base weight while merged: unmerge is exact

    @property
    def merged(self) -> bool:
        return self._original is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to(x, self.linear(x))

    def add_to(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The layer's output given its base layer's output `base_out` (the model may compute that for
        several frozen layers at once, e.g. a fused Q/K/V matmul)."""
        return base_out if self.merged else self.lora(x, base_out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight. Idempotent; refuses to write non-finite weights."""
        if self.merged:
            return
        w = self.linear.weight
        new = w.float() + self.lora.delta_weight()
        if not torch.isfinite(new).all():
            raise ValueError("merging this adapter would put non-finite values into the base weight")
        self._original = w.detach().clone()
        w.copy_(new.to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight. Idempotent."""
        if self._original is None:
            return
        self.linear.weight.copy_(self._original)
        self._original = None


def adapted_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    """(name, layer) of every layer of `model` that carries an adapter, in the model's order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)]


def adapter_of(model: nn.Module, layer: str) -> Adapter:
    """The adapter on `layer` (a name `inject_lora` returned)."""
    m = model.get_submodule(layer)
    assert isinstance(m, LinearWithLoRA), f"{layer} carries no adapter"
    return m.lora


def adapter_names(model: nn.Module) -> set[str]:
    """The names of every adapter tensor in `model`'s parameters."""
    return {adapter_key(n, t) for n, m in adapted_layers(model) for t in m.lora.adapter_params()}


def inject_lora(model: nn.Module, cfg: LoRAConfig, head_name: str = "head") -> list[str]:
    """Freeze every base weight, then wrap the selected nn.Linear layers. Returns the wrapped names."""
    if adapted_layers(model):
        raise ValueError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = []
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in linears:
        if name == head_name:
            wanted = cfg.head
        else:
            wanted = any(t == "all" or fnmatchcase(name, t) for t in cfg.targets)
        if wanted:
            chosen.append(name)
    check_targets(cfg.targets, list(linears))
    if not chosen:
        raise UserError(f"lora.targets {list(cfg.targets)} match no Linear layer; try 'all', '*.att.*' or '*.ff.*'")
    check_rank(cfg.rank, [linears[n] for n in chosen])
    scale = scale_factor(cfg)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LinearWithLoRA(getattr(parent, child), cfg.rank, scale, cfg.dropout))
    if cfg.train_head:
        for p in _head(model, head_name).parameters():
            p.requires_grad_(True)
    return chosen


def check_targets(patterns: Iterable[str], names: list[str]) -> None:
    """UserError naming the first pattern of `lora.targets` that matches none of the Linear layers `names`, with
    the layer names it could have meant (block numbers as *)."""
    for t in patterns:
        if t != "all" and not any(fnmatchcase(n, t) for n in names):
            shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
            close = difflib.get_close_matches(re.sub(r"\.\d+\.", ".*.", t), shapes, n=3, cutoff=0.3)
            raise UserError(
                f"lora.targets pattern {t!r} matches no layer of the model; its layers are "
                f"{', '.join(shapes)}{' (closest: ' + ', '.join(close) + ')' if close else ''}; use such names or "
                f"patterns, e.g. '*.att.*', '*.ff.*', or 'all'"
            )


def check_rank(rank: int, layers: list[nn.Linear]) -> None:
    """UserError, before anything is allocated, for a rank past every dimension of the layers it adapts (a rank
    beyond a layer's size adds nothing, and 1e9 asked the allocator for 512 GB): with the memory it would take."""
    largest = max(max(m.in_features, m.out_features) for m in layers)
    if rank > largest:
        values = rank * sum(m.in_features + m.out_features for m in layers)
        raise UserError(
            f"lora.rank={rank} would need {values * 4 / 2**30:,.1f} GiB for the LoRA tensors alone ({len(layers)} "
            f"layers, fp32; about 4x that to train them), and a rank above a layer's size adds nothing; use "
            f"lora.rank <= {largest}, the largest dimension of the layers it adapts (4 to 64 is usual)"
        )


def _head(model: nn.Module, head_name: str) -> nn.Module:
    m = model.get_submodule(head_name)
    return m.linear if isinstance(m, LinearWithLoRA) else m


def merge(model: nn.Module) -> None:
    for _, m in adapted_layers(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for _, m in adapted_layers(model):
        m.unmerge()


def adapter_state_dict(model: nn.Module, head_name: str = "head") -> dict[str, torch.Tensor]:
    """What an adapter file holds: every LoRA tensor and every other trained tensor, plus the
    classification head's own weights (it is freshly initialised, so the base checkpoint cannot restore
    it), in the model's parameter order."""
    head = _head(model, head_name)
    prefix = head_name + (".linear." if isinstance(model.get_submodule(head_name), LinearWithLoRA) else ".")
    keep = {prefix + n for n, _ in head.named_parameters()} | adapter_names(model)
    return {n: p.detach() for n, p in model.named_parameters() if n in keep or p.requires_grad}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    own = dict(model.named_parameters())
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{source} does not fit this model ({what}); use the config the adapter was trained with")
    with torch.no_grad():
        for k, t in state.items():
            if own[k].shape != t.shape:
                raise UserError(
                    f"{source}: tensor '{k}' has shape {list(t.shape)}, expected {list(own[k].shape)}; "
                    f"use the config the adapter was trained with"
                )
            own[k].copy_(t)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable). Total counts the model without its adapters, as the book reports it."""
    adapters = adapter_names(model)
    total = sum(p.numel() for n, p in model.named_parameters() if n not in adapters)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


class _CastAll(torch.autograd.Function):
    """Tensors -> their copies in one dtype, in one multi-tensor copy (`torch._foreach_copy_`); in the backward
    pass their gradients back to the tensors' own dtypes, in one more. The same roundings as a cast each."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.set_materialize_grads(False)  # a tensor no loss reached keeps no gradient, as with a cast each
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, list(tensors))
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        given = {i: g for i, g in enumerate(grads) if g is not None}
        back = [torch.empty_like(g, dtype=ctx.dtypes[i]) for i, g in given.items()]
        if given:
            torch._foreach_copy_(back, list(given.values()))
        fp32 = dict(zip(given, back, strict=True))
        return (None, *(fp32.get(i) for i in range(len(grads))))


def cast_adapters_once(model: nn.Module, dtype: torch.dtype) -> int:
    """`train.lora_cast_once`: under autocast to `dtype`, every LoRA layer's A and B are cast for a forward pass
    all at once, in one multi-tensor copy, and their gradients cast back in one more, instead of autocast's four
    casts per layer (A and B at their matmuls, each gradient back to fp32: 292 kernels a gpt2-small step). The
    same numbers, bit for bit; the fp32 A and B keep receiving the gradients. Returns the layers it covers (0:
    nothing installed)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    if not layers:
        return 0
    params = [t for m in layers for t in (m.A, m.B)]
    device_type = params[0].device.type

    def before(module: nn.Module, args: tuple) -> None:
        if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype:
            low = _CastAll.apply(dtype, *params)
            for i, m in enumerate(layers):
                m.cast = (low[2 * i], low[2 * i + 1])

    def after(module: nn.Module, args: tuple, output: object) -> None:
        for m in layers:  # nothing cast outlives the pass (nor a captured graph)
            m.cast = None

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after, always_call=True)
    return len(layers)


@torch.no_grad()
def cast_frozen(model: nn.Module, dtype: torch.dtype, prefix: str = "blocks.") -> int:
    """Store the frozen Linear layers under `prefix` in `dtype` (bf16 or fp16), for training under autocast
    to that dtype: autocast would round them to it at every use anyway, so the results are the same, and
    each step saves the casts and half the weight memory. Adapters, norms, embeddings and the head stay as
    they are. Returns the number of layers cast."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith(prefix) and not any(p.requires_grad for p in m.parameters()):
            m.to(dtype)
            n += 1
    return n
