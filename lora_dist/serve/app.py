"""The HTTP API of `lora-dist serve` (FastAPI): classify, list adapters, health, readiness, metrics, the page.

    lora-dist serve --adapters spam=runs/smoke
    curl -s localhost:8000/v1/classify -H 'content-type: application/json' -d '{"adapter": "spam", "texts": ["see you at 6"]}'

The OpenAPI schema is at /openapi.json, and /docs shows it with Swagger UI's script and style served by the service
itself (fastapi-offline), so it renders with no network. Every error answers {"error": "what was wrong"}.
`Service` owns the model, the batcher, the metrics and the log; `create_app` puts HTTP in front of it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.exceptions import HTTPException

from ..device import precision_note
from ..infer.multi_adapter import MultiAdapterClassifier
from .batcher import Batcher
from .metrics import Metrics


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64  # messages per request
    max_chars: int = 4000  # characters per message
    max_body: int = 1 << 20  # bytes per request body


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: StrictStr
    texts: list[StrictStr]


class Result(BaseModel):
    label: str
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    adapter: str
    results: list[Result]


class Failure(Exception):
    """An answer with an HTTP error status and a message saying what was wrong."""

    def __init__(self, status: int, message: str, reason: str = "bad_request"):
        self.status, self.message, self.reason = status, message, reason


class Service:
    """The model (built in the background at startup), its batcher, the metrics, the limits and the token."""

    def __init__(
        self,
        loaded,
        *,
        base=None,
        device="auto",
        precision="fp32",
        max_batch=32,
        max_wait_ms=5.0,
        limits: Limits = Limits(),
        token: str | None = None,
        log=None,
    ):
        self.loaded, self.base, self.device, self.precision = loaded, base, device, precision
        self.specs = {a.name: a.spec for a in loaded}
        self.limits, self.token, self.max_batch = limits, token, max_batch
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.metrics = Metrics()
        self.batcher = Batcher(self._run, max_batch, max_wait_ms, on_batch=self.metrics.batch_done)
        self.model = None
        self.failed: str | None = None

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.model = MultiAdapterClassifier.from_loaded(
                self.loaded, self.base, device=self.device, precision=self.precision
            )
            names = list(self.specs)
            self.model.predict(["warm up"] * len(names), names)  # first-call costs (weight packing) paid here
        except Exception as e:  # noqa: BLE001  (readyz and every request say why)
            self.failed = f"{type(e).__name__}: {e}"
            self.log(f"error: the model did not load ({self.failed})")
            return
        self.log(f"ready: {len(self.specs)} adapters on {self.model.device} in {time.perf_counter() - t0:.1f} s")
        if note := precision_note(self.precision, self.model.precision, self.model.device):
            self.log(note)

    def _run(self, texts: list[str], adapters: list[str]) -> list[dict]:
        return self.model.predict(texts, adapters, batch_size=self.max_batch)

    def adapters(self) -> list[dict]:
        return [
            {
                "name": n,
                "labels": list(s.labels),
                "base": s.base.describe(),
                "rank": s.lora["rank"],
                "layers": len([t for t in s.lora["targets"] if t != "head"]),
                "max_length": s.max_length,
            }
            for n, s in self.specs.items()
        ]

    async def classify(self, req: ClassifyRequest) -> dict:
        lim = self.limits
        if req.adapter not in self.specs:
            raise Failure(
                404,
                f"unknown adapter {req.adapter!r}; this service has {', '.join(self.specs)} (GET /v1/adapters)",
                "unknown_adapter",
            )
        if not req.texts:
            raise Failure(422, f"texts is empty; send 1 to {lim.max_texts} messages", "empty")
        if len(req.texts) > lim.max_texts:
            raise Failure(
                413,
                f"{len(req.texts)} texts in one request; the limit is {lim.max_texts} (--max-texts): split the request",
                "too_many_texts",
            )
        for i, t in enumerate(req.texts):
            if len(t) > lim.max_chars:
                raise Failure(
                    413,
                    f"texts[{i}] has {len(t)} characters; the limit is {lim.max_chars} (--max-chars)",
                    "text_too_long",
                )
        if self.model is None:
            raise Failure(
                503,
                f"the model failed to load ({self.failed})"
                if self.failed
                else "the model is still loading; retry once GET /readyz answers 200",
                "not_ready",
            )
        self.metrics.queued.inc()
        try:
            rows = await self.batcher.submit(req.adapter, req.texts)
        finally:
            self.metrics.queued.dec()
        self.metrics.messages.labels(req.adapter).inc(len(rows))
        return {"adapter": req.adapter, "results": [{"label": r["label"], "probs": r["probs"]} for r in rows]}


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        loading = asyncio.ensure_future(service.batcher.call(service.load))  # on the model thread (batcher.py)
        yield
        await loading
        await service.batcher.stop()

    app: FastAPI = FastAPIOffline(  # /docs and /redoc from assets in the package, not a CDN
        title="lora-dist",
        summary="Classify messages with LoRA adapters over one frozen GPT-2",
        version="1",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.add_middleware(BodyLimit, limit=service.limits.max_body, metrics=service.metrics)

    def auth(request: Request) -> None:
        if service.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), service.token.encode()):
            why = "no Authorization header" if not got else "a wrong bearer token"
            raise Failure(401, f"{why}; send 'Authorization: Bearer <token>' with the service's token", "unauthorized")

    @app.exception_handler(Failure)
    async def failure(request: Request, e: Failure):
        adapter = _adapter_label(request, service)
        service.metrics.error(adapter, e.reason, e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            status, reason = 400, "bad_json"
            msg = f"the body is not valid JSON ({errors[0].get('ctx', {}).get('error', errors[0]['msg'])})"
        else:
            status, reason = 422, "bad_schema"
            where = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors[:5]
            )
            msg = f'the body does not match {{"adapter": "NAME", "texts": ["message", ...]}}: {where}'
        service.metrics.error("-", reason, status)
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        msg = {
            404: f"no such endpoint {request.url.path}; see /docs",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        return JSONResponse({"error": msg.get(e.status_code, str(e.detail))}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        service.log(f"error: {request.method} {request.url.path} failed: {type(e).__name__}: {e}")
        service.metrics.error(_adapter_label(request, service), "internal", 500)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        dependencies=[Depends(auth)],
        responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 503: {}},
    )
    async def classify(req: ClassifyRequest):
        """Label each message with the adapter's labels; probabilities over its own labels."""
        t0 = time.perf_counter()
        out = await service.classify(req)
        service.metrics.latency.labels(req.adapter).observe(time.perf_counter() - t0)
        service.metrics.requests.labels(req.adapter, "200").inc()
        return out

    @app.get("/v1/adapters", dependencies=[Depends(auth)])
    async def adapters():
        """The adapters this service holds: name, labels, base model."""
        return {"adapters": service.adapters()}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if service.model is None:
            why = f"the model failed to load ({service.failed})" if service.failed else "the model is loading"
            return JSONResponse({"status": "not ready", "error": why}, status_code=503)
        return {"status": "ready", "adapters": list(service.specs)}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    page = (resources.files("lora_dist") / "assets" / "serve.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
                "script-src 'unsafe-inline'"  # data: for the page's inline favicon
            },
        )

    return app


def _adapter_label(request: Request, service: Service) -> str:
    """The adapter a failed request named, for the metrics: a loaded one, else "-" (no unbounded labels)."""
    body = getattr(request.state, "body", None)
    try:
        name = json.loads(body).get("adapter") if body else None
    except (ValueError, AttributeError):
        name = None
    return name if name in service.specs else "-"


class BodyLimit:
    """Refuse a body over `limit` bytes with 413 (by Content-Length, or while reading a chunked one)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > self.limit
        body, more = b"", True
        while more and not too_big:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_big = len(body) > self.limit
        if too_big:
            self.metrics.error("-", "body_too_large", 413)
            msg = json.dumps(
                {"error": f"the body is over {self.limit} bytes (--max-body-bytes); send fewer or shorter texts"}
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            return await send({"type": "http.response.body", "body": msg.encode()})
        scope.setdefault("state", {})["body"] = body
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
