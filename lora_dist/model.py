"""GPT-2 in plain PyTorch: the model only. Weights live in `weights.py`, adapters in `lora.py`.

    python -c "import lora_dist; m = lora_dist.load_gpt2('tiny', weights='random'); print(m)"

Module names (what LoRA target patterns match): `blocks.N.att.{query,key,value,out}`,
`blocks.N.ff.{fc,proj}` and `head`. The blocks' Linear layers are `frozen_linear.Linear`: nn.Linear, with
a faster CPU path once they are frozen. With `last_index`, the last block runs for those positions only.
In inference, a right-padded batch runs packed (`Packed`): its padding is dropped before the first block, so
every matmul sees only real tokens; attention alone puts them back in rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import POOLINGS
from .device import attention_in_fp32
from .errors import UserError
from .frozen_linear import Linear


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    causal: bool = True  # False: every position attends to every position, padding included (book row 17)


SIZES = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # For tests and smoke runs: the real vocabulary, a small body.
    "tiny": GPTConfig(emb_dim=128, n_layers=2, n_heads=4, context_length=256),
}
HUB_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
ALIASES = {
    "gpt2": "gpt2-small",
    "gpt2-small (124m)": "gpt2-small",
    "gpt2-medium (355m)": "gpt2-medium",
    "gpt2-large (774m)": "gpt2-large",
    "gpt2-xl (1558m)": "gpt2-xl",
    "openai-community/gpt2": "gpt2-small",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "openai-community/gpt2-xl": "gpt2-xl",
}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SIZES:
        known = ", ".join(list(SIZES) + ['"gpt2-small (124M)"'])
        raise UserError(
            f"unknown model name {name!r}; use one of {known}, or a directory with config.json + model.safetensors"
        )
    return key


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Scaled dot-product attention. On the CPU, bf16 inputs are computed in fp32: PyTorch's CPU flash
    attention backward is several times slower in bf16 than in fp32 (it is a small share of the FLOPs, and
    the scores are more accurate too); the output keeps the inputs' dtype."""
    if attention_in_fp32(q):
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast it back to bf16
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kw)


class Packed:
    """A right-padded batch (B, L) laid end to end in blocks of rows, each block cut to its own width.

    Only attention needs rows; every other layer works token by token. So the blocks run on (N, C) and
    attention runs block by block. By default every row is a block of its own, cut to its real tokens: a
    batch of SMS messages of mixed lengths, as a served batch is, holds 2-4x more padding than text; packed,
    none of it is computed, and the matmuls run on one large (N, C) block, where the CPU is fastest
    (bench/multi_adapter.py). With `blocks`, [(rows, width), ...] over consecutive rows, each block keeps its
    rows at its width, padding and all: a sweep's batch is every adapter's own micro-batch side by side, and
    each block computes what that micro-batch computes alone (`train/sweep.py`).
    """

    def __init__(self, lengths: torch.Tensor, width: int, blocks: list[tuple[int, int]] | None = None):
        self.lengths = lengths  # (B,) real tokens per row
        self.by_row = blocks is None  # every row alone, cut to its real tokens
        if blocks is None:
            blocks = [(1, n) for n in lengths.tolist()]
        else:  # neighbours of one width are one block: one attention call for them (the same rows either way)
            merged: list[tuple[int, int]] = []
            for r, w in blocks:
                if merged and merged[-1][1] == w:
                    merged[-1] = (merged[-1][0] + r, w)
                else:
                    merged.append((r, w))
            blocks = merged
        self.blocks = blocks  # (rows, width) each
        # (B,) tokens each row keeps
        self.kept = lengths if self.by_row else torch.tensor([w for r, w in blocks for _ in range(r)]).to(lengths)
        self.sizes = [r * w for r, w in self.blocks]  # tokens per block
        self.real = torch.arange(width, device=lengths.device) < self.kept[:, None]  # (B, L)
        self.starts = torch.cumsum(self.kept, 0) - self.kept  # (B,) each row's first token in the packed layout
        # With `blocks` the kept positions are known on the host: gathered by index, with no host sync (a boolean
        # mask's size is data, read back from the GPU); by row they depend on `lengths`, so the mask.
        self.where: torch.Tensor | None = None
        if not self.by_row:
            where: list[int] = []
            first = 0
            for r, w in self.blocks:
                where += [(first + i) * width + j for i in range(r) for j in range(w)]
                first += r
            self.where = torch.tensor(where).to(lengths.device, non_blocking=True)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...): the kept positions."""
        if self.where is not None:
            return t.flatten(0, 1).index_select(0, self.where)
        return t[self.real]

    def mean(self, t: torch.Tensor, every: bool = False) -> torch.Tensor:
        """(N, C) -> (B, C): each row's mean over its real tokens (`every`: over every position it keeps)."""
        counts = self.kept.tolist() if every else self.lengths.tolist()
        return torch.stack([row[:n].mean(dim=0) for row, n in zip(t.split(self.kept.tolist()), counts, strict=True)])


