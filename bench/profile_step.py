"""Where a training step's time goes: torch.profiler over steps of one contender, top ops by self time.

    python bench/profile_step.py a                 # lora-dist defaults, gpt2-small, 15 steps
    python bench/profile_step.py a-bf16-sdpa --steps 30
    python bench/profile_step.py a-nographs --device cuda --precision bf16    # CUDA kernels by GPU time

The contenders are those of bench/contenders.py. Warm-up steps come from epoch 1, the profiled ones from the
start of epoch 0. The profiler's own overhead lowers the examples/s it prints; compare ops, not rates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("contender", help="a name from bench/contenders.py VARIANTS")
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    os.chdir(HERE.parent)  # the recipe config is read relative to the repository
    import torch
    from contenders import build
    from torch.profiler import ProfilerActivity, profile

    ns = argparse.Namespace(model=args.model, batch=8, device=args.device, precision=args.precision, seed=123)
    runner, _ = build(args.contender, ns)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runner.reset(1)
    for _ in range(3):
        runner.step()
    runner.reset(0)
    examples = 0
    sync()
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            examples += runner.step().examples
        sync()
    seconds = time.perf_counter() - start
    print(
        f"{args.contender}: {args.steps} steps in {seconds:.2f}s ({examples / seconds:.2f} examples/s under the profiler)"
    )
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
