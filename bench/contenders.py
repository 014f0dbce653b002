"""The contenders of `train_throughput.py`: each builds its model, data and optimizer, then takes steps.

    (a)  lora-dist at its defaults (DataConfig's padding and bucketing, TrainConfig's precision: auto)
    (b)  lora-dist in the book's exact mode: every message padded to the longest training message, in
         --precision (fp32 by default, as the book)
    (c)  transformers GPT2ForSequenceClassification + PEFT LoRA, padded per batch (DataCollatorWithPadding)

Variants of (a) switch one optimisation off (config overrides, or a patch that restores the plain code),
so that each is measured in the same run: see VARIANTS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora_dist.build import build_model, seed_everything
from lora_dist.config import DataConfig, ModelConfig, TrainConfig, load_config
from lora_dist.data import build_datasets, prepare_splits, split_labels
from lora_dist.device import pick_device, prefer_attention_kernels
from lora_dist.lora import cast_frozen
from lora_dist.model import SIZES
from lora_dist.train.loaders import ShardedSampler, make_loaders
from lora_dist.train.loop import train_pad_multiple
from lora_dist.train.registry import make_strategy

RECIPE = "configs/book/appendix-e.yaml"  # the book's recipe exactly: rank 16, alpha 16, every Linear, batch 8, AdamW


@dataclass(frozen=True)
class Spec:
    kind: str  # "lora-dist" or "peft"
    what: str
    overrides: tuple[str, ...] = ()
    patches: tuple[str, ...] = ()


def _defaults() -> tuple[str, ...]:
    """The recipe config pins the book's pooling (position -1), padding and fp32; (a) puts back the dataclass
    defaults, which configs/gpt2-small-lora.yaml ships (bench/gpu_preflight.py checks that they agree). Pooling
    matters most: at `last` no padding is free, so on CUDA every batch length would be a new graph."""
    m, d, t = ModelConfig(), DataConfig(), TrainConfig()
    return (
        f"model.pooling={m.pooling}",
        f"data.padding={d.padding}",
        f"data.bucket={str(d.bucket).lower()}",
        f"train.precision={t.precision}",
    )


VARIANTS: dict[str, Spec] = {
    "a": Spec("lora-dist", "lora-dist, defaults", _defaults()),
    "b": Spec("lora-dist", "lora-dist, book mode (padding: longest)", ("data.padding=longest", "data.bucket=false")),
    "c": Spec("peft", "transformers + PEFT, padded per batch"),
    "c-bf16": Spec("peft", "(c) in bf16 autocast", ("train.precision=bf16",)),
    # one optimisation off at a time
    "a-nobucket": Spec("lora-dist", "(a) without length buckets", _defaults() + ("data.bucket=false",)),
    "a-bf16-sdpa": Spec(
        "lora-dist", "(a) with attention of bf16 inputs in bf16 (torch's CPU kernel)", _defaults(), ("bf16_sdpa",)
    ),
    "a-mkl": Spec("lora-dist", "(a) with frozen Linears on MKL (plain nn.Linear)", _defaults(), ("plain_linear",)),
    "a-fullseq": Spec("lora-dist", "(a) with the last block run at every position", _defaults(), ("full_last_block",)),
    "a-noaddmm": Spec("lora-dist", "(a) with LoRA as y + scale * ((x @ A) @ B)", _defaults(), ("plain_lora",)),
    "a-plain": Spec(
        "lora-dist",
        "(a) with none of the model changes",
        _defaults(),
        ("plain_linear", "full_last_block", "plain_lora"),
    ),
    "a-compile": Spec("lora-dist", "(a) with torch.compile", _defaults() + ("train.compile=true",)),
    "a-nographs": Spec(
        "lora-dist", "(a) without CUDA graphs (eager steps)", _defaults() + ("train.cuda_graphs=false",)
    ),
    # one multi-tensor cast of every adapter's A and B a step (and one of their gradients) instead of four casts per
    # layer: the same numbers, fewer kernels (issue 32); whether it pays is for a GPU to say
    "a-castonce": Spec(
        "lora-dist",
        "(a) with A and B cast at once (train.lora_cast_once)",
        _defaults() + ("train.lora_cast_once=true",),
    ),
    "a-nopad64": Spec("lora-dist", "(a) with each batch at its own length", _defaults() + ("data.pad_multiple=1",)),
    # fewer padded tokens, more graphs: on the SMS messages 16 gives 8 shapes and 24-34% padding, 64 gives 2-3
    # shapes and 54-58% (issue 32); which pays is for a GPU to say
    "a-pad16": Spec("lora-dist", "(a) with lengths rounded up to 16", _defaults() + ("data.pad_multiple=16",)),
    "a-workers": Spec("lora-dist", "(a) with one DataLoader worker", _defaults() + ("train.num_workers=1",)),
    "a-adamw-loop": Spec("lora-dist", "(a) with torch's default (unfused) AdamW", _defaults(), ("unfused_adamw",)),
    "a-bf16": Spec(
        "lora-dist",
        "(a) in bf16 autocast, frozen weights stored in bf16",
        _defaults() + ("train.precision=bf16",),
        ("cast_frozen",),
    ),
    "a-fp32": Spec("lora-dist", "(a) in fp32 (train.precision=fp32)", _defaults() + ("train.precision=fp32",)),
    "a-bf16-autocast": Spec(
        "lora-dist", "(a) in bf16 autocast (train.precision=bf16)", _defaults() + ("train.precision=bf16",)
    ),
    "a-ckpt": Spec(
        "lora-dist", "(a) with activation checkpointing", _defaults() + ("model.activation_checkpointing=true",)
    ),
    "b-plain": Spec(
        "lora-dist",
        "(b) with none of the model changes",
        ("data.padding=longest", "data.bucket=false"),
        ("plain_linear", "full_last_block", "plain_lora"),
    ),
    "b-ckpt": Spec(
        "lora-dist",
        "(b) with activation checkpointing",
        ("data.padding=longest", "data.bucket=false", "model.activation_checkpointing=true"),
    ),
}


@dataclass
class Step:
    examples: int
    tokens: int  # real (non-pad) tokens
    padded: int  # tokens the model ran over, padding included
    lengths: list[int] = field(default_factory=list)
    width: int = 0  # the padded length T


def apply_patches(names: tuple[str, ...]) -> None:
    """Restore the plain computation for an ablation (in the worker process only)."""
    from lora_dist import frozen_linear, lora, model

    if "plain_linear" in names:
        frozen_linear.enabled = False
    if "bf16_sdpa" in names:
        model.attention = F.scaled_dot_product_attention
    if "full_last_block" in names:
        features = model.GPT2.features

        def forward(self, idx, last_index=None):
            x = features(self, idx)  # (B, T, C): every block at every position
            if last_index is not None:
                x = x[torch.arange(x.shape[0], device=x.device), last_index]
            return self.head(x)

        model.GPT2.forward = forward
    if "plain_lora" in names:
        lora.LoRALayer.add_to = lambda self, x, y: y + self.forward(x)
    if "unfused_adamw" in names:
        from lora_dist.train import strategy

        def adamw(self, params):
            t = self.cfg.train
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))

        strategy.Local._adamw = adamw


def common_overrides(args) -> list[str]:
    return [
        f"model.name={args.model}",
        "model.weights=random",
        "data.download=false",
        f"train.batch_size={args.batch}",
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        "tracking.wandb.mode=disabled",
    ]


class LoraDist:
    """lora-dist's own step, as train/loop.py takes it: strategy forward at the last real token, CE loss,
    backward, AdamW step (with the gradient-norm computation), and the loss read back."""

    def __init__(self, spec: Spec, args):
        apply_patches(spec.patches)
        self.cfg = load_config(RECIPE, common_overrides(args) + list(spec.overrides))
        cfg, t = self.cfg, self.cfg.train
        seed_everything(args.seed)
        splits = prepare_splits(cfg.data, say=lambda *a: None)
        labels = split_labels(splits, cfg.data)
        cuda = args.device.startswith("cuda")
        model, _ = build_model(cfg, len(labels), device=args.device if cuda else None)  # as the trainer builds it
        if "cast_frozen" in spec.patches:
            cast_frozen(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[t.precision])
        self.model_cfg = model.cfg
        datasets, length = build_datasets(splits, cfg.data, model.cfg.context_length, labels)
        self.s = make_strategy(cfg)  # first: the batches' pad multiple follows whether its steps are captured
        self.loaders = make_loaders(
            datasets,
            length,
            cfg.data,
            t.batch_size,
            1,
            1,
            0,
            t.seed,
            t.num_workers,
            pin_memory=cuda,
            multiple=train_pad_multiple(cfg, self.s),  # as the trainer pads them
        )
        self.steps_per_epoch = self.loaders.sampler.steps
        if t.compile:
            model.compile()
        self.s.prepare(model, t.batch_size, 1)
        self.s.model.train()
        self.lr = t.lr
        self.reset(0)

    def reset(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch (the same batches every time)."""
        self.loaders.sampler.set_epoch(epoch)
        self.batches = iter(self.loaders.train)

    def _next(self):
        return next(self.batches)

    @staticmethod
    def shape(batch) -> tuple[int, ...]:
        return tuple(batch.ids.shape)

    def step(self, batch=None) -> Step:
        s = self.s
        batch = self._next() if batch is None else batch
        lengths = (batch.last + 1).tolist()
        batch = batch.to(s.device)
        loss, _ = s.train_micro(batch, True, self.lr)  # the loop's step: a captured CUDA graph where it applies
        loss.item()
        return Step(len(batch), batch.tokens, batch.ids.numel(), lengths, batch.ids.shape[1])


