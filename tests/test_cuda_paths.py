"""What the code does on a GPU, checked on the CPU with the GPU's answers mocked (issue 13).

    pytest tests/test_cuda_paths.py

bf16 from the compute capability of this rank's own GPU, TF32 for fp32, pinned batches, and the CUDA RNG
restore when the GPU count changes. bench/gpu_check.sh runs the same paths on a real GPU.
"""

import contextlib

import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_dist import load_config
from lora_dist.build import build_model
from lora_dist.data import Batch, DataConfig, SpamDataset
from lora_dist.device import DistEnv
from lora_dist.lora import adapted_layers
from lora_dist.train.loaders import make_loaders
from lora_dist.train.strategy import Local


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build's answers for a GPU of the capability set in `calls["capability"]`; every call logged."""
    calls = {"log": [], "capability": (8, 0)}

    def set_device(dev):
        calls["log"].append(("set_device", torch.device(dev)))

    def get_device_capability(dev=None):
        calls["log"].append(("capability", None if dev is None else torch.device(dev)))
        return calls["capability"]

    def is_bf16_supported(*a, **k):  # would count emulated bf16 (V100, T4) as support, and ask cuda:0
        calls["log"].append(("is_bf16_supported", None))
        return True

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    with tf32_flags_restored():
        yield calls
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


@contextlib.contextmanager
def tf32_flags_restored():
    """torch's TF32 flags, off for the test and put back after (monkeypatch cannot: they are properties)."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = False
        yield
    finally:
        for f, v in zip(flags, saved, strict=True):
            f.allow_tf32 = v


def strategy(*overrides: str) -> Local:
    return Local(
        load_config(None, list(overrides)), DistEnv(rank=1, world_size=2, local_rank=1), torch.device("cuda", 1)
    )


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_precision_follows_compute_capability(fake_gpu, capability, expected):
    fake_gpu["capability"] = capability
    s = strategy("train.precision=auto")
    assert s.precision == expected
    # set_device first, then the capability of this rank's GPU (cuda:1), never of the current device
    assert fake_gpu["log"][:2] == [("set_device", torch.device("cuda", 1)), ("capability", torch.device("cuda", 1))]
    assert ("is_bf16_supported", None) not in fake_gpu["log"]


def test_fp32_on_cuda_uses_tf32_unless_switched_off(fake_gpu):
    s = strategy("train.precision=fp32")
    assert s.tf32 and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert s.precision_text() == "fp32 (TF32 matmuls)"

    torch.backends.cuda.matmul.allow_tf32 = False
    off = strategy("train.precision=fp32", "train.tf32=false")
    assert not off.tf32 and not torch.backends.cuda.matmul.allow_tf32 and off.precision_text() == "fp32"
    bf16 = strategy("train.precision=auto")  # capability 8.0: bf16, and TF32 does not apply
    assert bf16.precision_text() == "bf16 (auto)" and not bf16.tf32


def test_on_a_gpu_frozen_weights_are_stored_in_bf16_and_the_step_is_captured(fake_gpu, monkeypatch):
    """bf16 autocast on a GPU: the frozen Linear weights of the blocks are stored in bf16 once (adapters, head,
    norms and embeddings stay fp32); the step is captured where nothing stands in the way; cuDNN attention is
    off. fp32 keeps fp32 weights; several processes or accumulation keep eager steps."""
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):  # no GPU to move to here: moves are dropped, dtype casts happen
        args = [a for a in args if not isinstance(a, (torch.device, str))]
        kwargs.pop("device", None)
        return real_to(self, *args, **kwargs) if args or kwargs else self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    torch.backends.cuda.enable_cudnn_sdp(True)
    s = strategy("train.precision=auto", "model.name=tiny", "model.weights=random")
    assert s.precision == "bf16" and s.use_graphs and not torch.backends.cuda.cudnn_sdp_enabled()
    model = s.place(build_model(s.cfg, 2)[0])
    att = model.blocks[0].att.query
    assert att.linear.weight.dtype == torch.bfloat16 and model.blocks[1].ff.proj.linear.weight.dtype == torch.bfloat16
    assert att.lora.A.dtype == torch.float32 and model.head.linear.weight.dtype == torch.float32
    assert model.tok_emb.weight.dtype == torch.float32 and model.blocks[0].norm1.weight.dtype == torch.float32
    fp32 = strategy("train.precision=fp32", "model.name=tiny", "model.weights=random")
    assert fp32.place(build_model(fp32.cfg, 2)[0]).blocks[0].att.query.linear.weight.dtype == torch.float32
    assert not strategy("train.grad_accum=2").use_graphs and not strategy("train.cuda_graphs=false").use_graphs


def test_tf32_is_left_alone_on_the_cpu():
    with tf32_flags_restored():
        s = Local(load_config(None, ["train.precision=fp32"]), DistEnv(), torch.device("cpu"))
    assert not s.tf32 and not torch.backends.cuda.matmul.allow_tf32 and s.precision_text() == "fp32"


def test_dataloader_pins_each_batch(monkeypatch):
    """DataLoader(pin_memory=True) pins what has a pin_memory() method and leaves anything else pageable."""
    pinned = []
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t)  # no CUDA here to pin
    frame = pd.DataFrame(
        {
            "text": ["win a prize now", "see you at lunch", "call me", "free entry"] * 2,
            "label": ["spam", "ham", "ham", "spam"] * 2,
        }
    )
    ds = SpamDataset(frame, 16)
    loaders = make_loaders({"train": ds}, 16, DataConfig(), 4, 1, 1, 0, 123, pin_memory=True)
    batch = next(iter(loaders.train))
    assert isinstance(batch, Batch) and len(batch) == 4
    assert [t.data_ptr() for t in pinned] == [batch.ids.data_ptr(), batch.last.data_ptr(), batch.labels.data_ptr()]


def test_mfu_peak_matches_device_names_exactly():
    """An L40 is not an L4, an H100 PCIe not an H100 SXM; an unknown card gets a measured peak instead."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import nominal_peak

    assert nominal_peak("NVIDIA L40") == 181.0 and nominal_peak("NVIDIA L4") == 121.0
    assert nominal_peak("NVIDIA H100 PCIe") == 756.0 and nominal_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert nominal_peak("NVIDIA A10G") is None and nominal_peak("NVIDIA A100-SXM4-80GB") == 312.0


