"""Many LoRA adapters over one frozen model, in one forward pass: each row of a batch uses its own adapter.

    python -c "import lora_dist as L; print(L.MultiAdapterClassifier.from_pretrained(None, {'a': 'runs/smoke'}).predict(['hi'], ['a']))"

The idea of punica's SGMV (segmented gather matrix-vector) and S-LoRA's batched LoRA, in plain PyTorch: every
wrapped Linear layer holds the adapters stacked, A as (n, in, r_max) and B as (n, r_max, out), zero-padded
to the largest rank; B carries its adapter's scale. The base matmul runs once for the whole batch; then each
segment of consecutive rows (or packed tokens) that share an adapter adds its update, x[s:e] @ A_i @ B_i,
with that adapter's own rank. Callers order rows by adapter, so a batch has one segment per adapter in it.
An adapter without this layer adds nothing. The classification heads are stacked the same way, padded to the
largest label set, and gathered per row.

Training many adapters at once (`lora-dist sweep`) takes the same path with autograd: `GroupedLoRALinear`
runs the base matmul once and each adapter's own trainable LoRA layer over its segment, and `GroupedHeads`
gives each adapter's rows its own head.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .lora import Adapter, adapter_of


class Rows:
    """Which adapter each row of the batch in flight uses (set around each forward pass)."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # (B,) adapter numbers
        self.single: int | None = None  # every row uses this adapter: plain matmuls
        self.by_row: list[tuple[int, int, int]] = []  # (adapter, first row, end row) per run of one adapter
        self.by_token: list[tuple[int, int, int]] = []  # the same runs over the packed tokens
        self.count = 0  # rows in the batch

    def set(self, index: torch.Tensor, lengths: list[int] | None = None) -> Rows:
        """`index` (B,): each row's adapter; `lengths`: each row's real tokens (for a packed batch)."""
        self.index = index
        numbers = index.tolist()
        self.single = numbers[0] if len(set(numbers)) == 1 else None
        lengths = lengths or [1] * len(numbers)
        self.by_row, self.by_token, row, token = [], [], 0, 0
        for number, group in itertools.groupby(zip(numbers, lengths, strict=True), key=lambda p: p[0]):
            run = [n for _, n in group]
            self.by_row.append((number, row, row + len(run)))
            self.by_token.append((number, token, token + sum(run)))
            row, token = row + len(run), token + sum(run)
        self.count = row
        return self

    def segments(self, first_dim: int) -> list[tuple[int, int, int]]:
        """The runs over x's first dimension: rows ((B, T, C) or (B, 1, C)) or packed tokens ((N, C))."""
        return self.by_row if first_dim == self.count else self.by_token  # (when N == B every row is one token)


class MultiLoRALinear(nn.Module):
    """base(x) + scale_i * (x @ A_i) @ B_i for each row, i = that row's adapter."""

    A: torch.Tensor  # (n, in, r_max), a buffer
    B: torch.Tensor  # (n, r_max, out), a buffer

    def __init__(self, linear: nn.Linear, rows: Rows, updates: list[tuple[torch.Tensor, torch.Tensor, float] | None]):
        super().__init__()
        self.linear, self.rows = linear, rows
        w = linear.weight
        n, r = len(updates), max((a.shape[1] for a, _, _ in filter(None, updates)), default=1)
        A = torch.zeros(n, linear.in_features, r, dtype=w.dtype)  # (n, in, r_max)
        B = torch.zeros(n, r, linear.out_features, dtype=w.dtype)  # (n, r_max, out)
        for i, u in enumerate(updates):
            if u is not None:
                a, b, scale = u
                A[i, :, : a.shape[1]] = a
                B[i, : b.shape[0]] = b.float() * scale
        self.register_buffer("A", A.to(w.device), persistent=False)
        self.register_buffer("B", B.to(w.device), persistent=False)
        self.rank = [0 if u is None else u[0].shape[1] for u in updates]  # 0: the adapter lacks this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (B, T, out) or (N, out): shared by every row
        s = self.rows.single
        runs = [(s, 0, x.shape[0])] if s is not None else self.rows.segments(x.shape[0])
        for i, start, end in runs:
            r = self.rank[i]
            if r:  # (rows, [T,] in) @ (in, r) @ (r, out), in x's dtype (autocast's, or the model's)
                xa = x[start:end] @ self.A[i, :, :r].to(x.dtype)
                if y.dim() == 2:  # packed tokens: accumulate in place
                    y[start:end].addmm_(xa, self.B[i, :r].to(xa.dtype))
                else:
                    y[start:end] += xa @ self.B[i, :r].to(xa.dtype)
        return y


