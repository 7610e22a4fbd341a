"""Torch work beside the batcher runs in threads that end with it (`server.threads`): no idle thread is left
holding an OpenMP pool to slow the batches down."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from server_helpers import DEFAULT_MODEL_DIR

from server import Settings, service
from server.inference import load_predictor
from server.metrics import Metrics
from server.service import Engine
from server.threads import in_new_thread


def live(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def wait_gone(name: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while live(name):
        assert time.monotonic() < deadline, f"thread {name!r} still alive"
        time.sleep(0.01)


def test_result_comes_from_a_thread_of_its_own_that_then_ends() -> None:
    async def main() -> tuple[str, int]:
        return await in_new_thread(lambda x: (threading.current_thread().name, x * 2), 21, name="test-worker")

    name, value = asyncio.run(main())
    assert (name, value) == ("test-worker", 42)
    wait_gone("test-worker")


def test_exception_reaches_the_awaiting_coroutine() -> None:
    def fail() -> None:
        raise ValueError("bad checkpoint")

    async def main() -> None:
        await in_new_thread(fail, name="test-failing")

    with pytest.raises(ValueError, match="bad checkpoint"):
        asyncio.run(main())
    wait_gone("test-failing")


def test_a_cancelled_future_lets_the_thread_finish_quietly() -> None:
    finished, errors = threading.Event(), []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        release = threading.Event()
        future = in_new_thread(lambda: (release.wait(5), finished.set()), name="test-cancelled")
        future.cancel()
        release.set()
        while not finished.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the thread's result reaches the loop, which drops it

    asyncio.run(main())
    wait_gone("test-cancelled")
    assert errors == []


def test_engine_loads_the_model_in_a_thread_that_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    loaders: list[threading.Thread] = []

    def recording_load(settings: Settings) -> tuple[object, str]:
        loaders.append(threading.current_thread())
        return load_predictor(settings)

    monkeypatch.setattr(service, "load_predictor", recording_load)

    async def main() -> Engine:
        engine = Engine(Settings(model=str(DEFAULT_MODEL_DIR), device="cpu"), Metrics())
        await engine.load()
        assert len(loaders) == 1 and loaders[0] is not threading.main_thread()
        loaders[0].join(timeout=10)  # while the loop runs: an executor's idle worker would stay
        assert not loaders[0].is_alive()
        await engine.stop()
        return engine

    engine = asyncio.run(main())
    assert engine.load_error is None and engine.predictor is not None
