"""The model side of the service: load it once, and answer a batch of jobs with batched model calls."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pixelllm.transforms import DecodedImage

from .cache import EmbeddingCache
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one request asks about one image: caption prompts and texts to localize."""

    key: str
    image: DecodedImage | None = None
    embedding: Any = None
    prompts: list[tuple[tuple[float, float, float, float] | None, tuple[float, float] | None]] = field(
        default_factory=list
    )
    max_new_tokens: int | None = None  # None: the model's max_text_tokens
    num_beams: int = 1
    texts: list[str] = field(default_factory=list)
    mask: bool = False
    dense: tuple[float, float, int] | None = None  # score_threshold, nms_iou, max_regions
    # set when nobody waits for the answer any more (timeout, client gone): `run_jobs` skips or stops its work
    abandoned: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


@dataclass
class JobResult:
    captions: list[Any]
    localizations: list[Any]
    cache_hit: bool
    timing_ms: dict[str, float]
    regions: list[Any] = field(default_factory=list)


def load_predictor(settings: Settings) -> tuple[Any, str]:
    """The `Predictor` for the configured model, on the configured device and dtype, and the model's name."""
    import torch

    from pixelllm import Predictor
    from pixelllm.build import load_model
    from pixelllm.memory import keep_freed_memory

    if settings.keep_freed_memory:
        keep_freed_memory()
    spec = settings.resolved_model()
    paths = {k: getattr(settings, k) for k in ("sam_checkpoint", "eva_checkpoint", "t5_path")}
    model = load_model(spec, quantize=settings.quantize, **{k: v for k, v in paths.items() if v})
    device = settings.device
    if device == "auto":  # int8 runs on the CPU only
        device = "cuda" if torch.cuda.is_available() and settings.quantize == "none" else "cpu"
    model = model.to(device=device, dtype=getattr(torch, settings.dtype)).eval()
    model.set_lora_merged(True)  # the service only infers: fold LoRA into the base weights once
    language = "int8" if model.language_model.quantized else settings.dtype
    logger.info(
        "loaded model %s from %s on %s (%s, language model %s)", model.name, spec, device, settings.dtype, language
    )
    return Predictor(model), model.name


