"""What the serving benchmarks share: a free port, and one classify request on a kept-alive connection, in
raw HTTP/1.1 (no client library: its own cost would be part of every latency).

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status, headers, body = await classify_once(reader, writer, "spam", "see you at 6")
    proc, port, ready_s = serve(["--adapters-dir", "runs/sweep"], threads=2, log=Path("serve.log"))
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def classify_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, adapter: str, text: str
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """POST /v1/classify of one message: (status code, headers by lower-case name, body)."""
    body = json.dumps({"adapter": adapter, "texts": [text]}).encode()
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    status = (await reader.readline()).split(b" ")[1]
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, await reader.readexactly(int(headers.get(b"content-length", b"0")))


def serve(args: list[str], threads: int, log: Path, poll_s: float = 0.1) -> tuple[subprocess.Popen, int, float]:
    """`lora-dist serve ARGS` from this checkout on a free port, its log in `log`: (process, port, seconds from
    its start to a 200 from /readyz). Exits with the log's tail if the service stops first."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lora_dist", "serve", *args, "--port", str(port), "--threads", str(threads)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=log.open("w"))
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return proc, port, time.perf_counter() - t
        except OSError:
            time.sleep(poll_s)
    raise SystemExit("the service did not get ready in 10 minutes")
