"""Where and how the model runs, for training and inference alike: rank, device, precision, process group.

    python -c "from lora_dist.device import pick_device, resolve_precision as r; d = pick_device('auto'); print(d, r('auto', d))"

`DistEnv` is what the launcher (torchrun, deepspeed, Slurm through launcher/launch.py) says about this
process; `pick_device` turns `auto`/`cuda`/`cpu` into a device for its local rank; `resolve_precision` turns
`auto` into bf16 where the hardware runs it natively and fp32 elsewhere; `autocast` runs a forward pass in
that precision; `precision_note` is the line inference prints when it computes below fp32;
`init_process_group` joins the job's process group (gloo on the CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import PRECISIONS
from .errors import UserError

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def pick_device(name: str | torch.device = "auto", local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`auto` (this rank's GPU, else MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but no CUDA device is visible; use {key}=auto or cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "cuda" and dev.index >= (n := torch.cuda.device_count()):
        raise UserError(
            f"{key}={name} but this machine has {n} CUDA device{'s' if n != 1 else ''} (cuda:0 to cuda:{n - 1}); "
            f"use one of them, or {key}=auto"
        )
    return dev


THREADS_ENV = "LORA_DIST_THREADS"  # auto (the default) | torch | a number


def cpu_threads(
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    load: float | None = None,
    default: int | None = None,
) -> tuple[int | None, str]:
    """(torch threads for the CPU's work, or None to leave torch's choice; why). torch takes every core for its
    threads, and where other processes keep the cores busy those threads wait on each other at every parallel
    region: on a shared 2-core machine the smoke config trained 4-20x slower with torch's 2 threads than with 1
    (bench/results/threads-*.json). So, unless $LORA_DIST_THREADS or $OMP_NUM_THREADS says otherwise: torch's
    count, capped by the cores the load average leaves free (at least 1)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    want = env.get(THREADS_ENV, "auto").strip().lower() or "auto"
    if want == "torch":
        return None, f"{THREADS_ENV}=torch"
    if want != "auto":
        if not want.isdigit() or not 1 <= int(want) <= 4096:
            raise UserError(f"{THREADS_ENV}={want!r} must be auto, torch or a number of threads from 1 to 4096")
        return int(want), f"{THREADS_ENV}={want}"
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    default = default or torch.get_num_threads()
    free = max(1, int(cores - load + 0.5))
    n = min(default, free)
    return n, f"{n} of {default}: load average {load:.1f} on {cores} cores" if n < default else f"{n}, torch's own"


