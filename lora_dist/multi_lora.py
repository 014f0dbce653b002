"""Many LoRA adapters over one frozen model, in one forward pass: each row of a batch uses its own adapter.

    python -c "import lora_dist as L; print(L.MultiAdapterClassifier.from_pretrained(None, {'a': 'runs/smoke'}).predict(['hi'], ['a']))"

The idea of punica's SGMV and S-LoRA's batched LoRA, in plain PyTorch: every wrapped Linear layer holds the
adapters stacked, A as (n, in, r_max) and B as (n, r_max, out), zero-padded to the largest rank; B carries
its adapter's scale. A row's update is gathered by its adapter index and applied with one batched matmul,
so the base matmul is shared by every row. An adapter without this layer has zeros there and adds nothing.
The classification heads are stacked the same way, padded to the largest label set.
"""

from __future__ import annotations

import torch
from torch import nn


class Rows:
    """Which adapter each row of the batch in flight uses (set around each forward pass)."""

    def __init__(self):
        self.index: torch.Tensor | None = None  # (B,) adapter numbers
        self.single: int | None = None  # every row uses this adapter: plain matmuls, no gather

    def set(self, index: torch.Tensor) -> "Rows":
        self.index = index
        first = int(index[0])
        self.single = first if bool((index == first).all()) else None
        return self


class MultiLoRALinear(nn.Module):
    """base(x) + scale_i * (x @ A_i) @ B_i for each row, i = that row's adapter."""

    def __init__(self, linear: nn.Module, rows: Rows, updates: list[tuple[torch.Tensor, torch.Tensor, float] | None]):
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
        self.present = [u is not None for u in updates]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (B, T, out): shared by every row
        s = self.rows.single
        if s is not None:
            if not self.present[s]:
                return y
            xa = x @ self.A[s]  # (B, T, r)
            return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), self.B[s]).view(y.shape)
        idx = self.rows.index
        x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (B, T, in)
        xa = torch.bmm(x3, self.A[idx].to(x3.dtype))  # (B, T, in) @ (B, in, r) -> (B, T, r)
        return y + torch.bmm(xa, self.B[idx].to(xa.dtype)).view(y.shape)  # (B, T, out)


class MultiHead(nn.Module):
    """Each row through its own adapter's head: (B, C) -> (B, L_max) logits; labels past an adapter's own
    count are padded with -inf (they get probability 0)."""

    def __init__(self, rows: Rows, heads: list[tuple[torch.Tensor, torch.Tensor]], device):
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
    names = sorted({name for a in adapters for name in a}, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoRALinear(getattr(parent, child), rows, [a.get(name) for a in adapters]))
    model.head = MultiHead(rows, heads, next(model.parameters()).device)
    return len(names)


def adapter_bytes(model: nn.Module) -> int:
    """Bytes held by the stacked adapters and heads (zero padding included)."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, (MultiLoRALinear, MultiHead))
               for b in m.buffers(recurse=False))
