"""The GPU check's pre-flight, on the CPU: what would make bench/gpu_check.sh's figures false, or lose them.

    python bench/gpu_preflight.py              # every check but the dry run (seconds)
    python bench/gpu_preflight.py --dry-run    # and bench/gpu_check.sh --dry-run, with $OUT looked at after each step

A GPU may be lent for 15 minutes at most, so the check has to work the first time (issue 32). Each check prints
one line, `ok` or `FAILED` with what is wrong; the exit status is the number of failures (tests/test_gpu_preflight.py
runs it). The GPU's device decisions are faked as tests/test_cuda_paths.py fakes them: a CUDA device of compute
capability 9.0 for the strategy, frozen weights stored in bf16, the step captured (each capture run eagerly).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import contenders  # noqa: E402

from lora_dist import frozen_linear, load_config  # noqa: E402
from lora_dist import model as model_mod  # noqa: E402
from lora_dist.build import add_trainable, build_base, build_model, shared_copy  # noqa: E402
from lora_dist.data import Batch, build_datasets, prepare_splits, split_labels  # noqa: E402
from lora_dist.device import DistEnv  # noqa: E402
from lora_dist.lora import LoRALayer, cast_frozen  # noqa: E402
from lora_dist.model import GPT2, SIZES, Packed  # noqa: E402
from lora_dist.train import graphs  # noqa: E402
from lora_dist.train.loaders import make_loaders  # noqa: E402
from lora_dist.train.loop import train_pad_multiple  # noqa: E402
from lora_dist.train.strategy import Local  # noqa: E402

SCRIPT = HERE / "gpu_check.sh"
SHIPPED = ROOT / "configs" / "gpt2-small-lora.yaml"  # what (a) must equal: the shipped defaults
MAX_DEADLINE = 480  # seconds: a device call has 600, and the machine's start and the copies take some
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what comes back from $OUT
FIELDS = ("device", "e2e_seconds", "train_seconds", "small_vs_peft", "xl_mfu", "xl_hfu", "xl_first_step_seconds")
# dtype casts in one training step of the tiny model (2 blocks, 13 LoRA layers) laid out as on CUDA: LoRA's A and B
# and their gradients (4 per layer), each Linear's and its LoRA's fp32 input (LayerNorm, GELU outputs), the head.
# Measured: 90. A cast more per layer and step is a regression (issue 32 counted about 510 for gpt2-small).
MAX_CASTS = 90
# The same with train.lora_cast_once: A and B cast in one multi-tensor copy, their gradients in one more (each counted
# as one cast), instead of 4 casts per layer. Measured: 40 (90 - 13 * 4 + 2).
MAX_CASTS_ONCE = 40


class Report:
    def __init__(self):
        self.failed: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        print(f"{'ok' if ok else 'FAILED'}: {what}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


@contextlib.contextmanager
def fake_gpu():
    """torch.cuda's answers for one H100 (capability 9.0), and torch's process-wide flags put back after."""
    saved = (
        torch.cuda.set_device,
        torch.cuda.get_device_capability,
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    try:
        yield
    finally:
        torch.cuda.set_device, torch.cuda.get_device_capability = saved[0], saved[1]
        torch.backends.cuda.enable_cudnn_sdp(saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3], saved[4]


# ------------------------------------------------------------------------------------------- the script's plan


def script_contenders() -> dict[str, tuple[list[str], int, int]]:
    """{tag: (contenders, batch size, timed batches per pass)} as gpu_check.sh runs them on a GPU."""
    text = SCRIPT.read_text()
    gpu = text[text.index("else\n    DIR=bench/results") :]
    runs = {k: shlex.split(re.search(rf"{k}_RUN=\((.*?)\)", gpu).group(1)) for k in ("SMALL", "XL")}
    batches = {k: int(v[v.index("--batches") + 1]) for k, v in runs.items()}
    xl_batch = int(re.search(r"XL_BATCH=(\d+)", gpu).group(1))
    small = re.search(r"CONTENDERS=([\w,-]+)", text).group(1).split(",")
    xl = re.search(r"--model \$XL .*?--contenders ([\w,-]+)", text, re.S).group(1).split(",")
    return {"small": (small, 8, batches["SMALL"]), "xl": (xl, xl_batch, batches["XL"])}


class Census:
    """A contender's training batches as its runner draws them on a GPU (`contenders.warm_batches` reads them
    through `reset`, `_next` and `shape`), without a model."""

    data: dict = {}  # (data config, context) -> (datasets, length): tokenized once

    def __init__(self, cfg, strategy: Local, context_length: int):
        key = (cfg.data, context_length)
        if key not in Census.data:
            splits = prepare_splits(cfg.data, say=lambda *a: None)
            Census.data[key] = build_datasets(splits, cfg.data, context_length, split_labels(splits, cfg.data))
        datasets, length = Census.data[key]
        t = cfg.train
        self.multiple = train_pad_multiple(cfg, strategy)
        self.loaders = make_loaders(
            datasets, length, cfg.data, t.batch_size, 1, 1, 0, t.seed, 0, multiple=self.multiple
        )
        self.shape = contenders.LoraDist.shape

    def reset(self, epoch: int) -> None:
        self.loaders.sampler.set_epoch(epoch)
        self.batches = iter(self.loaders.train)

    def _next(self):
        return next(self.batches)


def check_contenders(r: Report) -> None:
    """Every GPU contender's config and pad multiple on CUDA, and its timed batch shapes warmed up first."""
    shipped = load_config(str(SHIPPED))
    for tag, (names, batch, timed) in script_contenders().items():
        model = {"small": "gpt2-small", "xl": "gpt2-xl"}[tag]
        args = argparse.Namespace(model=model, batch=batch, device="cuda", precision="bf16", seed=123)
        for name in names:
            spec = contenders.VARIANTS[name]
            if spec.kind != "lora-dist":
                continue
            cfg = load_config(contenders.RECIPE, contenders.common_overrides(args) + list(spec.overrides))
            if name == "a":
                for key in ("model.pooling", "data.padding", "data.bucket", "data.pad_multiple", "train.cuda_graphs"):
                    section, field = key.split(".")
                    got, want = getattr(getattr(cfg, section), field), getattr(getattr(shipped, section), field)
                    r.check(got == want, f"{tag} ({name}): {key} is {got!r}, as the shipped config's {want!r}")
            with fake_gpu():
                s = Local(cfg, DistEnv(), torch.device("cuda", 0))
                census = Census(cfg, s, SIZES[model].context_length)
            if s.use_graphs:
                r.check(census.multiple > 1, f"{tag} ({name}): captured steps, lengths rounded to {census.multiple}")
            else:
                r.check(census.multiple == 1, f"{tag} ({name}): eager steps, batches at their own length")
            census.reset(0)
            shapes = [census.shape(census._next()) for _ in range(timed)]
            _, warmed = contenders.warm_batches(census, timed)
            unwarmed = [x for x in shapes if x not in warmed]
            r.check(not unwarmed, f"{tag} ({name}): {timed} timed batches, {len(set(shapes))} shapes, all warmed first")
            if s.use_graphs:
                n = len(set(shapes))
                r.check(n <= 8, f"{tag} ({name}): {n} graphs for the timed batches (at most 8)")


