#!/usr/bin/env python3
"""Turn "N processes on each of M nodes" into the right torchrun or deepspeed command, and run it.

    python launcher/launch.py -- train --config configs/smoke.yaml                       # 1 proc (CPU) or 1/GPU
    python launcher/launch.py --nproc-per-node 8 -- train --config configs/gpt2-small-lora.yaml
    python launcher/launch.py --nnodes 2 --node-rank 0 --rdzv-endpoint node1:29500 -- train --config ...
    python launcher/launch.py --launcher deepspeed --nproc-per-node 8 -- train --config ... dist.strategy=deepspeed
    python launcher/launch.py --dry-run -- train --config configs/smoke.yaml             # print, don't run

Unset options come from the environment: Slurm (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID,
SLURM_GPUS_ON_NODE), or NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT as Kubernetes operators set them.
Multi-node runs use torchrun's c10d rendezvous, with each node's own address as --local-addr (under Slurm
its NodeAddr), which the workers take as MASTER_ADDR. Each worker gets OMP_NUM_THREADS = this machine's cores
over the workers sharing it (every node's when the endpoint is 127.0.0.1), unless OMP_NUM_THREADS is set.
`--launcher deepspeed` keeps to CUDA_VISIBLE_DEVICES (--include localhost:2,3). SIGUSR1 or SIGTERM sent to this
script is passed to the training workers as SIGUSR1: they save a checkpoint at the next step and exit 0 (Slurm
preemption).
Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_PORT = 29500


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").split("(")[0]  # SLURM_TASKS_PER_NODE may read "4(x2)"
        if value.strip().isdigit():
            return int(value)
    return None


def _gpu_count() -> int:
    n = _env_int("SLURM_GPUS_ON_NODE")
    if n is not None:
        return n
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 0


def _slurm_node_addr() -> str | None:
    """This node's NodeAddr under Slurm (what slurmd listens on; its name need not resolve), else None."""
    name = os.environ.get("SLURMD_NODENAME")
    if not name:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    addr = next((w.split("=", 1)[1] for w in out.split() if w.startswith("NodeAddr=")), "")
    return addr or None