def ms_since(start: float) -> float:
    """Milliseconds since `start`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - start) * 1000.0


def run_jobs(
    predictor: Any,
    cache: EmbeddingCache,
    jobs: list[Job],
    delay_s: float = 0.0,
    on_abandoned: Callable[[int], None] = lambda count: None,
) -> list[JobResult]:
    """Answer `jobs` with one encoder pass over the images not in the cache, one caption call per
    (max_new_tokens, num_beams), one localization call per mask flag and one dense-caption call per setting
    (a job's max_new_tokens None is the model's max_text_tokens: the same call as that number given).

    Abandoned jobs (`Job.abandoned`) are left out of every step that starts after they were abandoned, and a
    caption or dense call whose jobs are all abandoned stops at its next decoder step. Their results stay
    empty; `on_abandoned(count)` reports how many jobs of the batch were abandoned.
    """
    from pixelllm import GenerationCancelled

    batch_start = time.perf_counter()
    if delay_s:
        time.sleep(delay_s)
    results = [JobResult([None] * len(j.prompts), [None] * len(j.texts), True, {}) for j in jobs]

    embeddings: dict[str, Any] = {}
    to_encode: dict[str, DecodedImage] = {}
    for job in _live(jobs):
        found = job.embedding if job.embedding is not None else cache.get(job.key)
        if found is not None:
            embeddings[job.key] = found
        elif job.key not in to_encode:
            to_encode[job.key] = job.image
    encode_ms = 0.0
    if to_encode:
        start = time.perf_counter()
        for key, emb in zip(to_encode, predictor.embed_batch(list(to_encode.values()))):
            embeddings[key] = emb
            cache.put(key, emb)
        encode_ms = ms_since(start)
    for job, result in zip(jobs, results):
        result.cache_hit = job.key not in to_encode
        result.timing_ms["encode"] = 0.0 if result.cache_hit else encode_ms

    length = predictor.model.decoding_length
    caption_groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for j, job in enumerate(jobs):
        for p in range(len(job.prompts)):
            caption_groups[(length(job.max_new_tokens), job.num_beams)].append((j, p))
    for (max_new_tokens, num_beams), members in caption_groups.items():
        members = [(j, p) for j, p in members if not jobs[j].abandoned.is_set()]
        if not members:
            continue
        start = time.perf_counter()
        try:
            captions = predictor.caption_embeddings(
                [embeddings[jobs[j].key] for j, _ in members],
                boxes=[jobs[j].prompts[p][0] for j, p in members],
                points=[jobs[j].prompts[p][1] for j, p in members],
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                should_stop=partial(_all_abandoned, [jobs[j] for j, _ in members]),
            )
        except GenerationCancelled:
            continue
        _scatter(results, members, captions, "captions", "caption", ms_since(start))

    localize_groups: dict[bool, list[tuple[int, int]]] = defaultdict(list)
    for j, job in enumerate(jobs):
        for t in range(len(job.texts)):
            localize_groups[job.mask].append((j, t))
    for mask, members in localize_groups.items():
        members = [(j, t) for j, t in members if not jobs[j].abandoned.is_set()]
        if not members:
            continue
        start = time.perf_counter()
        locs = predictor.localize_embeddings(
            [embeddings[jobs[j].key] for j, _ in members], texts=[jobs[j].texts[t] for j, t in members], mask=mask
        )
        _scatter(results, members, locs, "localizations", "localize", ms_since(start))

    dense_groups: dict[tuple, list[int]] = defaultdict(list)
    for j, job in enumerate(jobs):
        if job.dense is not None:
            dense_groups[(job.dense, length(job.max_new_tokens), job.num_beams)].append(j)
    for ((score_threshold, nms_iou, max_regions), max_new_tokens, num_beams), members in dense_groups.items():
        members = [j for j in members if not jobs[j].abandoned.is_set()]
        if not members:
            continue
        start = time.perf_counter()
        try:
            found = predictor.dense_caption_embeddings(
                [embeddings[jobs[j].key] for j in members],
                score_threshold,
                nms_iou,
                max_regions,
                max_new_tokens,
                num_beams,
                should_stop=partial(_all_abandoned, [jobs[j] for j in members]),
            )
        except GenerationCancelled:
            continue
        for j, regions in zip(members, found):
            results[j].regions = regions
            results[j].timing_ms["dense"] = ms_since(start)

    abandoned = sum(job.abandoned.is_set() for job in jobs)
    if abandoned:
        logger.info(
            "%d of %d jobs in this batch were abandoned by their callers; steps not yet started were skipped for them",
            abandoned,
            len(jobs),
        )
        on_abandoned(abandoned)
    batch_ms = ms_since(batch_start)
    for result in results:
        result.timing_ms["batch"] = batch_ms
    return results


def _live(jobs: list[Job]) -> list[Job]:
    return [job for job in jobs if not job.abandoned.is_set()]


def _all_abandoned(jobs: list[Job]) -> bool:
    return all(job.abandoned.is_set() for job in jobs)


def _scatter(
    results: list[JobResult], members: list[tuple[int, int]], outputs: list[Any], attr: str, timing: str, ms: float
) -> None:
    """Put the outputs of one batched call back into the jobs they came from."""
    if len(outputs) != len(members):
        raise RuntimeError(f"model returned {len(outputs)} outputs for {len(members)} prompts")
    for (j, i), output in zip(members, outputs):
        getattr(results[j], attr)[i] = output
        results[j].timing_ms[timing] = ms


class InjectedFault(RuntimeError):
    """What `debug_fail_model_every` makes the model raise."""


class FailEvery:
    """Test only: `process`, except that every `n`th call raises `InjectedFault`, as a model that crashes would.

    Calls come from the batcher's single worker thread, so the count needs no lock.
    """

    def __init__(self, process: Callable[[list[Job]], list[JobResult]], n: int) -> None:
        self.process, self.n, self.calls = process, n, 0

    def __call__(self, jobs: list[Job]) -> list[JobResult]:
        self.calls += 1
        if self.calls % self.n == 0:
            raise InjectedFault(f"injected model failure on call {self.calls} (debug_fail_model_every={self.n})")
        return self.process(jobs)