def set_cpu_threads(environ: Mapping[str, str] | None = None) -> int:
    """Apply `cpu_threads` (once a process, before the first parallel region); returns torch's thread count."""
    n, _ = cpu_threads(environ)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_threads_text(device: torch.device) -> str:
    """ " (N threads)" for the CPU, the run's first line says how many torch uses; "" elsewhere."""
    n = torch.get_num_threads()
    return f" ({n} thread{'' if n == 1 else 's'})" if device.type == "cpu" else ""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16), where they run at about
    twice the fp32 rate. Elsewhere bf16 on the CPU is emulated and no faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False  # not Linux: no cheap way to tell, so take fp32
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 or newer (A100, A10, L4/L40, H100, B200): bf16 tensor cores. Older GPUs
    (V100 7.0, T4 7.5) only emulate bf16, which `torch.cuda.is_bf16_supported()` counts as support. Asked of
    `device` itself, after `set_device`, so that no rank creates a context on cuda:0."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(
    precision: str, device: torch.device, key: str = "train.precision", *, cpu_bf16: bool = True
) -> str:
    """`auto` -> bf16 where the hardware runs it natively (CUDA compute capability >= 8.0, CPUs with
    AVX512-BF16/AMX), fp32 elsewhere (MPS, V100/T4 and older CPUs, and on the CPU where `cpu_bf16` is false: a
    backend that applies its own mixed precision, DeepSpeed, whose bf16 is for GPUs). Other values are kept,
    once checked: fp16 needs a GPU. `key` names the setting in the error."""
    if precision not in PRECISIONS:
        raise UserError(f"{key} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{key}=fp16 needs a GPU; use bf16 or fp32 on the {device.type.upper()}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp32"
    if device.type == "cpu" and cpu_bf16:
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def use_tf32(device: torch.device, precision: str, wanted: bool) -> bool:
    """TF32 tensor cores for fp32 matmuls and convolutions (A100 and newer): about 8x the fp32 rate at a 10-bit
    mantissa, which LoRA fine-tuning does not notice; on CUDA in fp32, unless train.tf32=false."""
    return device.type == "cuda" and precision == "fp32" and wanted


def set_tf32(on: bool) -> tuple[bool, bool]:
    """Turn TF32 matmuls and convolutions on or off, process-wide; returns what they were, for `restore_tf32`."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    return before


def restore_tf32(before: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def storage_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype a training run stores its frozen Linear weights in, or None to keep fp32: on a GPU under
    bf16/fp16 autocast, that dtype (autocast would round them to it at every use anyway: the same numbers,
    half the memory, no casts). The CPU keeps fp32 storage (frozen_linear packs bf16 copies itself)."""
    return AMP_DTYPES[precision] if device.type == "cuda" else None


def model_build_device(device: torch.device) -> torch.device:
    """Where a training run builds its model: on the GPU it trains on (no slow CPU initialisation of weights
    that are overwritten anyway), else on the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def default_pad_multiple(device_type: str, few_shapes: bool = True) -> int:
    """What `padding: batch` rounds a batch's length up to when `data.pad_multiple` is unset: 64 on CUDA where few
    shapes pay (`few_shapes`: the step is a CUDA graph per shape, or compiled; attention kernels and graphs are
    built once per shape), 1 elsewhere (on the CPU, or eager CUDA steps under DDP, DeepSpeed or activation
    checkpointing: every token costs there)."""
    return 64 if device_type == "cuda" and few_shapes else 1


def attention_in_fp32(q: torch.Tensor) -> bool:
    """Whether attention over `q` computes in fp32: on the CPU for bf16 inputs, whose flash-attention backward
    is several times slower than fp32's there (and less accurate)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


KERNEL_CACHE = 64  # oneDNN kernels kept per cache in inference processes (oneDNN's default: 1,024)


def bound_kernel_caches() -> None:
    """Inference on the CPU: keep at most KERNEL_CACHE oneDNN kernels in each of its caches (its primitive
    cache, and ideep's behind the packed Linear layers of `frozen_linear`). A packed inference batch
    (`model.Packed`) has a shape of its own, and each shape's kernel holds memory, so with the defaults a
    long `classify --file` grew ~100 MB a round of 4,096 messages until 1,024 shapes were held (1,227 MB at
    60,000 lines, tiny model; 545 MB bounded, and the same speed: a new shape misses either way). oneDNN reads
    these at its first kernel, so call this before the first forward pass; a user's own setting stays."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(KERNEL_CACHE))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(KERNEL_CACHE))


def autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager[Any]:
    """The context a forward pass runs in: autocast to bf16/fp16, or nothing for fp32. `cache=False` for a pass
    captured in a CUDA graph (autocast's cache of cast weights must not outlive the capture)."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def prefer_attention_kernels(device: torch.device) -> None:
    """On CUDA, scaled-dot-product attention without the cuDNN backend: PyTorch builds a cuDNN graph for each new
    sequence length (8-9 ms of host time each, measured on an H200 with torch 2.11), while the flash and
    memory-efficient kernels need nothing built. Process-wide; nothing to do on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def precision_note(requested: str, resolved: str, device: torch.device, flag: str = "--precision") -> str | None:
    """The one stderr line of `classify`, `eval` and `serve` when they compute in less than fp32, else None.

    Inference defaults to fp32, as transformers computes GPT-2, and so as both exports answer; bf16 is faster where
    the hardware has it natively, and moves probabilities (on the SMS test split: 2e-4 at the median, up to 1e-2)."""
    if resolved == "fp32":
        return None
    chose = f", which chose {resolved} on this {device.type.upper()}" if requested == "auto" else ""
    return (
        f"note: computing in {resolved} ({flag} {requested}{chose}): faster, but probabilities differ from fp32's "
        f"(the default, and what transformers and the exports compute) by up to about 1e-2"
    )


def init_process_group(
    device: torch.device, timeout_s: float, backend: str = "auto", env: DistEnv | None = None
) -> tuple[str, list[str]]:
    """Join the job's process group (nccl on CUDA, gloo on the CPU, unless `backend` says). A plain process
    (no launcher) becomes a world of one, set up as torchrun would. Returns (backend, the environment
    variables set here, for `leave_process_group`)."""
    env = env or DistEnv.from_environ()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs a CUDA GPU on every rank; use dist.backend=gloo (or auto) on CPU")
    if env.world_size > 1 and "MASTER_ADDR" not in os.environ:
        raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun or launcher/launch.py")
    added: list[str] = []
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            added = _world_of_one_env()
        dist.init_process_group(
            backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return backend, added


def leave_process_group(added: Sequence[str] = (), barrier: bool = True) -> None:
    """Tear the group down (after a barrier, so no rank leaves while others still talk), and unset what
    `init_process_group` set."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    for key in added:
        os.environ.pop(key, None)


def _world_of_one_env() -> list[str]:
    """The environment torchrun gives a single worker (rank 0 of 1, a free port on the loopback); returns
    the keys it set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wanted = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    return added