def test_tf32_is_put_back_when_the_run_ends(monkeypatch):
    """TF32 is a process-wide switch: a run that turns it on (fp32 on a GPU) turns it back off at cleanup, so a
    notebook's next computation is full fp32 again."""
    from lora_dist.train import strategy

    monkeypatch.setattr(strategy, "use_tf32", lambda *a: True)  # as on a GPU in fp32
    with tf32_flags_restored():  # both off to begin with
        s = Local(load_config(None, ["train.precision=fp32"]), DistEnv(), torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        s.cleanup()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


class CastCount(TorchDispatchMode):
    """The dtype casts of what runs inside: `_to_copy` to another dtype, and `_foreach_copy_` across dtypes."""

    def __init__(self):
        super().__init__()
        self.ops = {"_to_copy": 0, "_foreach_copy_": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype", args[0].dtype) != args[0].dtype:
            self.ops["_to_copy"] += 1
        if func is torch.ops.aten._foreach_copy_.default and args[0][0].dtype != args[1][0].dtype:
            self.ops["_foreach_copy_"] += 1
        return func(*args, **kwargs)


def lora_cast_once_model(fake_gpu, monkeypatch, once: bool):
    """The tiny model as `Local.place` leaves it on a GPU under bf16 (moves dropped: no GPU here), with
    `train.lora_cast_once` as asked, and B drawn (it starts at zero, which leaves A without a gradient)."""
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        args = [a for a in args if not isinstance(a, (torch.device, str))]
        kwargs.pop("device", None)
        return real_to(self, *args, **kwargs) if args or kwargs else self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    s = strategy("train.precision=bf16", "model.name=tiny", "model.weights=random", f"train.lora_cast_once={once}")
    model = s.place(build_model(s.cfg, 2)[0]).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in adapted_layers(model):
            m.lora.B.normal_(0, 0.02)
    monkeypatch.setattr(torch.nn.Module, "to", real_to)
    return model


def test_lora_cast_once_computes_what_autocast_computes(fake_gpu, monkeypatch):
    """train.lora_cast_once: under bf16 autocast every adapter's A and B are cast for the pass at once, and the
    loss and every gradient, into the fp32 A and B, equal autocast's cast-at-each-use bit for bit; off by
    default; with autocast off (fp32 inference) the adapters are used as they are."""
    from lora_dist.lora import LoRALayer

    plain = lora_cast_once_model(fake_gpu, monkeypatch, False)
    once = lora_cast_once_model(fake_gpu, monkeypatch, True)
    assert not plain._forward_pre_hooks and len(once._forward_pre_hooks) == 1
    assert load_config(None, []).train.lora_cast_once is False
    seen = []
    for m in once.modules():
        if isinstance(m, LoRALayer):
            m.register_forward_pre_hook(lambda m, a: seen.append(m.cast and (m.cast[0].dtype, m.cast[1].dtype)))
    g = torch.Generator().manual_seed(1)
    ids, last = torch.randint(0, 50000, (4, 12), generator=g), torch.tensor([11, 5, 8, 2])
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain(ids, last)  # frozen_linear's one-time oneDNN probe, whose casts are not the step's
    seen.clear()
    losses, casts = [], []
    for model in (plain, once):
        with CastCount() as count:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids, last)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
        losses.append(loss)
        casts.append(count.ops)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 13  # 12 block Linears and the head, each cast at once
    # 4 casts per layer (A, B, their gradients) become 2 multi-tensor copies
    assert casts[0]["_to_copy"] - casts[1]["_to_copy"] == 13 * 4 and casts[1]["_foreach_copy_"] == 2
    assert casts[0]["_foreach_copy_"] == 0
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in once.named_parameters() if p.requires_grad}
    for n, p in plain.named_parameters():
        if p.requires_grad:
            assert grads[n].dtype == torch.float32 and torch.equal(grads[n], p.grad), n
    assert all(bool(grads[n].abs().sum() > 0) for n in grads if n.endswith((".A", ".B")))
    assert all(m.cast is None for m in once.modules() if isinstance(m, LoRALayer))  # nothing outlives the pass
    # fp32 (no autocast; frozen weights kept fp32, as on the CPU): the hook leaves A and B as they are
    from lora_dist.lora import cast_adapters_once

    fp32, hooked = (build_model(load_config(None, ["model.name=tiny", "model.weights=random"]), 2)[0] for _ in "ab")
    assert cast_adapters_once(hooked, torch.bfloat16) == 13
    hooked.get_submodule("head.lora").register_forward_pre_hook(lambda m, a: seen.append(m.cast))
    seen.clear()
    with torch.no_grad():
        assert torch.equal(hooked.eval()(ids, last), fp32.eval()(ids, last))
    assert seen == [None]