# ------------------------------------------------------------------------------------------------ the step


SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.item.default}


class StepCensus(TorchDispatchMode):
    """Every op of a step: host syncs and data-dependent shapes, and dtype casts."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = getattr(func, "tags", ())
        if func is torch.ops.aten.index.Tensor:  # x[rows, last] is not data-dependent; x[mask] is
            dynamic = any(i is not None and i.dtype == torch.bool for i in args[1])
        else:
            dynamic = func in SYNCS or torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags
        if dynamic:
            self.syncs[str(func)] += 1
        if func is torch.ops.aten._to_copy.default and "dtype" in kwargs and kwargs["dtype"] != args[0].dtype:
            self.casts += 1
        elif func is torch.ops.aten._foreach_copy_.default and any(
            d.dtype != t.dtype for d, t in zip(args[0], args[1], strict=True)
        ):
            self.casts += 1  # one multi-tensor kernel on CUDA for its whole list (train.lora_cast_once)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_layout():
    """The model's CUDA code paths on the CPU: plain Linears (no oneDNN packing) and attention in the inputs' dtype;
    each CUDA graph capture replaced by running the step."""
    saved = (frozen_linear.enabled, model_mod.attention, graphs.new_graph)
    frozen_linear.enabled = False
    model_mod.attention = F.scaled_dot_product_attention
    graphs.new_graph = lambda pool: graphs.EagerGraph()
    try:
        yield
    finally:
        frozen_linear.enabled, model_mod.attention, graphs.new_graph = saved


def tiny_strategy(*overrides: str) -> Local:
    cfg = load_config(None, ["model.name=tiny", "model.weights=random", "train.precision=bf16", *overrides])
    s = Local(cfg, DistEnv(), torch.device("cpu"))
    model, _ = build_model(cfg, 2)
    s.store_low(model, torch.bfloat16)  # as Local.place stores them on a GPU
    s.prepare(model, 8, 1)
    s.model.train()
    return s


def batch(width: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (8, width), generator=g)
    last = torch.randint(0, width, (8,), generator=g)
    return Batch(ids, last, torch.randint(0, 2, (8,), generator=g), int((last + 1).sum()))


def check_step(r: Report) -> None:
    """No host sync and no data-dependent op in the step, captured or eager; a bound on its dtype casts; at most
    graphs.MAX_GRAPHS captures."""
    losses = {}
    with cuda_layout():
        for graphed, once in ((True, False), (False, False), (True, True)):
            s = tiny_strategy(f"train.lora_cast_once={str(once).lower()}")
            s.use_graphs = graphed
            s.train_micro(batch(64), True, 5e-5)  # the capture (warm-up, then the step)
            b = batch(64, 1)
            with StepCensus() as c:
                loss, _ = s.train_micro(b, True, 5e-5)  # a replay
            losses[graphed, once] = loss.item()
            kind = ("captured" if graphed else "eager") + (" step with train.lora_cast_once" if once else " step")
            r.check(not c.syncs, f"{kind}: no host sync or data-dependent op ({dict(c.syncs) or 'none'})")
            if graphed:
                bound = MAX_CASTS_ONCE if once else MAX_CASTS
                r.check(c.casts <= bound, f"{kind}: {c.casts} dtype casts (at most {bound})")
        same = losses[True, True] == losses[True, False]
        r.check(same, f"train.lora_cast_once computes the same loss, bit for bit ({losses[True, True]!r})")
        s = tiny_strategy()
        s.use_graphs = True
        made = []
        graphs.new_graph = lambda pool: made.append(graphs.EagerGraph()) or made[-1]
        for width in range(4, 4 + graphs.MAX_GRAPHS + 6):
            s.train_micro(batch(width), True, 5e-5)
        r.check(len(made) <= graphs.MAX_GRAPHS, f"{len(made)} graphs for {graphs.MAX_GRAPHS + 6} batch shapes")
    packed = Packed(torch.tensor([3, 5, 2, 4]), 6, [(2, 6), (2, 4)])
    with StepCensus() as c:
        packed.pack(torch.zeros(4, 6, 3))
    r.check(not c.syncs, f"a sweep's packed batch is gathered with no host sync ({dict(c.syncs) or 'none'})")


def check_meta(r: Report) -> None:
    """gpt2-xl at batch 32: forward and backward on the meta device (shapes, no memory)."""
    cfg = load_config(None, ["model.name=gpt2-xl", "model.weights=random"])
    try:
        with torch.device("meta"):
            model = GPT2(SIZES["gpt2-xl"])
            add_trainable(model, cfg, 2)
            ids = torch.zeros(32, 64, dtype=torch.long)
            last = torch.full((32,), 40, dtype=torch.long)
            logits = model(ids, last)
            F.cross_entropy(logits.float(), torch.zeros(32, dtype=torch.long)).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        ok = logits.shape == (32, 2) and all(g is not None and g.device.type == "meta" for g in grads)
        r.check(ok, f"gpt2-xl on the meta device: logits {tuple(logits.shape)}, {len(grads)} adapter gradients")
    except Exception as e:  # noqa: BLE001
        r.check(False, f"gpt2-xl on the meta device: {type(e).__name__}: {e}")


def check_sweep_fp32(r: Report) -> None:
    """A sweep's shared base is stored in bf16 before LoRA is injected: A and B stay fp32."""
    cfg = load_config(None, ["model.name=tiny", "model.weights=random"])
    base = build_base(cfg).requires_grad_(False)
    cast_frozen(base, torch.bfloat16)  # what the sweep's job.place does on a GPU under bf16
    model = shared_copy(base)
    add_trainable(model, cfg, 2)
    dtypes = {p.dtype for m in model.modules() if isinstance(m, LoRALayer) for p in m.parameters()}
    base_dtype = model.blocks[0].att.query.linear.weight.dtype
    r.check(dtypes == {torch.float32}, f"sweep LoRA over a {base_dtype} base: A and B in {sorted(map(str, dtypes))}")


