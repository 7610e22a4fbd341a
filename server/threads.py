"""Threads for torch work that end with it.

Torch's CPU kernels run on OpenMP (libgomp), which keeps a pool of helper threads for every thread that ran
parallel work, for as long as that thread lives. Once its pools hold more threads than the machine has CPUs,
libgomp's helpers stop spinning between parallel regions and sleep, so every small op waits for a wake-up:
a model loaded in a worker thread that then idles (an executor's) made every batch after it 1.6x slower on
2 cores. So the model runs in one long-lived thread (the batcher's), and the work before it (loading) or beside
it (a streamed caption) runs in a thread that ends when the work does, taking its pool with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")


def in_new_thread(fn: Callable[..., R], *args: object, name: str) -> asyncio.Future[R]:
    """`fn(*args)` in a new thread named `name`, in a copy of the caller's context (its request ID for the log, as
    `asyncio.to_thread`); the future (of the running loop) gets its result or exception. Cancelling the future
    does not stop the thread, and the interpreter waits for the thread at exit."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future: asyncio.Future[R] = loop.create_future()

    def settle(error: BaseException | None, value: R | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value, error = context.run(fn, *args), None
        except StopIteration as exc:  # a future cannot hold one
            value, error = None, RuntimeError(f"{getattr(fn, '__name__', fn)} raised StopIteration")
            error.__cause__ = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to tell
            loop.call_soon_threadsafe(settle, error, value)

    threading.Thread(target=run, name=name).start()
    return future
