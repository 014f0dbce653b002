"""The HTTP API of `lora-dist serve` (FastAPI): classify, list adapters, health, readiness, metrics, the page.

    lora-dist serve --adapters spam=runs/smoke
    curl -s localhost:8000/v1/classify -H 'content-type: application/json' -d '{"adapter": "spam", "texts": ["see you at 6"]}'

The OpenAPI schema is at /openapi.json, and /docs shows it with Swagger UI's script and style served by the service
itself (fastapi-offline), so it renders with no network. Every error answers {"error": "what was wrong"}.
`Service` owns the model, the batcher, the metrics and the log; `create_app` puts HTTP in front of it: the
middlewares, the error answers, and the routes, added by concern (classify; the adapters; probes; the page).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.exceptions import HTTPException

from ..adapter import AdapterSpec
from ..device import precision_note
from ..infer.adapter_store import Catalog, Gone, Parts, Unavailable
from ..infer.multi_adapter import Loaded, MultiAdapterClassifier
from .batcher import Batcher, Stopped
from .metrics import Metrics
from .middleware import AccessLog, Auth, BodyLimit

T = TypeVar("T")
Row = dict[str, Any]  # one message's answer from the model: {"label": ..., "probs": {label: p}}


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

    def __init__(
        self, status: int, message: str, reason: str = "bad_request", headers: dict[str, str] | None = None
    ) -> None:
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


class Service:
    """The model (built in the background at startup), its batcher, the metrics, the limits and the token.
    At most `max_queue` requests wait for a batch; more get 503 with Retry-After. With a token, /metrics needs
    it too unless `open_metrics`, and /readyz names no adapter."""

    def __init__(
        self,
        loaded: list[Loaded],
        *,
        base: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        limits: Limits = Limits(),
        token: str | None = None,
        log: Callable[[str], None] | None = None,
        max_queue: int = 512,
        open_metrics: bool = False,
        access_log: bool = False,
        shutdown_timeout_s: float = 20.0,
        catalog: Catalog | None = None,
        max_loaded: int = 64,
        max_adapter_memory: int | None = None,
    ) -> None:
        self.loaded, self.base, self.device, self.precision = loaded, base, device, precision
        self._specs = {a.name: a.spec for a in loaded}
        # --adapters-dir: adapters listed by the catalog, read on demand into `max_loaded` slots
        self.catalog, self.max_loaded, self.max_adapter_memory = catalog, max_loaded, max_adapter_memory
        self.counts: dict[str, int] = {}  # classify requests answered, by adapter
        self.reading: dict[tuple[str, int], asyncio.Future[Parts]] = {}  # adapter reads in flight, one per version
        self.preparing = 0  # requests waiting for their adapter's read, not yet queued (the batcher waits a little)
        self.reload_lock: asyncio.Lock | None = None  # made on the serving loop
        self.reader: ThreadPoolExecutor | None = None  # the thread that reads adapters from disk (not the model thread)
        self.limits, self.token, self.max_batch, self.max_queue = limits, token, max_batch, max_queue
        self.open_metrics, self.access_log, self.shutdown_timeout_s = open_metrics, access_log, shutdown_timeout_s
        self.log: Callable[[str], None] = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.metrics = Metrics()
        self.batcher: Batcher[Row] = Batcher(
            self._run,
            max_batch,
            max_wait_ms,
            on_batch=self.metrics.batch_done,
            on_abandoned=lambda r: self.metrics.skipped.inc(),
            pending=lambda: self.preparing,
        )
        self.model: MultiAdapterClassifier | None = None
        self.failed: str | None = None
        self.stop_by: float | None = None  # time.monotonic() by which a stop must be done (set at SIGTERM)
        self.stopped_cleanly = True

    @property
    def specs(self) -> dict[str, AdapterSpec]:
        """{name: AdapterSpec} of every adapter served (with --adapters-dir, those the last scan found)."""
        if self.catalog is None:
            return self._specs
        return {n: e.spec for n, e in self.catalog.entries.items()}

    def knows(self, name: str) -> bool:
        """Whether `name` is an adapter this service serves."""
        return name in (self.catalog.entries if self.catalog is not None else self._specs)

    def load(self) -> None:
        """Build the model and warm it up; only a model whose warm-up passed is ready (GET /readyz)."""
        t0 = time.perf_counter()
        try:
            if self.catalog is not None:
                model = MultiAdapterClassifier.from_catalog(
                    self.catalog,
                    self.base,
                    device=self.device,
                    precision=self.precision,
                    max_loaded=self.max_loaded,
                    max_adapter_memory=self.max_adapter_memory,
                    log=self.log,
                )
                model.on, model.log = self._cache_event, self.log
                names = list(self.catalog.entries)[:1]  # one adapter: the rest are read when asked for
            else:
                model = MultiAdapterClassifier.from_loaded(
                    self.loaded, self.base, device=self.device, precision=self.precision
                )
                names = list(self.specs)
            model.predict(["warm up"] * len(names), names)  # first-call costs (weight packing) paid here
        except Exception as e:  # noqa: BLE001  (readyz and every request say why)
            self.failed = f"{type(e).__name__}: {e}"
            self.log(f"error: the model did not load ({self.failed})")
            return
        if getattr(model, "slots", None) is not None:
            model.forget(names)  # the warm-up's adapter leaves its slot: nothing resident before a request
        self.model = model
        held = getattr(model, "slots", None)
        slots = f" ({held.n} slots, --max-loaded)" if held is not None else ""
        self.log(f"ready: {len(self.specs)} adapters{slots} on {model.device} in {time.perf_counter() - t0:.1f} s")
        self.metrics.adapters_known.set(len(self.specs))
        if note := precision_note(self.precision, model.precision, model.device):
            self.log(note)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While the server runs (its lifespan): the batcher started, the model loaded on its thread in the
        background; at the end, `stop`."""
        self.batcher.start()
        loading = asyncio.ensure_future(self.batcher.call(self.load))  # on the model thread (batcher.py)
        yield
        await self.stop(loading)

    def stopping(self) -> None:
        """At SIGTERM: the stop must be done within --shutdown-timeout-s, and what the batcher holds runs at once."""
        if self.stop_by is None:
            self.stop_by = time.monotonic() + self.shutdown_timeout_s
        self.batcher.flush()

    async def stop(self, loading: asyncio.Future[None]) -> None:
        """Finish what is queued, by --shutdown-timeout-s after the SIGTERM at the latest."""
        deadline = self.stop_by or time.monotonic() + self.shutdown_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(loading), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # noqa: UP041  (Python 3.10: not the builtin TimeoutError)
            pass
        finished = loading.done() and await self.batcher.stop(deadline)
        if self.reader is not None:
            self.reader.shutdown(wait=False, cancel_futures=True)
        self.stopped_cleanly = finished

    def protected(self, path: str) -> bool:
        """Whether `path` needs the token (when there is one): the API, and /metrics unless `open_metrics`."""
        return path.startswith("/v1/") or (path == "/metrics" and not self.open_metrics)

    def _run(self, texts: list[str], adapters: list[str]) -> list[Row]:
        assert self.model is not None  # requests reach the batcher only once the model is loaded
        return self.model.predict(texts, adapters, batch_size=self.max_batch)

    def _cache_event(self, event: str, name: str, seconds: float = 0.0) -> None:
        """What the model's slots report (any thread: prometheus_client's metrics are thread-safe)."""
        if event == "load":
            self.metrics.loads.labels("ok").inc()
            self.metrics.load_seconds.observe(seconds)
        elif event == "evict":
            self.metrics.evictions.inc()

    def adapters(self, q: str = "", limit: int | None = None, offset: int = 0) -> dict[str, Any]:
        """The adapters whose name starts with `q`, `limit` from `offset` on."""
        names = [n for n in self.specs if n.startswith(q)]  # the order given, or by name (--adapters-dir)
        page = names[offset : None if limit is None else offset + limit]
        specs = self.specs
        out = []
        for n in page:
            s = specs[n]
            assert s.lora is not None  # a served adapter is a LoRA one (read_adapters, Catalog)
            state = "loaded"
            if self.catalog is not None:
                state = "loaded" if self.model is not None and self.model.resident(n) is not None else "on disk"
            out.append(
                {
                    "name": n,
                    "labels": list(s.labels),
                    "base": s.base.describe(),
                    "rank": s.lora["rank"],
                    "layers": len(s.lora["targets"]),  # as `adapter info` and training count them, the head included
                    "max_length": s.max_length,
                    "state": state,
                    "requests": self.counts.get(n, 0),
                }
            )
        more = limit is not None and offset + limit < len(names)
        return {"adapters": out, "total": len(names), "next_offset": offset + len(page) if more else None}

    def unknown(self, name: str) -> Failure:
        """The 404 for an adapter this service does not serve, naming some it does."""
        names = list(self.specs)
        some = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        return Failure(404, f"unknown adapter {name!r}; this service has {some} (GET /v1/adapters)", "unknown_adapter")

    async def prepare(self, name: str) -> str:
        """ "hit" when `name`'s current version is in a slot (or read already), else read it from disk on the
        reader thread (one read per version, however many requests wait for it) and "miss". A load never
        holds up the model thread: requests for resident adapters go on meanwhile."""
        model, catalog = self.model, self.catalog
        assert model is not None and catalog is not None
        e = catalog.entries.get(name)
        if e is None:
            raise self.unknown(name)
        if model.resident(name) is e:
            return "hit"
        if model.is_current(name, e):
            return "miss"
        key = (name, id(e))
        fut = self.reading.get(key)
        if fut is None:
            if self.reader is None:
                self.reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-reader")
            fut = asyncio.get_running_loop().run_in_executor(self.reader, model.read, e)
            self.reading[key] = fut
            fut.add_done_callback(lambda _: self.reading.pop(key, None))
        try:
            parts = await asyncio.shield(fut)
        except Gone as err:
            self.metrics.loads.labels("gone").inc()
            raise Failure(404, f"{err}; it is no longer served (GET /v1/adapters)", "unknown_adapter") from err
        except Unavailable as err:
            self.metrics.loads.labels("unavailable").inc()
            if model.resident(name) is not None:  # the version loaded before stays until the new one is whole
                self.log(f"{err}; serving the version loaded before")
                return "hit"
            self.log(f"error: {err}")
            raise Failure(503, str(err), "adapter_unavailable", {"Retry-After": "1"}) from err
        model.stage(parts)
        return "miss"

    async def reload(self) -> dict[str, Any]:
        """Scan --adapters-dir again (SIGHUP, POST /v1/adapters/reload): new adapters are served, removed ones
        evicted, changed ones read again on their next request. Reloads run one at a time."""
        if self.catalog is None:
            raise Failure(
                409,
                "this service names its adapters with --adapters only; serve --adapters-dir DIR to reload",
                "no_dir",
            )
        if self.reload_lock is None:
            self.reload_lock = asyncio.Lock()
        async with self.reload_lock:
            t0 = time.perf_counter()
            try:
                diff = await asyncio.get_running_loop().run_in_executor(None, self.catalog.scan)
            except Exception as e:  # noqa: BLE001  (the directory went away: the adapters stay as they were)
                self.log(f"error: reload failed ({type(e).__name__}: {e}); serving the adapters as before")
                raise Failure(503, f"reload failed: {e}", "reload_failed") from e
            # removed ones leave their slots (on the model thread, between batches); a changed one stays until
            # its new version is read whole (its next request reads it)
            if diff["removed"] and self.model is not None:
                await self.batcher.call(self.model.forget, diff["removed"])
            for n in diff["removed"]:
                self.counts.pop(n, None)
            self.metrics.reloads.inc()
            self.metrics.adapters_known.set(len(self.catalog.entries))
            self.log(
                f"reload: {len(self.catalog.entries)} adapters ({len(diff['added'])} added, {len(diff['removed'])} "
                f"removed, {len(diff['changed'])} changed, {len(diff['broken'])} left out) in "
                f"{time.perf_counter() - t0:.2f} s"
            )
            return {"adapters": len(self.catalog.entries), **diff}

    def reload_soon(self) -> None:
        """A reload on the serving loop (from a signal handler: SIGHUP); its outcome is logged."""
        loop = self.batcher.loop
        if loop is None:
            return

        async def run() -> None:
            try:
                await self.reload()
            except Failure:
                pass  # logged

        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(run()))

    async def classify(self, req: ClassifyRequest, cache: dict[str, str] | None = None) -> dict[str, Any]:
        """The answer to one request, or a `Failure`; `cache["state"]`: "hit" or "miss" (--adapters-dir)."""
        self.admit(req)
        if self.catalog is not None:
            self.preparing += 1
            try:
                got = await self.prepare(req.adapter)
            finally:
                self.preparing -= 1  # and queued at once below, in the same step of the loop
            (self.metrics.cache_hits if got == "hit" else self.metrics.cache_misses).inc()
            if cache is not None:
                cache["state"] = got
        self.metrics.queued.inc()
        try:
            rows = await self.batcher.submit(req.adapter, req.texts)
        except Stopped as e:
            raise Failure(503, f"{e}; retry on another replica", "stopping") from e
        except Gone as e:  # removed by a reload while this request waited
            raise Failure(404, f"{e}; it is no longer served (GET /v1/adapters)", "unknown_adapter") from e
        except Unavailable as e:
            self.log(f"error: {e}")
            raise Failure(503, str(e), "adapter_unavailable", {"Retry-After": "1"}) from e
        except Exception as e:
            self.log(f"error: a request for adapter {req.adapter!r} failed in the model: {type(e).__name__}: {e}")
            raise Failure(500, f"the model failed on this request ({type(e).__name__}: {e})", "model_error") from e
        finally:
            self.metrics.queued.dec()
        self.metrics.messages.labels(req.adapter).inc(len(rows))
        self.counts[req.adapter] = self.counts.get(req.adapter, 0) + 1
        if (held := getattr(self.model, "slots", None)) is not None:
            self.metrics.adapters_resident.set(len(held.resident))
        return {"adapter": req.adapter, "results": [{"label": r["label"], "probs": r["probs"]} for r in rows]}

    def admit(self, req: ClassifyRequest) -> None:
        """The `Failure` that refuses `req` before it queues, if any: an unknown adapter, no texts, too many or too
        long texts, no model yet, a full queue."""
        lim = self.limits
        if not self.knows(req.adapter):
            raise self.unknown(req.adapter)
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
        if self.batcher.waiting >= self.max_queue:
            raise Failure(
                503,
                f"the service is busy: {self.max_queue} requests already wait for the model (--max-queue); retry",
                "queue_full",
                {"Retry-After": "1"},
            )


