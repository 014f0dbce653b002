"""`lora-dist serve`: many adapters over one frozen base, behind HTTP, with dynamic batching.

    lora-dist serve --adapters spam=runs/a,support=runs/b                   # http://127.0.0.1:8000/
    lora-dist serve --adapters-dir runs/sweep --max-loaded 64               # every adapter under runs/sweep
    LORA_DIST_TOKEN=secret lora-dist serve --adapters spam=runs/a --host 0.0.0.0 --port 8000

Adapters come from the command line only (no request can name a path); they are read and checked before
the port opens. With --adapters-dir only their descriptions are read at start: each adapter's tensors are read
when first asked for, at most --max-loaded stay on the device (least recently used evicted), and SIGHUP or
POST /v1/adapters/reload scans the directory again (infer/adapter_store.py). The model is built in the
background: GET /healthz answers at once, GET /readyz once the model is loaded and warmed up. SIGTERM (or
Ctrl-C) stops accepting connections, finishes the requests in flight and exits 0, within --shutdown-timeout-s.
With --token-file (or LORA_DIST_TOKEN), every /v1/ request and /metrics (unless --open-metrics) need
`Authorization: Bearer TOKEN`; the token is never printed. A client gets --read-timeout-s to send its
request, at most --max-connections are open and --max-queue requests wait (serve/server.py, serve/app.py).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..device import PRECISIONS, pick_device
from ..errors import UserError
from ..infer.adapter_store import Catalog
from ..infer.multi_adapter import Loaded, read_adapters
from .server import guarded_protocol, server_class

if TYPE_CHECKING:  # imported in `main`, once the [serve] extra is known to be there
    from .app import Service

# flag -> (smallest, largest) value; every numeric flag is checked (a NaN or inf is refused too)
BOUNDS = {
    "--port": (0, 65535),
    "--max-batch": (1, 1 << 20),
    "--max-wait-ms": (0, 600_000),
    "--max-texts": (1, 1 << 20),
    "--max-chars": (1, 1 << 30),
    "--max-body-bytes": (1, 1 << 40),
    "--threads": (1, 1024),
    "--read-timeout-s": (0.001, 86_400),
    "--max-connections": (1, 1 << 20),
    "--max-queue": (1, 1 << 20),
    "--max-loaded": (1, 1 << 16),
    "--max-adapter-memory": (1, 1 << 50),
    "--shutdown-timeout-s": (0, 86_400),
}
FILES_BESIDE_CONNECTIONS = 128  # file descriptors the process needs besides its connections (model, libraries)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", help="NAME=PATH[,NAME=PATH...]: runs or adapter directories of one base")
    p.add_argument(
        "--adapters-dir",
        help="serve every run or adapter directory under DIR (a sweep's output_dir), named by its path relative "
        "to DIR, read on demand; SIGHUP or POST /v1/adapters/reload finds new ones",
    )
    p.add_argument(
        "--max-loaded", type=int, default=64, help="with --adapters-dir: adapters resident on the device (default: 64)"
    )
    p.add_argument(
        "--max-adapter-memory",
        type=int,
        help="with --adapters-dir: bytes of device memory for resident adapters (fewer slots if they hold fewer)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000; 0: any free port, logged)")
    p.add_argument("--base", help="a directory holding the adapters' base weights, if not where training found them")
    p.add_argument(
        "--labels",
        action="append",
        metavar="NAME=LABELS",
        help="names for the classes of an adapter that has none (LABEL_0, LABEL_1, ...): NAME=ham,spam, once per "
        "adapter; LABELS alone names them for every such adapter",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="(default: fp32)")
    p.add_argument("--max-batch", type=int, default=32, help="messages per forward pass (default: 32; 1: no batching)")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default: 5)"
    )
    p.add_argument("--max-texts", type=int, default=64, help="messages per request (default: 64)")
    p.add_argument("--max-chars", type=int, default=4000, help="characters per message (default: 4000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bytes per request body (default: 1 MiB)")
    p.add_argument("--token-file", help="a file holding the bearer token (else $LORA_DIST_TOKEN; neither: no auth)")
    p.add_argument("--open-metrics", action="store_true", help="with a token, let /metrics answer without it")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the model (default: $LORA_DIST_THREADS, else the cores the load leaves free)",
    )
    p.add_argument(
        "--read-timeout-s",
        type=float,
        default=30.0,
        help="seconds a client has to send a request, headers and body; then 408 and closed (default: 30)",
    )
    p.add_argument(
        "--max-connections", type=int, default=1000, help="open connections; more get 503 and closed (default: 1000)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=512,
        help="requests waiting for the model; more get 503 (default: 512, as TEI's --max-concurrent-requests)",
    )
    p.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=20.0,
        help="at SIGTERM, how long the requests in flight may take before the service exits anyway (default: 20)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (client, method, path, status, time)")


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag within its bounds (BOUNDS), and finite."""
    for flag, (lo, hi) in BOUNDS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is None:
            continue
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, from {lo} to {hi}; got {value}")
        if value < lo or value > hi:
            raise UserError(f"{flag} must be {f'>= {lo}' if value < lo else f'<= {hi}'}; got {value}")


