"""What the endpoints do, as plain functions over an `Engine` (model, batcher, cache, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import unicodedata
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .batching import Batcher, BatcherClosed, DynamicBatcher, QueueFull
from .cache import EmbeddingCache
from .errors import ApiError, client_gone, invalid, model_error
from .images import decode_image, image_key
from .inference import FailEvery, Job, JobResult, load_predictor, ms_since, run_jobs
from .masks import encode_mask
from .metrics import Metrics
from .schemas import (
    Box,
    BoxPrompt,
    CaptionParams,
    CaptionResponse,
    CaptionResult,
    DenseParams,
    DenseRegion,
    DenseResponse,
    ImageInfo,
    Localization,
    LocalizeParams,
    LocalizeResponse,
    MaskFormat,
    Point,
    PointPrompt,
    RegionsParams,
    RegionsResponse,
    Word,
)
from .settings import Settings
from .threads import in_new_thread

logger = logging.getLogger(__name__)
LINE_BREAKS = str.maketrans("\t\n\r\u2028\u2029", "     ")  # tabs and line breaks, Unicode's separators too
NFC_MAX_SHRINK = 4  # NFC composes at most 4 code points into one (the longest canonical decomposition)


class Engine:
    """The loaded model behind a dynamic batcher, the embedding cache, and readiness."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.cache = EmbeddingCache(settings.cache_entries, settings.cache_bytes)
        metrics.cache_bytes.set_function(lambda: self.cache.nbytes)  # read at each scrape, whoever filled it
        metrics.cache_entries.set_function(lambda: len(self.cache))
        self.batcher: Batcher[Job, JobResult] | None = None
        self.model_name: str | None = None
        self.load_error: str | None = None
        self.predictor: Any = None
        self._loading: asyncio.Task | None = None
        self.on_load_error: Callable[[str], None] = lambda message: None  # `run` stops the server

    async def start(self) -> None:
        """Load the model in the background; until it is loaded the service answers 503."""
        self._loading = asyncio.create_task(self.load())

    async def load(self) -> None:
        """Load the model and make the batcher; on failure `load_error` says why."""
        await asyncio.sleep(self.settings.debug_load_delay_ms / 1000.0)
        try:
            predictor, self.model_name = await in_new_thread(load_predictor, self.settings, name="pixelllm-load")
        except Exception as exc:
            self.load_error = f"the model failed to load: {type(exc).__name__}: {exc}"
            if isinstance(exc, (ValueError, OSError)):  # a bad checkpoint or path: the message says it all
                logger.error("%s", self.load_error)
            else:
                logger.exception("the model failed to load")
            self.on_load_error(self.load_error)
            return
        self.predictor = predictor
        delay_s = self.settings.debug_batch_delay_ms / 1000.0
        process = partial(
            run_jobs, predictor, self.cache, delay_s=delay_s, on_abandoned=self.metrics.jobs_abandoned.inc
        )
        if self.settings.debug_fail_model_every:
            process = FailEvery(process, self.settings.debug_fail_model_every)
        self.batcher = self.make_batcher(process)

    def make_batcher(self, process: Callable[[list[Job]], list[JobResult]]) -> Batcher[Job, JobResult]:
        """The in-process dynamic batcher over `process`; the Ray Serve engine batches with `@serve.batch`."""
        s = self.settings
        batcher = DynamicBatcher(
            process,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_batch_wait_ms / 1000.0,
            max_queue=s.max_queue,
            on_batch=self.on_batch,
            on_depth=self.metrics.queue_depth.set,
        )
        batcher.start()
        return batcher

    def on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    async def stop(self) -> None:
        """Finish queued work, then stop the batcher."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.batcher is not None:
            await self.batcher.close(timeout_s=self.settings.request_timeout_s)

    def require_ready(self) -> None:
        """503 `not_ready` (with Retry-After) while the model loads, `load_failed` (retrying won't help) if it failed."""
        if self.load_error:
            raise ApiError(503, "load_failed", self.load_error)
        if self.batcher is None:
            raise ApiError(503, "not_ready", "the model is still loading", {"Retry-After": "5"})

    def hold_slot(self) -> Callable[[], None]:
        """One queue slot (429 if the queue is full, 503 if not ready); call the result to free it."""
        self.require_ready()
        if not isinstance(self.batcher, DynamicBatcher):
            return lambda: None  # Ray Serve bounds a replica's requests itself (ray_max_ongoing_requests)
        try:
            return self.batcher.hold()
        except (QueueFull, BatcherClosed) as exc:
            raise busy_error(exc) from None

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A queue slot for one request, from before its image is decoded until it is answered: a full queue is a
        429 before any decoding, and the queue keeps at most `max_queue` decoded images."""
        release = self.hold_slot()
        try:
            yield
        finally:
            release()

    async def run(self, request: Request, job: Job, started: float) -> JobResult:
        """`job`'s result from the batcher, in the slot the caller holds (`slot`): 504 once `request_timeout_s` has
        passed since `started` (the handler's `time.perf_counter()`: decoding the image counts), 499 if the client
        left."""
        self.require_ready()
        assert self.batcher is not None
        left_s = self.settings.request_timeout_s - (time.perf_counter() - started)
        if left_s <= 0:  # decoding the image took all the time: the model never sees it
            raise self.timeout_error()
        answer = asyncio.ensure_future(self.batcher.submit(job, held=True))
        gone = asyncio.ensure_future(disconnected(request))
        done: set[asyncio.Future] = set()
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=left_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            answer.cancel()
            if answer not in done:
                job.abandoned.set()  # nobody will read the answer: its batch skips or stops the work
        if answer in done:
            try:
                result = answer.result()
            except (QueueFull, BatcherClosed) as exc:
                raise busy_error(exc) from None
            except Exception as exc:  # the model raised on this job; others are unharmed
                logger.error("model call failed", exc_info=exc)  # here, the line carries the request's ID
                raise model_error() from exc
            (self.metrics.cache_hits if result.cache_hit else self.metrics.cache_misses).inc()
            return result
        if gone in done:
            raise client_gone()
        raise self.timeout_error()

    def timeout_error(self) -> ApiError:
        return ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s:g} s")


def busy_error(exc: QueueFull | BatcherClosed) -> ApiError:
    """429 for a full queue, 503 while shutting down."""
    if isinstance(exc, QueueFull):
        return ApiError(429, "queue_full", "too many requests in flight; retry later", {"Retry-After": "1"})
    return ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _open_image(engine: Engine, data: bytes) -> tuple[Job, int, int]:
    """A job for the image: its cached embedding if any, else the decoded image (in a worker thread)."""
    key = image_key(data)
    embedding = engine.cache.get(key)
    if embedding is not None:
        height, width = embedding.original_size
        return Job(key=key, embedding=embedding), int(width), int(height)
    s = engine.settings
    image_size = engine.predictor.model.cfg.image_size if engine.predictor is not None else None
    image = decode_image(data, s.max_image_pixels, s.max_image_aspect, image_size)
    if s.debug_decode_delay_ms:
        time.sleep(s.debug_decode_delay_ms / 1000.0)
    return Job(key=key, image=image), image.width, image.height


async def open_image(engine: Engine, data: bytes) -> tuple[Job, int, int, float]:
    start = time.perf_counter()
    job, width, height = await run_in_threadpool(_open_image, engine, data)
    return job, width, height, ms_since(start)


def check_box(field: str, box: BoxPrompt, width: int, height: int) -> tuple[float, float, float, float]:
    if box.x1 > width or box.y1 > height:
        raise invalid(field, f"box ({box.x0:g},{box.y0:g},{box.x1:g},{box.y1:g}) is outside the {width}x{height} image")
    return box.as_tuple()


def check_point(field: str, point: PointPrompt, width: int, height: int) -> tuple[float, float]:
    if point.x > width or point.y > height:
        raise invalid(field, f"point ({point.x:g},{point.y:g}) is outside the {width}x{height} image")
    return point.as_tuple()


def clean_text(field: str, text: str) -> str:
    """`text` in Unicode NFC with tabs and line breaks as spaces; 422 for any other control, format
    (zero-width, bidi override), private-use or unassigned character."""
    text = unicodedata.normalize("NFC", text).translate(LINE_BREAKS)
    for i, char in enumerate(text):
        if unicodedata.category(char).startswith("C"):
            raise invalid(field, f"character U+{ord(char):04X} at {i} is a control or invisible character; remove it")
    return text


def check_texts(field: str, texts: list[str], engine: Engine, indexed: bool = False) -> list[str]:
    """The texts cleaned by `clean_text`; 422 naming the field for none, too many, empty or long ones (in
    characters, or in tokens for the loaded model): `field.i` where the field is a list (`indexed`) or holds
    several."""
    settings = engine.settings
    if not texts:
        raise invalid(field, "give at least one text")
    if len(texts) > settings.max_texts:
        raise invalid(field, f"at most {settings.max_texts} texts, got {len(texts)}")
    cleaned = []
    for i, text in enumerate(texts):
        name = f"{field}.{i}" if indexed or len(texts) > 1 else field
        if len(text) > NFC_MAX_SHRINK * settings.max_text_chars:  # too long however it composes: skip the work
            raise invalid(name, f"text is {len(text)} characters; at most {settings.max_text_chars}")
        text = clean_text(name, text)
        if not text.strip():
            raise invalid(name, "text is empty")
        if len(text) > settings.max_text_chars:
            raise invalid(name, f"text is {len(text)} characters; at most {settings.max_text_chars}")
        if engine.predictor is not None:  # loaded (the routes require it ready first)
            try:
                engine.predictor.check_text(text)
            except ValueError as e:
                raise invalid(name, str(e)) from None
        cleaned.append(text)
    return cleaned


def _num(value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    value = float(value)
    return min(max(value, low), high) if math.isfinite(value) else 0.0


def _box(box: Any, width: int, height: int) -> tuple[Box, Box]:
    x0, y0, x1, y1 = (_num(v) for v in box)
    return Box(x0=x0, y0=y0, x1=x1, y1=y1), Box(x0=x0 / width, y0=y0 / height, x1=x1 / width, y1=y1 / height)


def word_results(words: list[Any], width: int, height: int) -> list[Word]:
    out = []
    for w in words:
        x, y = (_num(v) for v in w.point)
        box, box_norm = _box(w.box, width, height)
        point, point_norm = Point(x=x, y=y), Point(x=x / width, y=y / height)
        out.append(
            Word(
                text=w.text,
                start=w.start,
                end=w.end,
                point=point,
                point_norm=point_norm,
                box=box,
                box_norm=box_norm,
                regressed_box=_box(w.regressed_box, width, height)[0] if w.regressed_box is not None else None,
                generated_text=w.generated_text,
                score=_num(w.score, 0.0, 1.0),
            )
        )
    return out


def caption_result(
    caption: Any, box: BoxPrompt | None, point: PointPrompt | None, width: int, height: int
) -> CaptionResult:
    return CaptionResult(
        caption=caption.text,
        words=word_results(caption.words, width, height),
        score=_num(caption.score, 0.0, 1.0),
        box=box,
        point=point,
    )


def _localization(loc: Any, fmt: MaskFormat | None, width: int, height: int) -> Localization:
    box, box_norm = _box(loc.box, width, height)
    mask = encode_mask(loc.mask, fmt) if fmt is not None and loc.mask is not None else None
    return Localization(
        text=loc.text,
        box=box,
        box_norm=box_norm,
        regressed_box=_box(loc.regressed_box, width, height)[0] if loc.regressed_box is not None else None,
        score=_num(loc.score, 0.0, 1.0),
        words=word_results(loc.words, width, height),
        mask=mask,
    )


def _common(
    engine: Engine, result: JobResult, width: int, height: int, decode_ms: float, run_ms: float, start: float
) -> dict[str, Any]:
    timing = {"decode": decode_ms, "queue": max(run_ms - result.timing_ms["batch"], 0.0), **result.timing_ms}
    timing["total"] = ms_since(start)
    return dict(
        image=ImageInfo(width=width, height=height),
        model=engine.model_name,
        cache_hit=result.cache_hit,
        timing_ms=timing,
    )


async def _answer(engine: Engine, request: Request, job: Job, started: float) -> tuple[JobResult, float]:
    """`Engine.run`'s result and the milliseconds it took; the request timeout counts from `started`."""
    start = time.perf_counter()
    result = await engine.run(request, job, started)
    return result, ms_since(start)


async def caption(engine: Engine, request: Request, data: bytes, params: CaptionParams) -> CaptionResponse:
    start = time.perf_counter()
    with engine.slot():
        job, width, height, decode_ms = await open_image(engine, data)
        box = check_box("box", params.box, width, height) if params.box else None
        point = check_point("point", params.point, width, height) if params.point else None
        job.prompts, job.max_new_tokens, job.num_beams = [(box, point)], params.max_new_tokens, params.num_beams
        result, run_ms = await _answer(engine, request, job, start)
    body = caption_result(result.captions[0], params.box, params.point, width, height)
    return CaptionResponse(**body.model_dump(), **_common(engine, result, width, height, decode_ms, run_ms, start))


async def localize(engine: Engine, request: Request, data: bytes, params: LocalizeParams) -> LocalizeResponse:
    start = time.perf_counter()
    engine.require_ready()  # the texts' tokens are counted by the model's tokenizer
    texts = check_texts("text", params.texts(), engine)
    with engine.slot():
        job, width, height, decode_ms = await open_image(engine, data)
        job.texts, job.mask = texts, params.mask
        result, run_ms = await _answer(engine, request, job, start)
    fmt = params.mask_format if params.mask else None
    results = await run_in_threadpool(lambda: [_localization(loc, fmt, width, height) for loc in result.localizations])
    return LocalizeResponse(results=results, **_common(engine, result, width, height, decode_ms, run_ms, start))


async def regions(engine: Engine, request: Request, data: bytes, params: RegionsParams) -> RegionsResponse:
    start = time.perf_counter()
    s = engine.settings
    count = len(params.boxes) + len(params.points) + len(params.texts)
    if count == 0:
        raise invalid("boxes", "give at least one box, point or text")
    if count > s.max_regions:
        given = "+".join(name for name in ("boxes", "points", "texts") if getattr(params, name))
        raise invalid(given, f"at most {s.max_regions} boxes, points and texts together, got {count}")
    engine.require_ready()  # the texts' tokens are counted by the model's tokenizer
    texts = check_texts("texts", params.texts, engine, indexed=True) if params.texts else []
    with engine.slot():
        job, width, height, decode_ms = await open_image(engine, data)
        boxes = [check_box(f"boxes.{i}", b, width, height) for i, b in enumerate(params.boxes)]
        points = [check_point(f"points.{i}", p, width, height) for i, p in enumerate(params.points)]
        job.prompts = [(b, None) for b in boxes] + [(None, p) for p in points]
        job.max_new_tokens, job.num_beams, job.texts = params.max_new_tokens, params.num_beams, texts
        job.mask = params.mask
        result, run_ms = await _answer(engine, request, job, start)
    prompts = [(b, None) for b in params.boxes] + [(None, p) for p in params.points]
    captions = [caption_result(c, b, p, width, height) for c, (b, p) in zip(result.captions, prompts)]
    fmt = params.mask_format if params.mask else None
    locs = await run_in_threadpool(lambda: [_localization(loc, fmt, width, height) for loc in result.localizations])
    return RegionsResponse(
        captions=captions, localizations=locs, **_common(engine, result, width, height, decode_ms, run_ms, start)
    )


async def dense(engine: Engine, request: Request, data: bytes, params: DenseParams) -> DenseResponse:
    start = time.perf_counter()
    if getattr(engine.predictor.model, "proposal_head", None) is None:
        raise ApiError(
            501, "not_supported", f"model {engine.model_name} has no proposal head: serve a dense-captioning model"
        )
    max_regions = min(params.max_regions, engine.settings.max_regions)
    with engine.slot():
        job, width, height, decode_ms = await open_image(engine, data)
        job.dense = (params.score_threshold, params.nms_iou, max_regions)
        job.max_new_tokens, job.num_beams = params.max_new_tokens, params.num_beams
        result, run_ms = await _answer(engine, request, job, start)
    regions = []
    for r in result.regions:
        box, box_norm = _box(r.box, width, height)
        words = word_results(r.caption.words, width, height)
        regions.append(
            DenseRegion(box=box, box_norm=box_norm, score=_num(r.score, 0.0, 1.0), caption=r.caption.text, words=words)
        )
    return DenseResponse(regions=regions, **_common(engine, result, width, height, decode_ms, run_ms, start))
