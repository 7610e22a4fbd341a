"""Torch work beside the batcher runs in threads that end with it (`server.threads`): no idle thread is left
holding an OpenMP pool to slow the batches down."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import threading
import time

import pytest
from server_helpers import DEFAULT_MODEL_DIR, ROOT, wait_for

from server import Settings, inference, service, streaming
from server.inference import load_predictor
from server.metrics import Metrics
from server.service import Engine
from server.threads import in_new_thread

SAMPLE = ROOT / "assets" / "sample.jpg"


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


def test_the_thread_runs_in_the_callers_context() -> None:
    """As `asyncio.to_thread`: a request's context variables (its ID in every log line) reach the thread."""
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")

    async def main() -> str:
        variable.set("the caller's")
        return await in_new_thread(variable.get, name="test-context")

    assert asyncio.run(main()) == "the caller's"
    assert variable.get() == "unset"


def test_exception_reaches_the_awaiting_coroutine() -> None:
    def fail() -> None:
        raise ValueError("bad checkpoint")

    async def main() -> None:
        await in_new_thread(fail, name="test-failing")

    with pytest.raises(ValueError, match="bad checkpoint"):
        asyncio.run(main())
    wait_gone("test-failing")


def test_stop_iteration_reaches_the_coroutine_as_a_runtime_error() -> None:
    async def main() -> None:
        await asyncio.wait_for(in_new_thread(next, iter(()), name="test-stop"), 10)

    with pytest.raises(RuntimeError, match="raised StopIteration"):
        asyncio.run(main())


def test_a_cancelled_future_lets_the_thread_finish_quietly() -> None:
    finished, errors = threading.Event(), []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        release = threading.Event()
        future = in_new_thread(lambda: (release.wait(5), finished.set()), name="test-cancelled")
        future.cancel()
        release.set()
        while live("test-cancelled"):  # the thread hands its result to the loop, then ends
            await asyncio.sleep(0.01)
        for _ in range(3):  # the loop runs the handed-over callback, which drops the result
            await asyncio.sleep(0)

    asyncio.run(main())
    assert finished.is_set() and errors == []


def test_engine_loads_the_model_in_a_thread_that_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    loaders: list[threading.Thread] = []

    def recording_load(settings: Settings) -> tuple[object, str]:
        loaders.append(threading.current_thread())
        return load_predictor(settings)

    monkeypatch.setattr(service, "load_predictor", recording_load)

    async def main() -> Engine:
        engine = Engine(Settings(model=str(DEFAULT_MODEL_DIR), device="cpu", keep_freed_memory=False), Metrics())
        await engine.load()
        assert len(loaders) == 1 and loaders[0] is not threading.main_thread()
        loaders[0].join(timeout=10)  # while the loop runs: an executor's idle worker would stay
        assert not loaders[0].is_alive()
        await engine.stop()
        return engine

    engine = asyncio.run(main())
    assert engine.load_error is None and engine.predictor is not None


def test_a_streamed_caption_decodes_in_a_thread_that_ends_and_batches_run_in_one(monkeypatch) -> None:
    from starlette.testclient import TestClient

    from server import create_app

    decoders: list[threading.Thread] = []
    batch_threads: set[threading.Thread] = set()
    decode, run = streaming._decode, inference.run_jobs

    def recording_decode(*args: object) -> None:
        decoders.append(threading.current_thread())
        decode(*args)

    def recording_run(*args: object, **kwargs: object) -> object:
        batch_threads.add(threading.current_thread())
        return run(*args, **kwargs)

    monkeypatch.setattr(streaming, "_decode", recording_decode)
    monkeypatch.setattr(service, "run_jobs", recording_run)
    image = {"image": base64.b64encode(SAMPLE.read_bytes()).decode()}
    settings = Settings(model=str(DEFAULT_MODEL_DIR), keep_freed_memory=False)
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 120.0)
        for _ in range(2):
            streamed = client.post("/v1/caption", json={**image, "stream": True})
            assert streamed.status_code == 200 and "event: done" in streamed.text
            assert client.post("/v1/caption", json={**image, "box": {"x0": 0, "y0": 0, "x1": 99, "y1": 99}}).is_success
        assert len(decoders) == 2 and decoders[0] is not decoders[1]
        for thread in decoders:
            thread.join(timeout=10)  # while the service runs: a pool's idle worker would stay
            assert not thread.is_alive()
        assert len(batch_threads) == 1 and next(iter(batch_threads)).is_alive()


def test_a_json_body_is_parsed_and_its_base64_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 MB JSON body takes a while to parse and decode: done on the event loop it stalls every other request
    (a health probe, a streamed caption) meanwhile."""
    from starlette.testclient import TestClient

    from server import bodies, create_app
    from server.schemas import CaptionJSON

    on_loop: dict[str, bool] = {}
    parse, decode = CaptionJSON.model_validate_json, bodies.decode_base64

    def record(name: str, work):
        def run(*args):
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:  # no event loop runs in this thread
                on_loop[name] = False
            return work(*args)

        return run

    monkeypatch.setattr(CaptionJSON, "model_validate_json", record("parse", parse))
    monkeypatch.setattr(bodies, "decode_base64", record("decode", decode))
    with TestClient(create_app(Settings(model=str(DEFAULT_MODEL_DIR)))) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=120)
        body = {"image": base64.b64encode(SAMPLE.read_bytes()).decode(), "max_new_tokens": 2}
        answer = client.post("/v1/caption", json=body)
    assert answer.status_code == 200, answer.text
    assert on_loop == {"parse": False, "decode": False}
