"""The HTTP server of `lora-dist serve`: uvicorn's, guarded against slow and surplus clients, stopped in bounded time.

    lora-dist serve --adapters spam=runs/smoke --read-timeout-s 30 --max-connections 1000 --shutdown-timeout-s 20

uvicorn waits for a request's headers and body for as long as its client takes, and accepts connections until
the process runs out of file descriptors. Each connection's protocol (uvicorn's own, httptools' or h11's) gets
here, as nginx's client_header_timeout / client_body_timeout and worker_connections give it:
- a read deadline: a request (headers and body) must arrive within --read-timeout-s of its first byte (or of the
  connection's opening); one that does not is answered 408 and its connection closed;
- a cap: a connection past --max-connections is answered 503 (Retry-After: 1) at once and closed;
- at shutdown, a connection still reading a request is closed at once: nothing of it is in flight.
SIGTERM stops accepting connections and finishes the requests in flight, within --shutdown-timeout-s; the
address logged is the one bound (with --port 0, the port the system picked).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the [serve] extra's modules are imported only when serving
    from .metrics import Metrics

STATUS = {408: b"408 Request Timeout", 503: b"503 Service Unavailable"}
READ_TIMEOUT = "lora_dist.read_timeout"  # set in a request's scope["state"] when the deadline cut it off


def raw_answer(transport: asyncio.Transport, status: int, message: str, headers: bytes = b"") -> None:
    """An answer written straight to a connection, then closed (no request was handed to the app)."""
    body = b'{"error": "' + message.encode() + b'"}'
    transport.write(
        b"HTTP/1.1 " + STATUS[status] + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n" + headers + b"\r\n" + body
    )
    transport.close()


def guarded_protocol(read_timeout: float, max_connections: int, metrics: Metrics) -> type:
    """uvicorn's HTTP protocol class with a read deadline per request and a cap on open connections. The
    request's state comes from uvicorn's `cycle` (None before the first request; `more_body` while its body is
    arriving; `response_complete` once answered), which its httptools and h11 protocols both keep."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol  # httptools' protocol where installed, else h11's: chosen at import

    class Guarded(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.deadline: asyncio.TimerHandle | None = None
            self.armed_for = None
            metrics.connections.inc()
            if len(self.connections) > max_connections:
                metrics.dropped.labels("too_many").inc()
                why = f"the service holds {max_connections} connections (--max-connections); retry shortly"
                return raw_answer(transport, 503, why, b"retry-after: 1\r\n")
            self.arm()

        def connection_lost(self, exc) -> None:
            metrics.connections.dec()
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.state() == "headers" and self.armed_for is not self.cycle:
                self.arm()  # the first bytes of a new request
            super().data_received(data)

        def state(self) -> str:
            """headers: reading a request's headers, or idle between requests; body: reading its body; app:
            read, and being answered."""
            c = self.cycle
            if c is None or c.response_complete:
                return "headers"
            return "body" if c.more_body else "app"

        def arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.armed_for = self.cycle
            self.deadline = self.loop.call_later(read_timeout, self.expire)

        def expire(self) -> None:
            """The read deadline passed: close the connection unless its request was read in time."""
            self.deadline = None
            state = self.state()
            if (
                self.transport.is_closing()
                or state == "app"
                or (state == "headers" and self.cycle is not self.armed_for)
            ):
                return
            metrics.dropped.labels("read_timeout").inc()
            why = f"the request was not read within {read_timeout:g} s (--read-timeout-s)"
            if self.cycle is not None:
                self.cycle.scope.setdefault("state", {})[READ_TIMEOUT] = True  # for the access log
                if self.cycle.response_started:
                    return self.transport.close()
            raw_answer(self.transport, 408, why)

        def shutdown(self) -> None:
            if self.state() == "body" and not self.cycle.response_started:
                return self.transport.close()  # half a request: nothing is in flight
            super().shutdown()

    return Guarded


def server_class():
    """uvicorn's Server, which at SIGTERM lets the batcher run what it holds at once and sets the deadline of the
    stop, and which logs the address it bound."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, service, banner: str):
            super().__init__(config)
            self.service, self.banner = service, banner

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                self.service.log(f"serving {self.banner.format(url=f'http://{host}:{port}/')}")

        def handle_exit(self, sig, frame) -> None:
            if self.service.stop_by is None:
                self.service.stop_by = time.monotonic() + self.service.shutdown_timeout_s
            super().handle_exit(sig, frame)
            self.service.batcher.flush()

    return Server