def create_app(service: Service) -> FastAPI:
    """The HTTP API in front of `service`: the middlewares, the error answers, then the routes by concern."""
    app: FastAPI = FastAPIOffline(  # /docs and /redoc from assets in the package, not a CDN
        title="lora-dist",
        summary="Classify messages with LoRA adapters over one frozen GPT-2",
        version="1",
        lifespan=lambda _app: service.running(),
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    _add_middleware(app, service)
    _add_error_answers(app, service)
    _add_classify(app, service)
    _add_adapters(app, service)
    _add_probes(app, service)
    _add_page(app)
    return app


def _add_middleware(app: FastAPI, service: Service) -> None:
    """Added last runs first: the access log, then the token, then the body's size (middleware.py)."""
    app.add_middleware(BodyLimit, limit=service.limits.max_body, metrics=service.metrics)
    app.add_middleware(Auth, token=service.token, protected=service.protected, metrics=service.metrics)
    if service.access_log:
        app.add_middleware(AccessLog, log=service.log)


def _add_error_answers(app: FastAPI, service: Service) -> None:
    """Every error answers {"error": "what was wrong"}; those of the API are counted in the metrics."""

    @app.exception_handler(Failure)
    async def failure(request: Request, e: Failure) -> JSONResponse:
        service.metrics.error(_adapter_label(request, service), e.reason, e.status)
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        status, reason, msg = _invalid_body(e.errors())
        service.metrics.error("-", reason, status)
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        msg = {
            404: f"no such endpoint {request.url.path}; see /docs",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        return JSONResponse({"error": msg.get(e.status_code, str(e.detail))}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        service.log(f"error: {request.method} {request.url.path} failed: {type(e).__name__}: {e}")
        service.metrics.error(_adapter_label(request, service), "internal", 500)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)


def _invalid_body(errors: Sequence[Any]) -> tuple[int, str, str]:
    """(status, reason, message) for a body pydantic refused: 400 if it is not JSON, else 422 naming at most five
    fields."""
    if any(err.get("type") == "json_invalid" for err in errors):
        return (
            400,
            "bad_json",
            f"the body is not valid JSON ({errors[0].get('ctx', {}).get('error', errors[0]['msg'])})",
        )
    where = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors[:5]
    )
    return 422, "bad_schema", f'the body does not match {{"adapter": "NAME", "texts": ["message", ...]}}: {where}'


def _add_classify(app: FastAPI, service: Service) -> None:
    """POST /v1/classify, timed and counted per adapter; a client that leaves gets nothing (499)."""

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 500: {}, 503: {}},
    )
    async def classify(req: ClassifyRequest, request: Request, response: Response) -> dict[str, Any] | Response:
        """Label each message with the adapter's labels; probabilities over its own labels. With --adapters-dir
        the answer's X-Adapter-Cache header says whether the adapter was resident (hit) or read (miss)."""
        t0 = time.perf_counter()
        cache: dict[str, str] = {}
        try:
            out = await _unless_gone(request, service.classify(req, cache))
        except asyncio.CancelledError:
            if service.stop_by is None:
                raise
            # what still runs past --shutdown-timeout-s is cancelled (by uvicorn): an answer, not a traceback
            service.metrics.error(req.adapter, "stopping", 503)
            return JSONResponse({"error": "the service stopped before answering (--shutdown-timeout-s)"}, 503)
        if out is None:  # the client left: nothing to answer, and its messages were not run if still queued
            service.metrics.abandoned.inc()
            return Response(status_code=499)
        service.metrics.latency.labels(req.adapter).observe(time.perf_counter() - t0)
        service.metrics.requests.labels(req.adapter, "200").inc()
        if "state" in cache:
            response.headers["X-Adapter-Cache"] = cache["state"]
        return out


