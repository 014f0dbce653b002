"""FLOPs of a frozen-base LoRA training step, and what this machine's matmul can do.

    python bench/flops.py                 # fp32 matmul GFLOP/s (MKL and packed oneDNN), and the gpt2-small limit
    python bench/flops.py --dtype bf16    # bf16 (CPUs with AVX512-BF16 or AMX, GPUs)

A frozen-base LoRA step does the forward pass and the input gradients of every frozen Linear layer, but
no weight gradients for them: about 4 x (Linear parameters) FLOPs per token, where full fine-tuning does
6 x. On top come attention (causal: half of the T x T scores), and the adapters themselves (forward,
input and weight gradients: 6 x r x (in + out) per token and adapter).
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_dist.model import SIZES, GPTConfig


def linear_params(cfg: GPTConfig) -> int:
    """The Linear weights of the blocks (Q, K, V, out, fc, proj): 12 d^2 per layer, 85M for gpt2-small."""
    return 12 * cfg.emb_dim**2 * cfg.n_layers


def adapter_width(cfg: GPTConfig) -> int:
    """Sum of (in + out) over the adapters on every Linear layer of the blocks (the book's targets)."""
    d = cfg.emb_dim
    return cfg.n_layers * (4 * (d + d) + 2 * (d + 4 * d))


def step_flops(cfg: GPTConfig, rank: int, lengths: list[int], padded_to: int | None = None) -> float:
    """FLOPs of one training step over sequences of `lengths` tokens, each padded to `padded_to` (or
    not padded). The last block, whose output is read at one position, is counted in full: an upper bound
    by 10/(12 L) of the linear work."""
    d, L = cfg.emb_dim, cfg.n_layers
    per_token = 4 * linear_params(cfg) + 6 * rank * adapter_width(cfg)
    total = 0.0
    for n in lengths:
        t = padded_to or n
        # attention: QK^T and AV, 2 x t^2 x d forward with the causal half skipped; backward twice that
        total += per_token * t + 3 * (2 * t * t * d) * L
    return total


def limit_examples_per_s(cfg: GPTConfig, mean_tokens: float, gflops: float) -> float:
    """The issue's bound: 4 x (Linear parameters) FLOPs per real token at the measured matmul rate."""
    return gflops * 1e9 / (4 * linear_params(cfg) * mean_tokens)


def matmul_gflops(
    dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 1024, seconds: float = 2.0, kernel: str = "best"
) -> float:
    """The best rate of an n x n x n matmul over about `seconds` seconds (best of short repeats, so that a
    busy moment on a shared machine does not drag it down). On the CPU, `kernel` is "mkl" (torch.mm),
    "onednn" (a weight packed once, as lora_dist.frozen_linear runs frozen layers) or "best" of the two."""
    if kernel == "best" and device == "cpu":
        return max(matmul_gflops(dtype, device, n, seconds / 2, k) for k in ("mkl", "onednn"))
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def f():
        return a @ b

    if kernel == "onednn" and device == "cpu":
        from lora_dist.frozen_linear import onednn_available

        if not onednn_available(dtype):
            return 0.0
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)

        def f():
            return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        f()
    sync()
    best, start = 0.0, time.perf_counter()
    reps = 4 if device == "cpu" else 50
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        sync()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1024)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kernels = ("mkl", "onednn") if args.device == "cpu" else ("best",)
    rates = {k: matmul_gflops(dtype, args.device, args.n, kernel=k) for k in kernels}
    for k, g in rates.items():
        print(
            f"{args.dtype} matmul {args.n}^3 on {args.device}, {k} ({torch.get_num_threads()} threads): {g:.1f} GFLOP/s"
        )
    g = max(rates.values())
    cfg = SIZES["gpt2-small"]
    print(
        f"gpt2-small: {linear_params(cfg) / 1e6:.1f}M Linear parameters; at 30.45 tokens per example the limit is "
        f"{limit_examples_per_s(cfg, 30.45, g):.1f} examples/s"
    )


if __name__ == "__main__":
    main()
