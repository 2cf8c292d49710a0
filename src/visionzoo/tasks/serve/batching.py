"""Dynamic batching: single requests in, batches of up to `max_batch` through one inference thread.

A request's input waits at most `max_delay` seconds for company; while a batch runs, the next
requests queue up and leave together as the next batch, so the batch size follows the load
(1 when idle, `max_batch` when busy) without a fixed wait at low load. The model runs in one
dedicated thread, so the event loop keeps answering `/health` and accepting connections while
it computes, and so the runtime's own threads are the only ones that compete for the cores.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger("visionzoo")
T = TypeVar("T")
R = TypeVar("R")


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to `max_batch`, and `max_batch` itself: the padded batch sizes of a runtime
    that compiles one network per input shape (a handful of shapes instead of every count)."""
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def padded_size(n: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` that holds `n` items."""
    return next(s for s in sizes if s >= n)


class Batcher(Generic[T, R]):
    """Runs `run(items) -> results` (one result per item, in order) on batches of submitted items.

    `submit(item)` waits for the item's result; an exception raised by `run` goes to every
    request of that batch. `call(fn, ...)` runs any other model work (an explanation) in the
    same thread, between batches. `on_batch(size, seconds)` reports each batch (metrics).
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R]], *, max_batch: int, max_delay: float,
                 on_batch: Callable[[int, float], None] | None = None):
        self.run = run
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="visionzoo-infer")
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Inputs queued for the next batches."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start collecting (from within the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="visionzoo-batcher")

    async def stop(self) -> None:
        """Stop collecting; requests still queued get a `RuntimeError`. The server stops the batcher
        only after its in-flight requests were answered (graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def submit(self, item: T) -> R:
        if self._queue is None or self._task is None:
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the inference thread (between batches, never beside one)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _collect(self) -> list[tuple[T, asyncio.Future]]:
        assert self._queue is not None  # started
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())  # those already waiting join at once
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # cancelled: client gone

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            items = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} inputs")
            except Exception as e:  # noqa: BLE001  (the requests of this batch fail; the server keeps serving)
                log.exception("inference failed on a batch of %d", len(items))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - started)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