class MultiHead(nn.Module):
    """Each row through its own adapter's head: (B, C) -> (B, L_max) logits; labels past an adapter's own
    count are padded with -inf (they get probability 0)."""

    W: torch.Tensor  # (n, L_max, C), a buffer
    b: torch.Tensor  # (n, L_max), a buffer

    def __init__(self, rows: Rows, heads: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str):
        super().__init__()
        self.rows = rows
        n, width = len(heads), heads[0][0].shape[1]
        L = max(w.shape[0] for w, _ in heads)
        W = torch.zeros(n, L, width)  # (n, L_max, C)
        b = torch.full((n, L), float("-inf"))  # (n, L_max)
        for i, (w, bias) in enumerate(heads):
            W[i, : w.shape[0]] = w
            b[i, : w.shape[0]] = bias
        self.register_buffer("W", W.to(device), persistent=False)
        self.register_buffer("b", b.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.rows.single
        if s is not None:
            return torch.nn.functional.linear(x, self.W[s].to(x.dtype), self.b[s].to(x.dtype))  # (B, L_max)
        idx = self.rows.index
        logits = torch.bmm(self.W[idx].to(x.dtype), x.unsqueeze(-1)).squeeze(-1)  # (B, L, C) @ (B, C, 1) -> (B, L)
        return logits + self.b[idx].to(x.dtype)


def stack_adapters(model: nn.Module, adapters: list[dict[str, tuple]], heads: list[tuple], rows: Rows) -> int:
    """Wrap each Linear layer that any adapter targets; `adapters[i]` maps a layer name to (A, B, scale).
    Replace the head by the stacked heads. Returns the number of wrapped layers."""
    names = {name for a in adapters for name in a}
    wrap(model, names, lambda name, linear: MultiLoRALinear(linear, rows, [a.get(name) for a in adapters]))
    model.head = MultiHead(rows, heads, next(model.parameters()).device)
    return len(names)


def wrap(model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each module named in `names` by `make(name, module)`, in the model's layer order."""
    for name in sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))


# ------------------------------------------------------------------------------------------- training


class GroupedLoRALinear(nn.Module):
    """Training's grouped layer (a sweep's, `train/sweep.py`): base(x) once for the whole batch, then each
    adapter's own trainable adapter (a `lora.Adapter`) over its own segment of rows or packed tokens,
    gradients and all. A segment computes what its adapter computes alone. The LoRA layers belong to each
    adapter's own model (`attach`, `detach`); this layer only routes rows to them."""

    def __init__(self, linear: nn.Module, rows: Rows):
        super().__init__()
        self.linear, self.rows = linear, rows
        self.adapters: dict[int, Adapter] = {}  # adapter number -> its adapter (not a submodule here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (N, out) packed tokens, or (B, 1, out) at the last positions: shared by every row
        runs = self.rows.segments(x.shape[0])
        if not any(i in self.adapters for i, _, _ in runs):
            return y
        if len(runs) == 1:  # one adapter's rows only
            return self.adapters[runs[0][0]](x, y)
        # One split each, not a slice per segment: a slice's backward writes a zero tensor of x's whole size,
        # which for N adapters is N^2 work.
        sizes = [e - s for _, s, e in runs]
        xs, ys = x.split(sizes), y.split(sizes)
        lora = self.adapters
        return torch.cat([lora[i](xs[k], ys[k]) if i in lora else ys[k] for k, (i, _, _) in enumerate(runs)])


class GroupedHeads(nn.Module):
    """Each adapter's own head (with its LoRA, if any) over its rows: (B, C) -> one (rows_i, labels_i) logits
    tensor per run of rows, in batch order (adapters may have different label sets)."""

    def __init__(self, rows: Rows):
        super().__init__()
        self.rows = rows
        self.adapters: dict[int, nn.Module] = {}  # adapter number -> its head module

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        runs = self.rows.by_row
        return [
            self.adapters[i](part) for (i, _, _), part in zip(runs, x.split([e - s for _, s, e in runs]), strict=True)
        ]


def group_layers(model: nn.Module, rows: Rows) -> None:
    """Make `model` (a frozen base with its classification head, e.g. `build.shared_copy`'s) train many
    adapters at once: every Linear layer of its blocks becomes a `GroupedLoRALinear`, its head `GroupedHeads`.
    Adapters join with `attach` and leave with `detach`."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    wrap(model, names, lambda name, linear: GroupedLoRALinear(linear, rows))
    model.head = GroupedHeads(rows)


def attach(model: nn.Module, number: int, adapter: nn.Module, layers: list[str]) -> None:
    """Route adapter `number`'s rows through its own LoRA layers (`layers`, as `lora.inject_lora` named them in
    its model `adapter`) and its own head."""
    for name in layers:
        if name != "head":
            layer = model.get_submodule(name)
            assert isinstance(layer, GroupedLoRALinear)
            layer.adapters[number] = adapter_of(adapter, name)
    heads = model.get_submodule("head")
    assert isinstance(heads, GroupedHeads)
    heads.adapters[number] = adapter.get_submodule("head")


def detach(model: nn.Module, number: int) -> None:
    for m in model.modules():
        if isinstance(m, (GroupedLoRALinear, GroupedHeads)):
            m.adapters.pop(number, None)


def adapter_bytes(model: nn.Module) -> int:
    """Bytes held by the stacked adapters and heads (zero padding included)."""
    return sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, (MultiLoRALinear, MultiHead))
        for b in m.buffers(recurse=False)
    )