def check_flags(r: Report) -> None:
    """TF32 goes back off for a run that says train.tf32=false; gpu_dist_check.sh runs python3."""
    with fake_gpu():
        Local(load_config(None, ["train.precision=fp32"]), DistEnv(), torch.device("cuda", 0))
        Local(load_config(None, ["train.precision=fp32", "train.tf32=false"]), DistEnv(), torch.device("cuda", 0))
        tf32 = torch.backends.cuda.matmul.allow_tf32
    r.check(not tf32, "train.tf32=false after a TF32 run: TF32 is off")
    dist = (HERE / "gpu_dist_check.sh").read_text()
    r.check("PY=${PYTHON:-python3}" in dist, "gpu_dist_check.sh runs python3 (the GPU image has no `python`)")
    r.check(
        "prefer_attention_kernels" in Path(contenders.__file__).read_text().split("class Peft")[1],
        "(c) transformers + PEFT runs with the attention kernels (a) runs with (cuDNN off)",
    )


# ----------------------------------------------------------------------------------------------- the dry run


def check_dry_run(r: Report, steps: str | None = None) -> None:
    """bench/gpu_check.sh --dry-run with $OUT: its plan fits the deadline, and after every step $OUT holds the
    summary JSON and the logs, at most 8 files each under 16 MiB; the summary has the issue's fields."""
    with tempfile.TemporaryDirectory() as tmp:
        out, seen = Path(tmp) / "out", Path(tmp) / "seen"
        out.mkdir()
        hook = Path(tmp) / "hook.sh"
        hook.write_text(f'#!/bin/sh\necho "$1 $(find {out} -type f -printf "%s:%f ")" >> {seen}\n')
        hook.chmod(0o755)
        env = dict(os.environ, OUT=str(out), GPU_CHECK_ON_SHIP=str(hook))
        if steps:
            env["GPU_CHECK_STEPS"] = steps
        p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
        r.check(p.returncode == 0, f"gpu_check.sh --dry-run exits 0 (got {p.returncode}; {p.stderr[-300:]!r})")
        plan = re.search(r"plan: deadline (\d+)s; caps (.*)\(sum (\d+)s\)", p.stdout)
        if r.check(plan is not None, "gpu_check.sh prints its plan"):
            deadline, caps = int(plan.group(1)), dict(x.split("=") for x in plan.group(2).split())
            total = sum(int(v) for v in caps.values())
            r.check(deadline <= MAX_DEADLINE, f"the global deadline is {deadline}s (at most {MAX_DEADLINE}s)")
            r.check(total <= deadline, f"the steps' caps sum to {total}s, within the {deadline}s deadline")
        shipped = seen.read_text().splitlines() if seen.exists() else []
        r.check(len(shipped) >= 2, f"$OUT was filled after {len(shipped)} steps")
        for line in shipped:
            name, *files = line.split()
            sizes = {f.split(":", 1)[1]: int(f.split(":", 1)[0]) for f in files}
            ok = (
                len(sizes) <= MAX_FILES
                and all(v < MAX_BYTES for v in sizes.values())
                and any(k.endswith(".json") for k in sizes)
                and any(k.endswith("-logs.tar.gz") for k in sizes)
            )
            r.check(ok, f"after {name}: $OUT holds {sorted(sizes.items())}")
        found = list(out.glob("*.json"))
        if r.check(len(found) == 1, "one summary JSON came back"):
            import json

            doc = json.loads(found[0].read_text())
            missing = [k for k in FIELDS if k not in doc]
            r.check(not missing, f"the summary has {', '.join(FIELDS)} (missing: {missing or 'none'})")
            bad = {k: v for k, v in doc.get("status", {}).items() if v != 0}
            r.check(not bad, f"every step exited 0 ({bad or 'all'})")
            unwarmed = {k: v for k, v in doc.get("timed_steps_unwarmed", {}).items() if v != 0}
            r.check(
                "timed_steps_unwarmed" in doc and not unwarmed,
                f"no timed step of an unwarmed shape ({doc.get('timed_steps_unwarmed')})",
            )
            r.check(not doc.get("failed_to_build"), f"every contender was built ({doc.get('failed_to_build')})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run bench/gpu_check.sh --dry-run too")
    ap.add_argument("--steps", help="GPU_CHECK_STEPS for the dry run (default: all)")
    args = ap.parse_args(argv)
    r = Report()
    check_contenders(r)
    check_step(r)
    check_meta(r)
    check_sweep_fp32(r)
    check_flags(r)
    if args.dry_run:
        check_dry_run(r, args.steps)
    print(f"{len(r.failed)} failed" if r.failed else "pre-flight: every check passed")
    return len(r.failed)


if __name__ == "__main__":
    sys.exit(main())
