"""What `lora-dist serve` does to a request before the API sees it: the token, the body's size, the access log.

    LORA_DIST_TOKEN=secret lora-dist serve --adapters spam=runs/smoke --access-log

Plain ASGI middlewares, outermost first: `AccessLog` (one line per request: client, method, path, status,
time), `Auth` (the bearer token, checked before a byte of the body is read: an unauthenticated client gets 401
whatever it sends), `BodyLimit` (413 past --max-body-bytes). Each refusal answers {"error": "..."}.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .metrics import Metrics
from .server import READ_TIMEOUT

if TYPE_CHECKING:  # the ASGI interface, as starlette spells it
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

Header = tuple[bytes, bytes]


async def answer(send: Send, status: int, message: str, headers: tuple[Header, ...] = ()) -> None:
    """A JSON error answer, sent directly (outside the API)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})


class AccessLog:
    """`--access-log`: a line per request, `access: CLIENT "METHOD PATH" STATUS TIME ms` (408: its body was not
    read within --read-timeout-s, serve/server.py; "-": no answer, the client left)."""

    def __init__(self, app: ASGIApp, log: Callable[[str], None]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), "-"

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if status == "-" and scope.get("state", {}).get(READ_TIMEOUT):
                status = "408"
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "-"
            path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
            query = scope.get("query_string") or b""
            path += f"?{query.decode('latin-1')}" if query else ""
            self.log(f'access: {who} "{scope["method"]} {path}" {status} {(time.perf_counter() - t0) * 1000:.1f} ms')


class Auth:
    """With a token, a request to a `protected` path needs `Authorization: Bearer TOKEN`, compared as bytes in
    constant time, before its body is read."""

    def __init__(self, app: ASGIApp, token: str | None, protected: Callable[[str], bool], metrics: Metrics) -> None:
        self.app, self.protected, self.metrics = app, protected, metrics
        self.token = token.encode("ascii") if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or not self.protected(scope["path"]):
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, value = got.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token):
            return await self.app(scope, receive, send)
        self.metrics.error("-", "unauthorized", 401)
        why = "no Authorization header" if not got else "a wrong bearer token"
        message = f"{why}; send 'Authorization: Bearer <token>' with the service's token"
        await answer(send, 401, message, ((b"www-authenticate", b"Bearer"), (b"connection", b"close")))


class BodyLimit:
    """Refuse a body over `limit` bytes with 413 (by Content-Length, or while reading a chunked one). A client
    that leaves (or is cut off: --read-timeout-s) before its body is complete never reaches the API."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > self.limit
        body, more = b"", True
        while more and not too_big:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_big = len(body) > self.limit
        if too_big:
            self.metrics.error("-", "body_too_large", 413)
            msg = f"the body is over {self.limit} bytes (--max-body-bytes); send fewer or shorter texts"
            return await answer(send, 413, msg, ((b"connection", b"close"),))
        scope.setdefault("state", {})["body"] = body
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