def parse_adapters(text: str) -> dict[str, str | Path]:
    """{name: path} from --adapters NAME=PATH[,NAME=PATH...], or a UserError saying what is wrong."""
    out: dict[str, str | Path] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapters item {item!r} is not NAME=PATH, e.g. spam=runs/smoke")
        if name in out:
            raise UserError(f"adapter name {name!r} is given twice in --adapters")
        out[name] = path
    if not out:
        raise UserError("--adapters names no adapter; e.g. --adapters spam=runs/a,support=runs/b")
    return out


def parse_labels(items: list[str] | None, adapters: dict[str, str | Path]) -> dict[str, str]:
    """{adapter: labels} from --labels NAME=ham,spam (one adapter) and --labels ham,spam (key "*": every adapter
    that names no classes of its own, see `read_adapters`)."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, labels = item.partition("=")
        if sep and name.strip() in adapters:
            out[name.strip()] = labels
        elif sep:
            raise UserError(
                f"--labels {item!r}: {name!r} is not among the adapters ({', '.join(adapters)}); "
                f"give NAME=LABELS, e.g. --labels {next(iter(adapters))}=ham,spam"
            )
        else:
            out["*"] = item
    return out


def read_token(token_file: str | None) -> str | None:
    """The bearer token: printable ASCII (an HTTP header carries no other text reliably), else a UserError."""
    token: str | None
    if token_file:
        try:
            token = Path(token_file).read_bytes().decode("utf-8", "replace").strip()
        except OSError as e:
            raise UserError(f"--token-file {token_file} cannot be read ({e.strerror})") from e
        if not token:
            raise UserError(f"--token-file {token_file} is empty; put the token in it")
        where = f"--token-file {token_file}"
    else:
        token = os.environ.get("LORA_DIST_TOKEN", "").strip() or None
        where = "LORA_DIST_TOKEN"
    if token is not None and not (token.isascii() and token.isprintable()):
        raise UserError(
            f"{where} holds characters other than printable ASCII, which no Authorization header can match; "
            f"use a token of letters, digits and -._~+/= (e.g. from: openssl rand -base64 32)"
        )
    return token


def raise_file_limit(connections: int) -> None:
    """Room for `connections` open sockets: the soft limit on file descriptors raised toward the hard one, or a
    UserError saying what to lower."""
    need = connections + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard == resource.RLIM_INFINITY or hard >= need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        else:
            raise UserError(
                f"--max-connections {connections} needs {need} file descriptors, but this process may open "
                f"{hard} (ulimit -Hn); lower --max-connections to {max(1, hard - FILES_BESIDE_CONNECTIONS)} or "
                f"raise the limit"
            )


def log(msg: str) -> None:
    """The service's log: a line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """`lora-dist serve`: check the flags, read the adapters, serve until SIGTERM; 0 once stopped."""
    try:
        import uvicorn

        from .app import Limits, Service, create_app
    except ImportError as e:
        raise UserError(f"serve needs the [serve] extra ({e.name} is missing): pip install 'lora-dist[serve]'") from e

    check_numbers(args)
    pick_device(args.device, key="--device")  # a device that is not there is refused before the port opens
    token = read_token(args.token_file)
    loaded, catalog = read_served(args)
    raise_file_limit(args.max_connections)
    if args.threads:
        torch.set_num_threads(args.threads)
    service = Service(
        loaded,
        base=args.base,
        device=args.device,
        precision=args.precision,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        limits=Limits(args.max_texts, args.max_chars, args.max_body_bytes),
        token=token,
        log=log,
        max_queue=args.max_queue,
        open_metrics=args.open_metrics,
        access_log=args.access_log,
        shutdown_timeout_s=args.shutdown_timeout_s,
        catalog=catalog,
        max_loaded=args.max_loaded,
        max_adapter_memory=args.max_adapter_memory,
    )
    config = uvicorn.Config(
        create_app(service),
        host=args.host,
        port=args.port,
        http=guarded_protocol(args.read_timeout_s, args.max_connections, service.metrics),
        log_level="warning",
        access_log=False,  # --access-log is lora-dist's own (serve/middleware.py): uvicorn's is at info level
        timeout_graceful_shutdown=args.shutdown_timeout_s,
    )
    server = server_class()(config, banner(args, service), service.log, service.stopping)
    # uvicorn re-raises the signal that stopped it once it is done; a handler that ignores it makes the
    # exit after a graceful SIGTERM a clean 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if catalog is not None:  # SIGHUP: scan --adapters-dir again, on the serving loop
        signal.signal(signal.SIGHUP, lambda *_: service.reload_soon())
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when it cannot bind (it logged the reason)
        pass
    if not server.started:
        raise UserError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    if not service.stopped_cleanly:  # a forward pass still runs past --shutdown-timeout-s: leave without it
        service.log(f"stopped after --shutdown-timeout-s {args.shutdown_timeout_s:g} with a forward pass still running")
        sys.stderr.flush()
        os._exit(0)
    service.log("stopped")
    return 0