class Peft:
    """transformers' GPT2ForSequenceClassification with PEFT LoRA (rank 16, alpha 16, dropout 0) on
    c_attn, c_proj and c_fc, the score head trained in full; the same messages, tokenized by transformers'
    GPT-2 tokenizer, in random batches padded as DataCollatorWithPadding pads them."""

    def __init__(self, spec: Spec, args):
        import json
        from importlib import resources

        import transformers
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import DataCollatorWithPadding, GPT2TokenizerFast

        cfg = load_config(
            RECIPE, common_overrides(args) + ["data.padding=batch", "data.bucket=false"] + list(spec.overrides)
        )
        self.cfg = cfg
        seed_everything(args.seed)
        splits = prepare_splits(cfg.data, say=lambda *a: None)
        assets = resources.files("lora_dist") / "assets"
        vocab = json.loads((assets / "encoder.json").read_text())
        merges = [tuple(line.split()) for line in (assets / "vocab.bpe").read_text().split("\n")[1:] if line.strip()]
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        tok.pad_token = tok.eos_token
        texts, labels = splits["train"]["text"].tolist(), splits["train"]["label"].tolist()
        self.examples = [
            {"input_ids": ids, "labels": int(y == "spam")}
            for ids, y in zip(tok(texts)["input_ids"], labels, strict=True)
        ]
        self.collate = DataCollatorWithPadding(tok)
        g = SIZES[args.model]
        hf = transformers.GPT2Config(
            vocab_size=g.vocab_size,
            n_positions=g.context_length,
            n_embd=g.emb_dim,
            n_layer=g.n_layers,
            n_head=g.n_heads,
            num_labels=2,
            pad_token_id=tok.pad_token_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.model_cfg = g
        torch.manual_seed(args.seed)
        model = transformers.GPT2ForSequenceClassification(hf)
        lcfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            fan_in_fan_out=True,
            target_modules=["c_attn", "c_proj", "c_fc"],
            modules_to_save=["score"],
        )
        self.device = pick_device(args.device, 0)
        # like with like: the attention kernels (a) runs with (no cuDNN graph built for each new length)
        prefer_attention_kernels(self.device)
        self.model = get_peft_model(model, lcfg).to(self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
        self.amp = {"fp32": None, "bf16": torch.bfloat16}[t.precision]
        self.sampler = ShardedSampler(self.examples, 1, 0, t.batch_size, 1, t.seed)  # random batches, as (b)
        self.steps_per_epoch = self.sampler.steps
        self.batch_size = t.batch_size
        self.reset(0)

    def reset(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.order = iter(self.sampler)

    def _next(self):
        return self.collate([self.examples[next(self.order)] for _ in range(self.batch_size)])

    @staticmethod
    def shape(batch) -> tuple[int, ...]:
        return tuple(batch["input_ids"].shape)

    def step(self, batch=None) -> Step:
        b = self._next() if batch is None else batch
        mask = b["attention_mask"]
        lengths = mask.sum(1).tolist()
        b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        return Step(len(lengths), int(sum(lengths)), mask.numel(), lengths, mask.shape[1])


def build(name: str, args):
    spec = VARIANTS[name]
    start = time.perf_counter()
    runner = (Peft if spec.kind == "peft" else LoraDist)(spec, args)
    return runner, time.perf_counter() - start


def warm_batches(runner, timed: int) -> tuple[list, set[tuple[int, ...]]]:
    """One batch of each shape among the first `timed` batches of epoch 0 (the ones `train_throughput.py` times),
    and those shapes: the warm-up steps on these first, so that no shape is first seen (captured as a CUDA graph,
    a kernel chosen for it) inside the timed window. Leaves the runner at epoch 0's start."""
    runner.reset(0)
    firsts: dict[tuple[int, ...], object] = {}
    for _ in range(timed):
        batch = runner._next()
        firsts.setdefault(runner.shape(batch), batch)
    runner.reset(0)
    return list(firsts.values()), set(firsts)