def _deepspeed_gpus(nproc: int) -> list[str]:
    """deepspeed's runner starts `--num_gpus N` on GPUs 0..N-1 and resets CUDA_VISIBLE_DEVICES to them, so
    GPUs that Slurm or the user set aside are named by id instead: --include localhost:2,3."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible or visible == ["-1"]:
        return ["--num_gpus", str(nproc)]
    if not all(d.isdigit() for d in visible):
        raise SystemExit(
            f"launch.py: error: CUDA_VISIBLE_DEVICES={','.join(visible)} names GPUs by UUID, which "
            "deepspeed's --include cannot take; give indices (e.g. 0,1) or use --launcher torchrun"
        )
    if nproc > len(visible):
        raise SystemExit(
            f"launch.py: error: {nproc} processes per node but CUDA_VISIBLE_DEVICES shows "
            f"{len(visible)} GPU(s) ({','.join(visible)}); use --nproc-per-node {len(visible)}"
        )
    return ["--include", "localhost:" + ",".join(visible[:nproc])]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        ours, rest = argv[:i], argv[i + 1 :]
    else:
        ours, rest = argv, []
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--nproc-per-node", type=int, default=None, help="default: GPUs on this node, or 1 on CPU")
    p.add_argument("--nnodes", type=int, default=None, help="default: SLURM_NNODES / NNODES, else 1")
    p.add_argument("--node-rank", type=int, default=None, help="default: SLURM_NODEID / NODE_RANK, else 0")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the first node (multi-node)")
    p.add_argument("--rdzv-id", default=None, help="default: SLURM_JOB_ID, else 'lora-dist'")
    p.add_argument(
        "--local-addr",
        default=None,
        help="this node's address as the other nodes reach it (multi-node); default: under Slurm the "
        "node's NodeAddr, else torchrun's guess, this host's FQDN, which must resolve everywhere",
    )
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts the whole group this often")
    p.add_argument("--python", default=sys.executable, help="the Python that runs torchrun/deepspeed")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = p.parse_args(ours)
    if not rest:
        p.error("give the lora-dist command after --, e.g. -- train --config configs/smoke.yaml")
    return args, rest


def layout(args: argparse.Namespace) -> tuple[int, int, int, str | None]:
    """(nodes, this node's rank, processes per node, the rendezvous endpoint or None), from flags or environment."""
    nnodes = args.nnodes or _env_int("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "NNODES") or 1
    node_rank = args.node_rank if args.node_rank is not None else (_env_int("SLURM_NODEID", "NODE_RANK") or 0)
    nproc = args.nproc_per_node or _gpu_count() or 1
    if nnodes < 1 or nproc < 1 or not 0 <= node_rank < nnodes:
        raise SystemExit(
            f"launch.py: error: impossible layout: {nnodes} node(s), {nproc} process(es) per node, node rank {node_rank}"
        )
    endpoint = args.rdzv_endpoint
    if endpoint is None and os.environ.get("MASTER_ADDR"):
        endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', DEFAULT_PORT)}"
    if nnodes > 1 and endpoint is None:
        raise SystemExit(
            "launch.py: error: several nodes need --rdzv-endpoint HOST:PORT (the first node), or MASTER_ADDR"
        )
    return nnodes, node_rank, nproc, endpoint


def omp_threads(args: argparse.Namespace, cores: int) -> int:
    """OpenMP threads for each worker: this machine's cores over the workers that share them. With a rendezvous
    endpoint on the loopback (127.x, localhost, ::1) every node's workers run here. torchrun itself would give
    each worker 1 thread when there are several, and leave a lone worker all the cores, so that two "nodes" on
    one machine each take every core and fight over them."""
    nnodes, _, nproc, endpoint = layout(args)
    host = endpoint.rsplit(":", 1)[0].strip("[]").lower() if endpoint else ""
    here = nnodes if host.startswith("127.") or host in ("localhost", "::1") else 1
    return max(1, cores // (nproc * here))


def build_command(args: argparse.Namespace, rest: list[str]) -> list[str]:
    nnodes, node_rank, nproc, endpoint = layout(args)
    run_id = args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "lora-dist"
    if args.launcher == "deepspeed":
        if nnodes > 1:
            raise SystemExit(
                "launch.py: error: for several nodes use the torchrun launcher with dist.strategy=deepspeed "
                "(deepspeed's own multi-node launcher needs pdsh and a hostfile)"
            )
        port = endpoint.rsplit(":", 1)[1] if endpoint else str(DEFAULT_PORT)
        return [
            args.python,
            "-m",
            "deepspeed.launcher.runner",
            *_deepspeed_gpus(nproc),
            "--master_port",
            port,
            "--module",
            "lora_dist",
            *rest,
        ]
    cmd = [
        args.python,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={args.max_restarts}",
    ]
    if nnodes == 1 and endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}",
        ]
        # The agent that hosts the workers' store advertises this address as MASTER_ADDR; without it,
        # its FQDN, and where node names do not resolve, init_process_group then hangs on every worker.
        local_addr = args.local_addr or (_slurm_node_addr() if nnodes > 1 else None)
        if local_addr:
            cmd.append(f"--local-addr={local_addr}")
    return cmd + ["-m", "lora_dist", *rest]


# ------------------------------------------------------------------------------- signal forwarding


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _has_local_rank(pid: int) -> bool:
    try:
        return b"\0LOCAL_RANK=" in b"\0" + (Path("/proc") / str(pid) / "environ").read_bytes()
    except OSError:
        return False


def training_workers(root: int) -> list[int]:
    """The launcher's worker processes: descendants with LOCAL_RANK whose parent has none (so neither
    torchrun's agent nor a DataLoader worker)."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if _has_local_rank(pid) and not _has_local_rank(parents.get(pid, 0)):
            found.append(pid)
        else:
            stack += children.get(pid, [])
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    cmd = build_command(args, rest)
    env = dict(os.environ)
    # Threads per worker, unless OMP_NUM_THREADS says: the cores shared out (omp_threads).
    env.setdefault("OMP_NUM_THREADS", str(omp_threads(args, len(os.sched_getaffinity(0)))))
    print("launch.py:", f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    # With restarts, torchrun's shared rendezvous store can hand a new round the previous round's
    # addresses (pytorch/pytorch#135712); each round then gets a store of its own.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun dies of SIGUSR1 (its default action), so it starts with SIGUSR1 ignored: a USR1 sent to
    # every process of a job (scancel --signal=USR1 JOBID) reaches the workers, whose handler overrides it.
    child = subprocess.Popen(cmd, env=env, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    forwarded = []

    def forward(signum, frame):
        workers = training_workers(child.pid)
        forwarded.append(signum)
        print(
            f"launch.py: got {signal.Signals(signum).name}; asking {len(workers)} worker(s) to checkpoint and stop",
            flush=True,
        )
        if workers:
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        else:  # not started yet: stop the launcher itself
            child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)


if __name__ == "__main__":
    raise SystemExit(main())
