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
import socket
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the [serve] extra's modules are imported only when serving
    import uvicorn

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
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.deadline: asyncio.TimerHandle | None = None
            self.armed_for: object | None = None  # the request (uvicorn's cycle) the deadline is for
            metrics.connections.inc()
            if len(self.connections) > max_connections:
                metrics.dropped.labels("too_many").inc()
                why = f"the service holds {max_connections} connections (--max-connections); retry shortly"
                return raw_answer(transport, 503, why, b"retry-after: 1\r\n")
            self.arm()

        def connection_lost(self, exc: Exception | None) -> None:
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
            """A new read deadline, for the request now arriving (or the next one)."""
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
            """uvicorn's stop: a request half read is dropped at once; one being answered is finished."""
            if self.state() == "body" and not self.cycle.response_started:
                return self.transport.close()  # half a request: nothing is in flight
            super().shutdown()

    return Guarded


def server_class() -> Callable[[uvicorn.Config, str, Callable[[str], None], Callable[[], None]], uvicorn.Server]:
    """uvicorn's Server, which logs the address it bound, and at SIGTERM calls `stopping` (the service's: it sets
    the deadline of the stop and lets the batcher run what it holds at once)."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(
            self, config: uvicorn.Config, banner: str, log: Callable[[str], None], stopping: Callable[[], None]
        ) -> None:
            super().__init__(config)
            self.banner, self.log, self.stopping = banner, log, stopping

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                self.log(f"serving {self.banner.format(url=f'http://{host}:{port}/')}")

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.stopping()
            super().handle_exit(sig, frame)

    return Server
