"""Dynamic batching: concurrent requests are gathered into one call of a batched function.

`submit(item)` takes a slot in a bounded queue (full -> `QueueFull` at once, no waiting), or uses one the caller took
with `hold` before it had the item (before decoding its image); a single loop gathers queued
items until `max_batch_size` or until the oldest has waited `max_wait_s`, then runs `process(items)` once,
in a worker thread. A caller that goes away (cancelled: timeout or client disconnect) frees its slot at once
and its item is dropped if the batch has not started (`run_jobs` cuts short the work of one whose batch has).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The batcher already holds `max_queue` requests."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


def process_each(process: Callable[[list[T]], Sequence[R]], values: list[T]) -> list[R | BaseException]:
    """`process(values)`, one result per value; if the batch raises, each value is retried alone, so one bad
    value fails alone (its result is the exception, which its caller logs: in its request's context)."""
    try:
        results = list(process(values))
        if len(results) != len(values):
            raise RuntimeError(f"batch of {len(values)} gave {len(results)} results")
        return results
    except Exception as exc:
        if len(values) == 1:
            return [exc]
        logger.warning("batch of %d failed (%s); retrying one by one", len(values), exc)
        return [result for value in values for result in process_each(process, [value])]


class Batcher(Protocol[T, R]):
    """What `Engine` needs of a batcher: `DynamicBatcher` here, `ServeBatcher` on a Ray Serve replica."""

    async def submit(self, value: T, held: bool = False) -> R: ...

    async def close(self, timeout_s: float = 30.0) -> None: ...


@dataclass(eq=False)  # removed from the queue by identity: comparing values would compare images and tensors
class _Item:
    value: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[T, R]):
    """Gathers `submit`ted items into batches for `process(list[T]) -> list[R]` (one result per item).

    If a batch raises, its items are retried one by one so that one bad item fails alone.
    `on_batch(size, seconds)` and `on_depth(depth)` report to metrics.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] = lambda size, seconds: None,
        on_depth: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self.process, self.max_batch_size, self.max_wait_s, self.max_queue = (
            process,
            max_batch_size,
            max_wait_s,
            max_queue,
        )
        self.on_batch, self.on_depth = on_batch, on_depth
        self._queue: deque[_Item] = deque()
        self._depth = 0
        self._closed = False
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelllm-batch")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests submitted and not yet answered or cancelled."""
        return self._depth

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pixelllm-batcher")

    async def submit(self, value: T, held: bool = False) -> R:
        """The result for `value`, computed in some batch. Cancelling the caller frees the slot. `held`: the caller
        took the slot with `hold` (and frees it): `value` is taken even while closing, as it came in before."""
        if (not held and self._closed) or (self._task is not None and self._task.done()):
            raise BatcherClosed  # closing takes no new work; once closed (the worker stopped) not even a held one
        if not held and self._depth >= self.max_queue:
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        if not held:
            self._depth += 1
            self.on_depth(self._depth)
            future.add_done_callback(self._release)
        item = _Item(value, future)
        self._queue.append(item)
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):  # not yet in a batch: drop it now, not when the batch running ends
                self._queue.remove(item)
            raise

    def hold(self) -> Callable[[], None]:
        """Take one queue slot, for work run outside the batches (a streamed caption) or for a value `submit`ted later
        with `held`; returns its release (once is enough: calling it again does nothing).

        Raises `QueueFull` or `BatcherClosed` as `submit` does; `close` waits for held slots too.
        """
        if self._closed:
            raise BatcherClosed
        if self._depth >= self.max_queue:
            raise QueueFull
        self._depth += 1
        self.on_depth(self._depth)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(None)

        return release

    def _release(self, future: asyncio.Future | None) -> None:
        self._depth -= 1
        self.on_depth(self._depth)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, finish what is queued or running (up to `timeout_s`), stop the worker."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while self._depth and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._gather() if not item.future.done()]
            if not batch:
                continue
            started = time.monotonic()
            values = [item.value for item in batch]
            results = await loop.run_in_executor(self._executor, process_each, self.process, values)
            self.on_batch(len(batch), time.monotonic() - started)
            for item, result in zip(batch, results):
                if item.future.done():  # its caller left or timed out: nobody reads the result, nor logs its error
                    if isinstance(result, BaseException):
                        logger.error("model call failed for a request no longer waiting", exc_info=result)
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _gather(self) -> list[_Item]:
        """Wait for a first live item, then take more until the batch is full or the oldest waited enough."""
        batch: list[_Item] = []
        while len(batch) < self.max_batch_size:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()
            if self._queue:
                batch.append(self._queue.popleft())
                continue
            self._arrived.clear()
            if not batch:
                await self._arrived.wait()
                continue
            remaining = batch[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return batch
