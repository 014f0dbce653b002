"""The Linear layers of the model, with a faster path while their weights are frozen (LoRA's base layers).

    python -c "import torch; from lora_dist.frozen_linear import Linear; print(Linear(8, 4).eval()(torch.ones(2, 8)))"

On the CPU in fp32, PyTorch runs every Linear through MKL's sgemm, which re-packs the weight at each call
and, on AMD CPUs, runs well below the machine's peak. LoRA never changes the base weights, so they are
packed once for oneDNN, both ways: W for the forward pass (x @ W^T) and W^T for the input gradient (dY @ W),
the latter only once a forward pass needs a gradient (inference, `classify` and `serve`, never packs it).
On a 2-core AMD EPYC (Zen 4) that is 229 GFLOP/s against MKL's 200 on a 1024^3 matmul (bench/flops.py), and
1.07x on a whole gpt2-small training step (bench/README.md). The cost is memory: two packed copies of the
frozen weights in training, one in inference. Under CPU autocast to bf16 the packed copies are bf16 (autocast
would round the weights to bf16 at every call anyway).

The packed copies live in a cache keyed by the weight tensor, outside the module (no state_dict entries, and
copies of the module stay plain), and are rebuilt whenever the weight changes: merge and unmerge,
load_state_dict, .to(). Everywhere else (GPU, fp16 autocast, trainable weights, ZeRO-3's partitioned
weights, torch.compile) it is a plain nn.Linear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

enabled = True  # the switch, for benchmarks and for ruling this path out when debugging
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {dtype: (its identity, packed W, packed W^T)}
_onednn: dict[torch.dtype, bool] = {}  # dtype -> whether this CPU and build run the packed ops in it


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict); a frozen weight takes the packed oneDNN path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    dtype = _fast_dtype(x, weight, bias)
    if dtype is None:
        return F.linear(x, weight, bias)
    backward = torch.is_grad_enabled() and x.requires_grad  # only then is W^T needed (the input gradient)
    w, wt = packed(weight, dtype, transposed=backward)
    if dtype != x.dtype:  # what autocast does: compute in its dtype, inputs and bias included
        x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
    if wt is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")  # (..., in) -> (..., out)
    return _PackedLinear.apply(x, w, wt, bias)


def _fast_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """fp32 (no autocast), bf16 (under CPU autocast to bf16), or None: take nn.Linear's path."""
    # Only frozen weights: an optimizer step changes a trainable weight in place without always bumping the
    # version the cache checks (fused AdamW), so even a no_grad evaluation of one must read it directly.
    trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    if (
        not enabled
        or trains
        or x.device.type != "cpu"
        or x.dim() < 2
        or torch.compiler.is_compiling()
        or hasattr(weight, "ds_id")
    ):
        return None
    if torch.is_autocast_enabled("cpu"):
        auto = torch.get_autocast_dtype("cpu")
        ok = auto == torch.bfloat16 and weight.dtype in (torch.float32, torch.bfloat16)
    else:
        auto, ok = torch.float32, x.dtype == weight.dtype == torch.float32
    return auto if ok and onednn_available(auto) else None


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this build and CPU run the packed oneDNN linear ops in `dtype` (bf16 needs AVX-512 or
    AVX-NE-CONVERT: oneDNN refuses it on CPUs without them, e.g. AMD Zen 3)."""
    if dtype not in _onednn:
        try:  # the probe must not run under autocast: its bf16 rounding would fail the fp32 comparison
            with torch.autocast("cpu", enabled=False):
                _onednn[dtype] = _probe_onednn(dtype)
        except (AttributeError, RuntimeError):
            _onednn[dtype] = False
    return _onednn[dtype]


def _probe_onednn(dtype: torch.dtype) -> bool:
    """Whether the packed oneDNN linear ops exist for `dtype` and compute x @ W^T."""
    # Its own generator, not the global one: a probe must not move the random stream (a run's dropout masks).
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.ops.mkldnn._linear_pointwise(
        torch.ones(2, 3, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], ""
    )
    return bool(torch.allclose(y.float(), torch.ones(2, 3) @ w.float().t(), atol=1e-2))


@torch.no_grad()
def packed(
    weight: torch.Tensor, dtype: torch.dtype = torch.float32, transposed: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, W^T) in `dtype`, packed for oneDNN, from the cache while the weight is unchanged; W^T is packed the
    first time it is asked for (`transposed`), None before."""
    ident = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    hits = _packed.setdefault(weight, {})
    hit = hits.get(dtype)
    if hit is None or hit[0] != ident:
        hit = (ident, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None), None)
        hits.clear()  # one dtype at a time: a model trains in one precision
        hits[dtype] = hit
    if transposed and hit[2] is None:
        wt = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).t().contiguous(), None)
        hit = hits[dtype] = (ident, hit[1], wt)
    return hit[1], hit[2]


class _PackedLinear(torch.autograd.Function):
    """y = x @ W^T + b with frozen W and b; backward gives the input gradient only."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.wt = wt
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return torch.ops.mkldnn._linear_pointwise(grad.contiguous(), ctx.wt, None, "none", [], ""), None, None, None
