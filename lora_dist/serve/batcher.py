"""Dynamic batching: concurrent requests, for one adapter or several, gathered into one forward pass.

    python -c "import asyncio; from lora_dist.serve.batcher import *; print(asyncio.run(Batcher(lambda t, a: t).run_once('a', ['hi'])))"

`submit(adapter, texts)` queues a request and waits for its results. One task takes the first request in
the queue, then everything else that arrives within `max_wait_ms` (or already waits; or, while `pending()`
requests are on their way, such as one whose adapter is being read, up to `pending_wait_ms` more) while the
batch holds fewer than `max_batch` messages, and runs the whole batch through `run(texts, adapters)` in one worker
thread, off the event loop (torch releases the GIL, so the loop keeps reading requests meanwhile). Each
caller gets back its own slice. A request larger than `max_batch` runs alone.

A failure belongs to its own request: when a batch of several requests fails, each runs again alone, so
only the one that fails gets the error. A request whose caller has gone (its future cancelled, as when its
client disconnects) is dropped before it is run. `waiting` counts the requests not yet in a batch, which the
service bounds.

That one thread must run every torch call of the process, the model's loading included (`call`). Each
thread that runs a parallel torch op gets its own OpenMP team, and once libgomp manages more threads than
there are cores it barely spins before sleeping, so each of the hundreds of parallel regions of a forward
pass waits for a futex wake: gpt2-small on 2 cores ran 3-6x slower after a single op on a second thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Row = TypeVar("Row")  # what `run` gives for one message
T = TypeVar("T")


class Stopped(Exception):
    """What a request still waiting when the batcher stops gets."""


@dataclass
class Request(Generic[Row]):
    adapter: str
    texts: list[str]
    future: asyncio.Future[list[Row]]
    queued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[Row]):
    """Requests (adapter, texts) in, `run(texts, adapters)`'s rows out, a batch at a time on one model thread."""

    def __init__(
        self,
        run: Callable[[list[str], list[str]], list[Row]],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[list[Request[Row]]], None] | None = None,
        on_abandoned: Callable[[Request[Row]], None] | None = None,
        pending: Callable[[], int] | None = None,
        pending_wait_ms: float = 50.0,
    ) -> None:
        if max_batch < 1 or not 0 <= max_wait_ms < float("inf"):
            raise ValueError("max_batch must be >= 1 and max_wait_ms a finite number >= 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda batch: None)
        self.on_abandoned = on_abandoned or (lambda request: None)
        # requests on their way to the queue (an adapter being read from disk): a batch waits for them up to
        # pending_wait_ms past max_wait_ms, so that a read that ends as a batch forms does not miss it
        self.pending, self.pending_wait = pending or (lambda: 0), pending_wait_ms / 1000
        self.queue: asyncio.Queue[Request[Row]] = asyncio.Queue()  # made anew in `start`, on the serving loop
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task[None] | None = None
        self.flushing = False  # shutting down: stop waiting for more requests
        self.wake = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once started
        self.busy = False  # a batch is gathered or running
        self.running = False  # a batch is in the model thread
        self.held: Request[Row] | None = None  # taken from the queue, did not fit the last batch

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the model thread (loading, warm-up: anything that runs torch)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @property
    def queued(self) -> int:
        """Requests in the queue (not counting one held back for the next batch)."""
        return self.queue.qsize()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in a batch."""
        return self.queued + (self.held is not None)

    def start(self) -> None:
        """Start gathering batches, on the running loop (the serving one)."""
        self.queue, self.wake = asyncio.Queue(), asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._loop())

    def flush(self) -> None:
        """Run what is queued now, without waiting out `max_wait_ms` (at shutdown)."""
        self.flushing = True
        if self.loop is not None:  # callable from a signal handler or another thread
            self.loop.call_soon_threadsafe(self.wake.set)

    async def stop(self, deadline: float | None = None) -> bool:
        """Finish every queued request, then stop; by `deadline` (time.monotonic()) at the latest, when the
        requests still waiting get an error. False when a batch was still running then (its thread cannot be
        interrupted: the process must leave without waiting for it)."""
        self.flush()
        while not self.queue.empty() or self.held is not None or self.busy:
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        stuck = self.running
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        left = [self.held] if self.held else []
        while not self.queue.empty():
            left.append(self.queue.get_nowait())
        for r in left:
            if not r.future.done():
                r.future.set_exception(Stopped("the service stopped before this request ran"))
        self.pool.shutdown(wait=not stuck, cancel_futures=True)
        return not stuck

    async def submit(self, adapter: str, texts: list[str]) -> list[Row]:
        """`texts`' rows, once a batch has run them (or its error)."""
        future: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()
        await self.queue.put(Request(adapter, list(texts), future))
        return await future

    async def run_once(self, adapter: str, texts: list[str]) -> list[Row]:
        """Start, run one request, stop: for trying it out."""
        self.start()
        try:
            return await self.submit(adapter, texts)
        finally:
            await self.stop()

    async def _next(self, deadline: float) -> Request[Row] | None:
        """The next request: one held back from the last batch, one queued, or one arriving before
        `deadline`; None once the deadline passes (or at a flush)."""
        if self.held is not None:
            r, self.held = self.held, None
            return r
        if not self.queue.empty():
            return self.queue.get_nowait()
        left = deadline - time.perf_counter()
        if left <= 0 or self.flushing:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        waker = asyncio.ensure_future(self.wake.wait())
        await asyncio.wait({getter, waker}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        waker.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def _gather(self) -> list[Request[Row]]:
        """The next batch: the first live request, then those that fit and arrive within `max_wait_ms`."""
        first: Request[Row] | None = None
        while first is None:
            taken, self.held = self.held or await self.queue.get(), None
            first = self._live(taken)
        self.busy = True
        batch, size = [first], len(first.texts)
        deadline = time.perf_counter() + self.max_wait
        longest = deadline + self.pending_wait
        while size < self.max_batch:
            nxt = await self._next(deadline)
            if nxt is None:
                now = time.perf_counter()
                if self.pending() and now < longest and not self.flushing:
                    deadline = min(longest, now + 0.002)  # a request is on its way: look again shortly
                    continue
                break
            if self._live(nxt) is None:
                continue
            if size + len(nxt.texts) > self.max_batch:
                self.held = nxt  # it starts the next batch
                break
            batch.append(nxt)
            size += len(nxt.texts)
        return batch

    def _live(self, r: Request[Row]) -> Request[Row] | None:
        """`r`, or None when its caller has gone (nothing waits for its answer: it is not run)."""
        if r.future.done():
            self.on_abandoned(r)
            return None
        return r

    async def _loop(self) -> None:
        """Gather a batch, answer it, and again, until cancelled (`stop`)."""
        while True:
            batch = await self._gather()
            try:
                await self._answer(batch)
            finally:
                self.busy = False

    async def _answer(self, batch: list[Request[Row]]) -> None:
        """Run `batch` and give each caller its rows; if it fails, run its requests one by one, so that the
        error goes to the request that causes it and the others get their answers."""
        texts = [t for r in batch for t in r.texts]
        adapters = [r.adapter for r in batch for _ in r.texts]
        self.running = True
        try:
            out = await self.call(self.run, texts, adapters)
        except Exception as e:
            self.running = False
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            for r in batch:
                if self._live(r) is not None:
                    await self._answer([r])
            return
        self.running = False
        self.on_batch(batch)
        start = 0
        for r in batch:
            if not r.future.done():  # the caller may have gone away
                r.future.set_result(out[start : start + len(r.texts)])
            start += len(r.texts)