def read_served(args: argparse.Namespace) -> tuple[list[Loaded], Catalog | None]:
    """The adapters to serve, read and checked before the port opens: --adapters' (tensors and all), or
    --adapters-dir's catalog (descriptions only: no tensor is read before a request asks for it)."""
    if args.adapters_dir:
        if args.labels:
            raise UserError("--labels names the classes of adapters given with --adapters, not of --adapters-dir's")
        named = parse_adapters(args.adapters) if args.adapters else {}
        catalog = Catalog(Path(args.adapters_dir), {k: Path(v) for k, v in named.items()}, args.base)
        catalog.log = log
        t0 = time.perf_counter()
        catalog.scan()
        log(
            f"adapters: {len(catalog.entries)} found under {args.adapters_dir} in {time.perf_counter() - t0:.1f} s "
            f"(descriptions only)"
        )
        if not catalog.entries:
            raise UserError(
                f"--adapters-dir {args.adapters_dir} holds no usable adapter (see above); point at a sweep's or a "
                f"run's output directory"
            )
        return [], catalog
    if args.adapters:
        adapters = parse_adapters(args.adapters)
        return read_adapters(adapters, args.base, parse_labels(args.labels, adapters)), None
    raise UserError("name the adapters: --adapters NAME=PATH,... or --adapters-dir DIR (a sweep's output)")


def banner(args: argparse.Namespace, service: Service) -> str:
    """What the log's `serving ...` line says after the address: the adapters, batching and auth."""
    names = list(service.specs)
    which = ", ".join(names) if len(names) <= 10 else f"{len(names)} adapters"
    auth = "on" if service.token else "off"
    return (
        f"{which} on {{url}} (max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, "
        f"auth {auth}{', open metrics' if service.token and args.open_metrics else ''})"
    )
