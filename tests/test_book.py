"""The book's chapter-6 experiments: pooling, causal mask, context padding, what is trained, configs/book/."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, SMOKE, read_metrics, shared_train, torchrun
from safetensors.torch import load_file

from lora_dist.build import build_model, seed_everything
from lora_dist.cli import main
from lora_dist.config import load_config
from lora_dist.data import Collate
from lora_dist.tokenizer import get_tokenizer

BOOK = sorted((ROOT / "configs" / "book").glob("row-*.yaml"))
SIZES = {"gpt2-small": (768, 12), "gpt2-medium": (1024, 24), "gpt2-large": (1280, 36), "gpt2-xl": (1600, 48)}


def tiny(pooling="last_real", causal=True, trainable="lora"):
    cfg = load_config(
        SMOKE, [f"model.pooling={pooling}", f"model.causal_mask={str(causal).lower()}", f"train.trainable={trainable}"]
    )
    seed_everything(0)
    model, _ = build_model(cfg, 2)
    return model.eval()


def padded(texts, length=None):
    ids = [get_tokenizer().encode(t) for t in texts]
    return Collate(50256, length)([(i, 0) for i in ids])


MESSAGES = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "ok", "see you at 6 then, bring the cake"]


# ------------------------------------------------------------------------------------------ pooling


@torch.no_grad()
def test_last_pooling_reads_the_padding_and_last_real_does_not():
    """The book's `last` reads position -1, so the padding length changes its predictions; `last_real`
    reads each message's last real token, which causal attention keeps blind to the padding."""
    for pooling, moves in (("last", True), ("last_real", False)):
        model = tiny(pooling)
        short, long = padded(MESSAGES), padded(MESSAGES, 40)
        a, b = model(short.ids, short.last), model(long.ids, long.last)
        if moves:
            assert (a - b).abs().max() > 1e-3, pooling
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_each_pooling_reads_what_it_names():
    """Against the full (B, T, C) hidden states, computed without the last-position shortcut."""
    batch = padded(MESSAGES, 24)
    rows = torch.arange(len(MESSAGES))
    for pooling in ("last_real", "last", "first", "mean", "mean_all"):
        model = tiny(pooling)
        h = model.features(batch.ids)  # (B, T, C)
        real = (torch.arange(24) <= batch.last[:, None]).float().unsqueeze(-1)
        want = {
            "last_real": h[rows, batch.last],
            "last": h[:, -1],
            "first": h[:, 0],
            "mean": (h * real).sum(1) / real.sum(1),
            "mean_all": h.mean(1),
        }[pooling]
        torch.testing.assert_close(model(batch.ids, batch.last), model.head(want), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_without_the_causal_mask_early_tokens_see_later_ones():
    ids = padded(["one two three four five"]).ids
    changed = ids.clone()
    changed[0, -1] = 1000
    for causal in (True, False):
        model = tiny("first", causal)
        moved = (model(ids, torch.tensor([4])) - model(changed, torch.tensor([4]))).abs().max()
        assert (moved > 1e-4) == (not causal), (causal, moved)
        full = model.head(model.features(ids))[:, 2]  # the one-position shortcut equals the full pass
        torch.testing.assert_close(model.head(model.features(ids, torch.tensor([2]))), full, rtol=1e-5, atol=1e-5)


def test_context_padding_pads_to_the_context():
    cfg = load_config(SMOKE, ["data.padding=context", "train.max_steps=2", "train.epochs=1"])
    from lora_dist.data import build_datasets, fixed_length, prepare_splits

    splits = prepare_splits(cfg.data)
    datasets, length = build_datasets(splits, cfg.data, 256)
    assert length == 256 and fixed_length(cfg.data, length) == 256
    batch = Collate(50256, fixed_length(cfg.data, length))([datasets["test"][i] for i in range(3)])
    assert batch.ids.shape == (3, 256)


# ------------------------------------------------------------------------------------ what is trained


def expected_trainable(name: str, trainable: str, lora_head_trained: bool = False, rank: int = 16, alpha=None) -> int:
    """Hand-computed from GPT-2's shapes: a block is 12 C^2 + 13 C, the final LayerNorm 2C, the head
    C x 2 + 2; LoRA adds r (in + out) per wrapped layer (4 attention C->C, fc C->4C, proj 4C->C) and on
    the head r (C + 2)."""
    C, L = SIZES[name]
    block, norm, head = 12 * C * C + 13 * C, 2 * C, 2 * C + 2
    total = 50257 * C + 1024 * C + L * block + norm + head
    if trainable == "lora":
        per_block = 4 * rank * 2 * C + 2 * rank * (C + 4 * C)
        return L * per_block + rank * (C + 2) + (head if lora_head_trained else 0)
    return {
        "last_layer": head,
        "last_block": head + norm + block,
        "last_two_blocks": head + norm + 2 * block,
        "all": total,
    }[trainable]


def test_hand_computed_counts_match_the_books():
    assert expected_trainable("gpt2-small", "lora") == 2_666_528  # the book's appendix E
    assert expected_trainable("gpt2-small", "all") == 124_441_346


@pytest.mark.parametrize("trainable", ["lora", "last_layer", "last_block", "last_two_blocks", "all"])
def test_trainable_counts_for_gpt2_small(trainable, capsys):
    cfg = ROOT / "configs" / "book" / "appendix-e.yaml"
    assert main(["params", "--config", str(cfg), f"train.trainable={trainable}"]) == 0
    out = capsys.readouterr().out
    assert f"trainable parameters: {expected_trainable('gpt2-small', trainable):,}" in out
    assert "total parameters: 124,441,346" in out


@pytest.mark.parametrize("config", BOOK, ids=lambda p: p.stem)
def test_every_book_row_loads_and_counts_what_the_book_trains(config, capsys):
    cfg = load_config(config)
    assert main(["params", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    want = expected_trainable(
        cfg.model.name, cfg.train.trainable, lora_head_trained=cfg.lora.train_head, rank=cfg.lora.rank
    )
    assert f"trainable parameters: {want:,}" in out, out
    assert cfg.data.padding in ("longest", "context", "batch") and cfg.train.epochs == 5 and cfg.train.lr == 5e-5


def test_book_rows_cover_the_table():
    rows = {int(p.name.split("-")[1]): load_config(p) for p in BOOK}
    assert sorted(rows) == list(range(1, 20))
    assert rows[10].model.weights == "random" and all(
        c.model.weights == "pretrained" for n, c in rows.items() if n != 10
    )
    assert (
        rows[2].model.pooling == "first"
        and rows[16].model.pooling == "last_real"
        and rows[19].model.pooling == "mean_all"
    )
    assert rows[17].model.causal_mask is False and rows[13].data.padding == "context"
    assert rows[12].lora.alpha == 8 and rows[12].model.name == "gpt2-xl"
    assert (rows[14].train.batch_size, rows[15].train.grad_accum) == (1, 8)
    book = load_config(ROOT / "configs" / "book" / "appendix-e.yaml")
    assert book.model.pooling == "last" and book.lora.train_head is False  # appendix E: the head's adapter only


def test_only_the_named_tensors_reach_the_optimizer():
    from lora_dist.device import DistEnv
    from lora_dist.train.strategy import Local

    for trainable in ("last_layer", "last_block", "last_two_blocks", "all", "lora"):
        cfg = load_config(SMOKE, [f"train.trainable={trainable}", "train.device=cpu"])
        seed_everything(0)
        model, _ = build_model(cfg, 2)
        s = Local(cfg, DistEnv(), torch.device("cpu"))
        s.prepare(model, 8, 1)
        names = {id(p): n for n, p in model.named_parameters()}
        in_optimizer = {names[id(p)] for g in s.optimizer.param_groups for p in g["params"]}
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert in_optimizer == trained
        blocks = {n.split(".")[1] for n in trained if n.startswith("blocks.")}
        if trainable != "lora":
            assert (
                blocks
                == {"last_layer": set(), "last_block": {"1"}, "last_two_blocks": {"0", "1"}, "all": {"0", "1"}}[
                    trainable
                ]
            )
            assert {"head.weight", "head.bias"} <= trained
            assert ("final_norm.weight" in trained) == (trainable != "last_layer")
            assert ("tok_emb.weight" in trained) == (trainable == "all")


SHORT = (
    "train.epochs=1",
    "train.max_steps=12",
    "train.eval_every=100",
    "train.eval_batches=2",
    "train.trainable=last_block",
    "tracking.wandb.mode=disabled",
)


@pytest.fixture(scope="module")
def last_block_run(tmp_path_factory):
    return shared_train(tmp_path_factory, "book-last-block", *SHORT)[0]


def test_last_block_run_saves_those_weights_and_is_usable(last_block_run, capsys):
    out = last_block_run
    assert not (out / "adapter").exists()
    tensors = load_file(str(out / "weights" / "model.safetensors"))
    results = json.loads((out / "results.json").read_text())
    assert (
        sum(t.numel() for t in tensors.values())
        == results["trainable_params"]
        == 128 * 2 + 2 + 2 * 128 + (12 * 128 * 128 + 13 * 128)
    )
    assert {k.split(".")[0] for k in tensors} == {"blocks", "final_norm", "head"}
    assert {k.split(".")[1] for k in tensors if k.startswith("blocks.")} == {"1"}
    spec = json.loads((out / "weights" / "weights_config.json").read_text())
    assert spec["kind"] == "weights" and spec["trainable"] == "last_block" and spec["lora"] is None
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["test_accuracy"])
    assert main(["classify", "--adapter", str(out), "--precision", "fp32", "--json", "hello there"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in ("ham", "spam")


@pytest.mark.slow
def test_last_block_one_and_two_processes_agree(last_block_run, tmp_path):
    """Full blocks trainable under DDP: the same weights as one process, and each step all-reduces exactly
    the trainable tensors' gradients."""
    from test_distributed import assert_same_adapter

    out = tmp_path / "ddp"
    proc = torchrun(2, "train", "--config", str(SMOKE), f"output_dir={out}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(last_block_run / "weights" / "model.safetensors"))
    two = load_file(str(out / "weights" / "model.safetensors"))
    # The key bias adds q . b_k to every score of a query alike, which softmax ignores: its gradient is zero
    # in exact arithmetic, so what AdamW (update ~ lr x sign) makes of the rounding noise is not comparable.
    # Every other trained tensor must agree.
    noise = {k for k in one if k.endswith("att.key.bias")}
    assert noise and all(one[k].abs().max() <= 12 * 1e-3 + 1e-6 for k in noise)  # at most lr per step
    assert_same_adapter(
        {k: v for k, v in one.items() if k not in noise}, {k: v for k, v in two.items() if k not in noise}
    )
    trainable = json.loads((out / "results.json").read_text())["trainable_params"]
    per_step = [m["allreduce_bytes"] for m in read_metrics(out) if "allreduce_bytes" in m]
    assert len(per_step) == 12 and set(per_step) == {trainable * 4}


def test_a_trained_linear_is_never_read_from_a_stale_packed_copy():
    """Fused AdamW updates weights in place without bumping their version, so a trainable layer must never
    take the packed (cached) frozen path, not even in a no_grad evaluation between steps."""
    from lora_dist.frozen_linear import Linear

    torch.manual_seed(0)
    lin = Linear(16, 8)
    x = torch.randn(4, 16)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        lin(x)  # an evaluation before the step
    lin(x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
