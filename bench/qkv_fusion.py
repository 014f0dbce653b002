"""Does one fused Q/K/V matmul for the frozen weights pay, next to three? (The adapters stay per projection.)

    python bench/qkv_fusion.py                       # gpt2-small shapes, batch 8 x 30 tokens, bf16 autocast and fp32
    python bench/qkv_fusion.py --tokens 960 --reps 50

Times the forward pass and the input gradient of the frozen Q, K and V projections of one block, through
lora_dist.frozen_linear (packed oneDNN weights on the CPU), three Linear layers against one of three times
the width whose output is split. Both orders alternate; the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_dist.frozen_linear import Linear


def one_step(layers, x, fused: bool) -> None:
    x = x.detach().requires_grad_(True)
    if fused:
        q, k, v = layers(x).chunk(3, dim=-1)
    else:
        q, k, v = (layer(x) for layer in layers)
    (q.float().sum() + k.float().sum() + v.float().sum()).backward()


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=240, help="rows: batch x sequence length")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    d = args.dim
    torch.manual_seed(0)
    three = [Linear(d, d).requires_grad_(False) for _ in range(3)]
    fused = Linear(d, 3 * d).requires_grad_(False)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in three]))
        fused.bias.copy_(torch.cat([m.bias for m in three]))
    x = torch.randn(args.tokens, d)
    for name, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        results = {"three": [], "fused": []}
        for _ in range(3):  # alternate, so drift hits both
            for kind, layers, f in (("three", three, False), ("fused", fused, True)):
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    for _ in range(5):
                        one_step(layers, x, f)
                    results[kind] += timed(lambda layers=layers, f=f: one_step(layers, x, f), args.reps // 3)
        t3, tf = statistics.median(results["three"]), statistics.median(results["fused"])
        print(
            f"{name}, {args.tokens} x {d}: three Q/K/V matmuls {t3 * 1e3:.3f} ms, one fused {tf * 1e3:.3f} ms "
            f"(forward + input gradient); fused is {t3 / tf:.3f}x"
        )


if __name__ == "__main__":
    main()
