"""`lora-dist serve`: many adapters over one frozen base, behind HTTP, with dynamic batching.

    lora-dist serve --adapters spam=runs/a,support=runs/b                   # http://127.0.0.1:8000/
    LORA_DIST_TOKEN=secret lora-dist serve --adapters spam=runs/a --host 0.0.0.0 --port 8000

Adapters come from the command line only (no request can name a path); they are read and checked before
the port opens, and the model is built in the background: GET /healthz answers at once, GET /readyz once
the model is loaded. SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight and
exits 0. With --token-file (or LORA_DIST_TOKEN), every /v1/ request needs `Authorization: Bearer TOKEN`;
the token is never printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..infer.multi_adapter import read_adapters


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapters", required=True, help="NAME=PATH[,NAME=PATH...]: runs or adapter directories of one base"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--base", help="a directory holding the adapters' base weights, if not where training found them")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"), help="(default: fp32)")
    p.add_argument("--max-batch", type=int, default=32, help="messages per forward pass (default: 32; 1: no batching)")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default: 5)"
    )
    p.add_argument("--max-texts", type=int, default=64, help="messages per request (default: 64)")
    p.add_argument("--max-chars", type=int, default=4000, help="characters per message (default: 4000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bytes per request body (default: 1 MiB)")
    p.add_argument("--token-file", help="a file holding the bearer token (else $LORA_DIST_TOKEN; neither: no auth)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    p.add_argument("--access-log", action="store_true", help="log every request (method, path, status)")


def parse_adapters(text: str) -> dict[str, str | Path]:
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


def read_token(token_file: str | None) -> str | None:
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise UserError(f"--token-file {token_file} cannot be read ({e.strerror})") from e
        if not token:
            raise UserError(f"--token-file {token_file} is empty; put the token in it")
        return token
    return os.environ.get("LORA_DIST_TOKEN", "").strip() or None


def main(args) -> int:
    try:
        import uvicorn

        from .app import Limits, Service, create_app
    except ImportError as e:
        raise UserError(f"serve needs the [serve] extra ({e.name} is missing): pip install 'lora-dist[serve]'") from e

    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-texts", args.max_texts),
        ("--max-chars", args.max_chars),
        ("--max-body-bytes", args.max_body_bytes),
    ):
        if value < 1:
            raise UserError(f"{flag} must be >= 1; got {value}")
    if args.max_wait_ms < 0:
        raise UserError(f"--max-wait-ms must be >= 0; got {args.max_wait_ms}")
    token = read_token(args.token_file)
    loaded = read_adapters(parse_adapters(args.adapters))
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
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
    )
    config = uvicorn.Config(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=args.access_log,
        timeout_graceful_shutdown=None,
    )
    server = Server(config, service)
    log(
        f"serving {', '.join(service.specs)} on http://{args.host}:{args.port}/ "
        f"(max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, auth {'on' if token else 'off'})"
    )
    # uvicorn re-raises the signal that stopped it once it is done; a handler that ignores it makes the
    # exit after a graceful SIGTERM a clean 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        raise UserError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    log("stopped")
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; at SIGTERM the batcher stops waiting for more requests, so in-flight ones finish."""

        def __init__(self, config, service):
            super().__init__(config)
            self.service = service

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self.service.batcher.flush()

    return Server


def Server(config, service):  # noqa: N802  (uvicorn is imported only when serving)
    return _server_class()(config, service)