def _add_adapters(app: FastAPI, service: Service) -> None:
    """GET /v1/adapters (paged, by name prefix) and POST /v1/adapters/reload (--adapters-dir)."""

    @app.get("/v1/adapters", response_model=None)
    async def adapters(q: str = "", limit: int | None = None, offset: int = 0) -> dict[str, Any]:
        """The adapters this service serves, in name order: name, labels, base, state (loaded: in a slot on
        the device; on disk: read when asked for) and requests answered. `q`: a name prefix; `limit` and
        `offset` page through thousands (`next_offset` is the next page's, null at the end)."""
        if limit is not None and not 1 <= limit <= 10_000 or offset < 0:
            raise Failure(422, "limit must be 1 to 10000 and offset >= 0", "bad_query")
        return service.adapters(q, limit, offset)

    @app.post("/v1/adapters/reload", response_model=None, responses={401: {}, 409: {}, 503: {}})
    async def reload() -> dict[str, Any]:
        """Scan --adapters-dir again: added adapters are served, removed ones get 404, changed ones are read
        again. Needs the token, as every /v1/ path does."""
        return await service.reload()


def _add_probes(app: FastAPI, service: Service) -> None:
    """GET /healthz (alive), /readyz (the model loaded and warmed up) and /metrics (Prometheus)."""

    @app.get("/healthz", response_model=None)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        """200 once the model is loaded and warmed up. Open to probes: with a token it names no adapter."""
        private = service.token is not None
        if service.model is None:
            why = "the model is loading"
            if service.failed:
                why = "the model failed to load" + (" (see the service's log)" if private else f" ({service.failed})")
            return JSONResponse({"status": "not ready", "error": why}, status_code=503)
        if private:
            return {"status": "ready"}
        names = list(service.specs)
        return {"status": "ready", "adapters": names if len(names) <= 100 else len(names)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_page(app: FastAPI) -> None:
    """GET /: the page (assets/serve.html), which lists the adapters and classifies what is typed in."""
    page = (resources.files("lora_dist") / "assets" / "serve.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
                "script-src 'unsafe-inline'"  # data: for the page's inline favicon
            },
        )


async def _unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client disconnects first (the work is then cancelled: a request still
    queued is never run)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled (a shutdown past --shutdown-timeout-s)
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # it unwinds: its request leaves the queue unrun
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _adapter_label(request: Request, service: Service) -> str:
    """The adapter a failed request named, for the metrics: a loaded one, else "-" (no unbounded labels)."""
    body = getattr(request.state, "body", None)
    try:
        name = json.loads(body).get("adapter") if body else None
    except (ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and service.knows(name) else "-"