def packs(idx: torch.Tensor, last_index: torch.Tensor | None) -> bool:
    """Whether packing pays for a batch: inference (no autograd) on the CPU, several rows, some padding.
    (On a GPU a padded batch costs little more, and the row-by-row attention would cost launches.)"""
    return (
        last_index is not None
        and idx.device.type == "cpu"
        and not torch.is_grad_enabled()
        and idx.shape[0] > 1
        and bool((last_index < idx.shape[1] - 1).any())
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.emb_dim % cfg.n_heads == 0, "emb_dim must be divisible by n_heads"
        d = cfg.emb_dim
        self.n_heads = cfg.n_heads
        self.query = Linear(d, d, bias=cfg.qkv_bias)
        self.key = Linear(d, d, bias=cfg.qkv_bias)
        self.value = Linear(d, d, bias=cfg.qkv_bias)
        self.out = Linear(d, d)
        self.drop_rate = cfg.drop_rate
        self.causal = cfg.causal

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None, packed: Packed | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `last` (B,), only the query at each row's last real token: (B, 1, C).
        With `packed`, x is (N, C) packed tokens, and so is the output ((B, 1, C) with `last`)."""
        if packed is not None:
            return self._packed(x, last, packed)
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, t.shape[1], self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)

        drop = self.drop_rate if self.training else 0.0
        if last is None:
            q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
            y = attention(q, k, v, dropout_p=drop, is_causal=self.causal)  # (B, nh, T, hs)
        else:
            x_last = x[torch.arange(B, device=x.device), last].unsqueeze(1)  # (B, 1, C)
            q, k, v = heads(self.query(x_last)), heads(self.key(x)), heads(self.value(x))
            visible = None  # without the causal mask the one query sees every position
            if self.causal:
                visible = (torch.arange(T, device=x.device) <= last[:, None]).view(B, 1, 1, T)  # (B, 1, 1, T)
            y = attention(q, k, v, attn_mask=visible, dropout_p=drop)  # (B, nh, 1, hs)
        y = y.transpose(1, 2).reshape(B, -1, C)
        return self.out(y)

    def _packed(self, x: torch.Tensor, last: torch.Tensor | None, packed: Packed) -> torch.Tensor:
        C, nh = x.shape[-1], self.n_heads
        drop = self.drop_rate if self.training else 0.0

        def blocks(t: torch.Tensor) -> list[torch.Tensor]:
            return [
                b.view(r, w, nh, C // nh).transpose(1, 2)  # (rows, nh, width, hs)
                for b, (r, w) in zip(t.split(packed.sizes), packed.blocks, strict=True)
            ]

        # query, key, value in this order, as the unpacked path: their adapters' dropout draws in the same order
        if last is None:
            qs, ks, vs = blocks(self.query(x)), blocks(self.key(x)), blocks(self.value(x))
            ys = [attention(q, k, v, dropout_p=drop, is_causal=self.causal) for q, k, v in zip(qs, ks, vs, strict=True)]
            return self.out(torch.cat([y.transpose(1, 2).reshape(-1, C) for y in ys]))  # (N, C)
        B = len(packed.kept)
        q = self.query(x[packed.starts + last]).view(B, 1, nh, C // nh).transpose(1, 2)  # (B, nh, 1, hs)
        ks, vs = blocks(self.key(x)), blocks(self.value(x))
        if packed.by_row:  # each row alone, cut to its real tokens: the query sees its row up to itself
            ys = [
                attention(q[i : i + 1], k[:, :, : p + 1], v[:, :, : p + 1])
                for i, (k, v, p) in enumerate(zip(ks, vs, last.tolist(), strict=True))
            ]
        else:  # a block of rows, as the unpacked path computes it
            ys, first = [], 0
            for k, v, (r, w) in zip(ks, vs, packed.blocks, strict=True):
                visible = None
                if self.causal:
                    visible = (torch.arange(w, device=x.device) <= last[first : first + r, None]).view(r, 1, 1, w)
                ys.append(attention(q[first : first + r], k, v, attn_mask=visible, dropout_p=drop))  # (r, nh, 1, hs)
                first += r
        return self.out(torch.cat(ys).transpose(1, 2).reshape(B, 1, C))  # (B, 1, C)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None, packed: Packed | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `last` (B,), only each row's last real token: (B, 1, C). With
        `packed`, x is (N, C) packed tokens (see `Packed`)."""
        if last is None:
            x = x + self.drop(self.att(self.norm1(x), packed=packed))
        else:  # keys and values need every position; the rest is position-wise
            at = (packed.starts + last) if packed is not None else (torch.arange(x.shape[0], device=x.device), last)
            x = x[at].unsqueeze(1) + self.drop(self.att(self.norm1(x), last, packed))
        return x + self.drop(self.ff(self.norm2(x)))


POOLING = POOLINGS  # config.ModelConfig.pooling's choices
# The poolings that read real tokens only: under causal attention, right-padding changes nothing they read.
PADDING_FREE = ("last_real", "first", "mean")


class GPT2(nn.Module):
    """GPT-2. `forward(ids)` gives logits (B, T, vocab); after `set_classifier(n)`, (B, T, n), or with
    `last_index` (each right-padded row's last real token) (B, n), read where `pooling` says:
    `last_real` (that token), `last` (the last position, padding or not: the book), `first`, `mean` (over
    the real tokens) or `mean_all` (over every position, padding included: the book's row 19)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # On the meta device (names and shapes only) nothing is drawn: a meta normal_ is torch's Python
        # reference, whose first call imports torch._dynamo (1-5 s), and there is nothing to fill. Elsewhere
        # the draws, and so the weights a seed gives, are those they always were.
        meta = torch.empty(0).device.type == "meta"
        tok = torch.empty(cfg.vocab_size, cfg.emb_dim) if meta else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim, _weight=tok)
        pos = torch.empty(cfg.context_length, cfg.emb_dim) if meta else None
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim, _weight=pos)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # GPT-2 ties the output layer to the token embedding
        self.activation_checkpointing = False
        self.pooling = "last_real"
        if meta:
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("att.out.weight", "ff.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def set_classifier(self, num_classes: int, pooling: str = "last_real") -> None:
        """Replace the tied LM head by a fresh `num_classes` Linear layer (with bias, as the book does). It is
        drawn on the default device (the CPU), whatever device the model is on, then moved there."""
        if pooling not in POOLING:
            raise UserError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLING)}")
        self.head = nn.Linear(self.cfg.emb_dim, num_classes).to(self.tok_emb.weight.device)
        self.pooling = pooling

    def features(
        self, idx: torch.Tensor, last_index: torch.Tensor | None = None, packed: Packed | None = None
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) hidden states; with `last_index`, (B, C) at those positions only. Nothing
        after a row's last index can reach it (attention is causal), so the last block runs for it alone.
        With `packed` (causal attention only), the rows' padding is never computed, and without
        `last_index` the result is (N, C), the real tokens only."""
        B, T = idx.shape
        if T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.cfg.context_length}")
        pos = torch.arange(T, device=idx.device).expand(B, T)
        if packed is not None:
            idx, pos = packed.pack(idx), packed.pack(pos)  # (N,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C), or (N, C) packed
        for i, block in enumerate(self.blocks):
            last = last_index if i == len(self.blocks) - 1 else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, last, packed, use_reentrant=False)
            else:
                x = block(x, last, packed)
        x = self.final_norm(x)  # (B, T, C), or (B, 1, C) with last_index
        return x if last_index is None else x.squeeze(1)

    def pooled(self, idx: torch.Tensor, last_index: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """(B, T) ids, (B,) last real positions -> (B, C): the hidden state the head reads (`pooling`). `packed`
        lays the batch out in blocks (a sweep's); by default a batch is packed row by row where that pays."""
        B, T = idx.shape
        # Packing drops the padding, so only where padding changes nothing: causal attention, read at real tokens.
        if packed is None and self.cfg.causal and self.pooling in PADDING_FREE and packs(idx, last_index):
            packed = Packed(last_index + 1, T)
        if packed is not None and self.pooling in ("mean", "mean_all"):
            return packed.mean(self.features(idx, packed=packed), every=self.pooling == "mean_all")
        if self.pooling in ("mean", "mean_all"):
            x = self.features(idx)  # (B, T, C)
            if self.pooling == "mean_all":
                return x.mean(dim=1)
            real = (torch.arange(T, device=idx.device) <= last_index[:, None]).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            return (x * real).sum(dim=1) / real.sum(dim=1)
        where = {
            "last_real": lambda: last_index,
            "last": lambda: packed.kept - 1 if packed is not None else torch.full_like(last_index, T - 1),
            "first": lambda: torch.zeros_like(last_index),
        }[self.pooling]()
        return self.features(idx, where, packed)

    def forward(
        self, idx: torch.Tensor, last_index: torch.Tensor | None = None, packed: Packed | None = None
    ) -> torch.Tensor:
        if last_index is None:
            return self.head(self.features(idx))  # (B, T, classes)
        return self.head(self.pooled(idx, last_index, packed))  # (B, classes)
