"""Streamed captions as Server-Sent Events: a `word` event per completed word, then `done` (or `error`).

Decoding is greedy: a beam's words are only known once the search ends, so `num_beams` > 1 is refused (422).
Each stream decodes in a thread of the engine's stream pool while holding a queue slot (429 when none is
free), on the image embedding from the cache. The client leaving (even before the first event), or the request
timeout, stops the decoding before its next decoder step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pixelllm import GenerationCancelled

from .errors import ApiError, invalid
from .inference import Job, ms_since
from .schemas import CaptionParams, CaptionResponse, ImageInfo
from .service import Engine, caption_result, check_box, check_point, open_image, word_results

logger = logging.getLogger(__name__)

GREEDY_ONLY = "streaming decodes greedily (a beam's words are only known once the search ends): use num_beams=1"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# what the decoding thread hands to the response, in order: ("word", Word)..., then ("done", Caption, cache_hit,
# encode_ms) or ("error", exception)
Emit = Callable[[tuple[Any, ...]], None]


def sse(event: str, data: str) -> str:
    """One Server-Sent Event whose data is one line (JSON)."""
    return f"event: {event}\ndata: {data}\n\n"


async def caption_stream(engine: Engine, request: Request, data: bytes, params: CaptionParams) -> StreamingResponse:
    """`/v1/caption` as a stream. Bad input, a full queue or a model not ready are plain JSON errors, before
    the stream starts; a failure or a timeout once it runs is an `error` event."""
    start = time.perf_counter()
    if params.num_beams != 1:
        raise invalid("num_beams", GREEDY_ONLY)
    engine.require_ready()
    job, width, height, decode_ms = await open_image(engine, data)
    box = check_box("box", params.box, width, height) if params.box else None
    point = check_point("point", params.point, width, height) if params.point else None
    release = engine.hold_slot()
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    stop = threading.Event()
    deadline = time.monotonic() + engine.settings.request_timeout_s

    def emit(item: tuple[Any, ...]) -> None:
        loop.call_soon_threadsafe(items.put_nowait, item)

    args = (engine, job, box, point, params.max_new_tokens, emit, stop, deadline)
    loop.run_in_executor(engine.stream_pool, _decode, *args).add_done_callback(lambda _: release())

    async def events() -> AsyncIterator[str]:
        first_word_ms = None
        while True:
            kind, *item = await items.get()
            if kind == "word":
                if first_word_ms is None:
                    first_word_ms = ms_since(start)
                    engine.metrics.stream_first_word.observe(first_word_ms / 1000.0)
                yield sse("word", word_results(item, width, height)[0].model_dump_json())
                if await request.is_disconnected():
                    return
            elif kind == "done":
                caption, cache_hit, encode_ms = item
                timing = {"decode": decode_ms, "encode": encode_ms}
                timing |= {"first_word": first_word_ms} if first_word_ms is not None else {}
                response = CaptionResponse(
                    **caption_result(caption, params.box, params.point, width, height).model_dump(),
                    image=ImageInfo(width=width, height=height),
                    model=engine.model_name,
                    cache_hit=cache_hit,
                    timing_ms=timing | {"total": ms_since(start)},
                )
                yield sse("done", response.model_dump_json())
                return
            else:
                yield sse("error", json.dumps({"error": _error(item[0])}))
                return

    return StoppingStream(stop, events(), media_type="text/event-stream", headers=SSE_HEADERS)


class StoppingStream(StreamingResponse):
    """A `StreamingResponse` that sets `stop` once it ends for any reason: done, the client gone (even before the
    first event, when Starlette cancels the response before it iterates the events at all), or an error."""

    def __init__(self, stop: threading.Event, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stop.set()


def _decode(
    engine: Engine,
    job: Job,
    box: tuple[float, float, float, float] | None,
    point: tuple[float, float] | None,
    max_new_tokens: int | None,
    emit: Emit,
    stop: threading.Event,
    deadline: float,
) -> None:
    """In a stream thread: the image embedding (cached, or encoded and cached), then the caption word by word."""
    try:
        start = time.perf_counter()
        embedding = job.embedding if job.embedding is not None else engine.cache.get(job.key)
        cache_hit = embedding is not None
        if embedding is None:
            embedding = engine.predictor.embed(job.image)
            engine.cache.put(job.key, embedding)
        (engine.metrics.cache_hits if cache_hit else engine.metrics.cache_misses).inc()
        encode_ms = 0.0 if cache_hit else ms_since(start)

        def should_stop() -> bool:
            return stop.is_set() or time.monotonic() > deadline

        words = engine.predictor.caption_stream_embedding(embedding, box, point, max_new_tokens, should_stop)
        delay_s = engine.settings.debug_batch_delay_ms / 1000.0
        try:
            while True:
                stop.wait(delay_s)  # test only: each word comes this late (returns at once when stopped)
                try:
                    if should_stop():
                        raise GenerationCancelled("stopped between two words")
                    word = next(words)
                except StopIteration as end:
                    emit(("done", end.value, cache_hit, encode_ms))
                    return
                except GenerationCancelled:
                    if stop.is_set():
                        engine.metrics.streams_cancelled.inc()
                        logger.info("streamed caption cancelled: the client left")
                    else:
                        timeout = engine.settings.request_timeout_s
                        emit(("error", ApiError(504, "timeout", f"no complete caption within {timeout:g} s")))
                    return
                emit(("word", word))
        finally:
            words.close()
    except Exception as exc:  # noqa: BLE001 - reported to the client as an `error` event, logged here
        logger.exception("streamed caption failed")
        emit(("error", exc))


def _error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ApiError):
        return {"code": exc.code, "message": exc.message}
    return {"code": "internal_error", "message": "internal server error"}
