"""Streamed captions as Server-Sent Events: a `word` event per completed word, then `done` (or `error`).

Decoding is greedy: a beam's words are only known once the search ends, so `num_beams` > 1 is refused (422).
Each stream decodes in a thread of its own (`server.threads`) while holding a queue slot (429 when none is
free), on the image embedding from the cache. The response starts with the first word, so what fails before it is a
plain JSON error. The client leaving (even before the first event), or the request timeout, stops the decoding
before its next decoder step; the metrics and the access log count such a stream as 499 or 504.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pixelllm import GenerationCancelled

from .errors import ApiError, client_gone, invalid, model_error
from .inference import Job, ms_since
from .requestlog import OUTCOME_STATUS
from .schemas import CaptionParams, CaptionResponse, ErrorBody, ErrorResponse, ImageInfo
from .service import Engine, caption_result, check_box, check_point, disconnected, open_image, word_results
from .threads import in_new_thread

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
    """`/v1/caption` as a stream. Bad input, a full queue, a model not ready, and a failure or the timeout before
    the first word are plain JSON errors (the stream has not started); after it, an `error` event ends the stream."""
    start = time.perf_counter()
    if params.num_beams != 1:
        raise invalid("num_beams", GREEDY_ONLY)
    release = engine.hold_slot()  # before decoding the image, as `Engine.slot`
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    stop = threading.Event()
    deadline = time.monotonic() + engine.settings.request_timeout_s

    def emit(item: tuple[Any, ...]) -> None:
        loop.call_soon_threadsafe(items.put_nowait, item)

    try:  # a thread of its own (`server.threads`), holding the queue slot until it ends (so at most max_queue)
        job, width, height, decode_ms = await open_image(engine, data)
        box = check_box("box", params.box, width, height) if params.box else None
        point = check_point("point", params.point, width, height) if params.point else None
        args = (engine, job, box, point, params.max_new_tokens, emit, stop, deadline)
        decoding = in_new_thread(_decode, *args, name="pixelllm-stream")
    except BaseException:
        release()
        raise
    decoding.add_done_callback(lambda _: release())
    first = await _first_event(request, items, stop, deadline, engine.settings.request_timeout_s)
    outcome: dict[str, int] = {}

    async def events() -> AsyncIterator[str]:
        first_word_ms = None
        kind, *item = first
        while True:
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
                outcome["status"] = 200
                yield sse("done", response.model_dump_json())
                return
            else:
                error = _api_error(item[0])
                outcome["status"] = error.status
                yield sse(
                    "error", ErrorResponse(error=ErrorBody(code=error.code, message=error.message)).model_dump_json()
                )
                return
            kind, *item = await items.get()

    return StoppingStream(stop, outcome, events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _first_event(
    request: Request, items: asyncio.Queue[tuple[Any, ...]], stop: threading.Event, deadline: float, timeout_s: float
) -> tuple:
    """The decoding's first item, before the response starts: an error then is a plain JSON error, as is the
    timeout (504 at `deadline`, however long the image's encoding or a decoder step takes), and a client gone
    meanwhile is 499 (the decoding stops)."""
    first = asyncio.ensure_future(items.get())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        wait_s = max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait({first, gone}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request was cancelled (a shutdown): stop the decoding
        first.cancel()
        stop.set()
        raise
    finally:
        gone.cancel()
    if first not in done:
        first.cancel()
        if gone in done:  # the client left: stop the decoding
            stop.set()
            raise client_gone()
        # past the deadline: the decoding stops at its next step by itself, as a timeout
        raise ApiError(504, "timeout", f"no complete caption within {timeout_s:g} s")
    item = first.result()
    if item[0] == "error":
        raise _api_error(item[1])
    return item


class StoppingStream(StreamingResponse):
    """A `StreamingResponse` that sets `stop` once it ends for any reason: done, the client gone (even before the
    first event, when Starlette cancels the response before it iterates the events at all), or an error. Its
    status line said 200 before it ran; the metrics and the access log count its outcome (`OUTCOME_STATUS`):
    `outcome["status"]` as the events set it (200 done, the error's status), 500 if they raised, else 499 (the
    client left)."""

    def __init__(self, stop: threading.Event, outcome: dict[str, int], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop, self.outcome = stop, outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # a send that failed (ASGI 2.4): the client left
            raise
        except Exception:
            self.outcome.setdefault("status", 500)  # our failure, not the client leaving
            raise
        finally:
            self.stop.set()
            scope.setdefault("state", {})[OUTCOME_STATUS] = self.outcome.get("status", 499)


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


def _api_error(exc: BaseException) -> ApiError:
    """The client's view of a decoding failure: an `ApiError` as it is, anything else the model's failure (500)."""
    return exc if isinstance(exc, ApiError) else model_error()
