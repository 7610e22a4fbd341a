"""Scale-out on Ray Serve: every replica runs the app of `create_app`, its jobs batched by `@serve.batch`.

`pixelllm serve --ray` deploys it from the `PIXELLLM_*` settings on the Ray cluster this machine belongs to
(`RAY_ADDRESS`, or one started by `ray start`), else on a new local one; on a cluster, `serve deploy
deploy/ray-serve.yaml` deploys `build_app`. Replicas, resources and queue limits come from the `ray_*` settings.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from .app import create_app, serving_settings
from .batching import BatcherClosed, process_each
from .inference import Job, JobResult
from .service import Engine
from .settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "pixelllm"
DEPLOYMENT_NAME = "PixelLLM"


class ServeBatcher:
    """An `Engine` batcher on a replica: `@serve.batch` gathers concurrent jobs, `process` runs them in one
    worker thread (always the same: see `server.threads`)."""

    def __init__(
        self,
        process: Callable[[list[Job]], list[JobResult]],
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None],
    ) -> None:
        self.process, self.on_batch = process, on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelllm-batch")
        self._closed = False
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_s)(self.run_batch)

    async def run_batch(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, process_each, self.process, jobs)
        self.on_batch(len(jobs), time.monotonic() - start)
        return results

    async def submit(self, job: Job, held: bool = False) -> JobResult:
        """`job`'s result; a caller cancelled before its batch starts is left out of the batch. Raises
        `BatcherClosed` after `close` (`held` changes nothing: Ray Serve bounds a replica's requests itself)."""
        if self._closed:
            raise BatcherClosed
        result = await self._batched(job)
        if isinstance(result, BaseException):
            raise result
        return result

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs and stop the worker thread; Ray Serve drains a replica's requests before it stops it."""
        self._closed = True
        self._executor.shutdown(wait=False)


class RayEngine(Engine):
    """The engine of one replica: the model loads before the replica takes requests; `@serve.batch` batches."""

    async def start(self) -> None:
        await self.load()
        if self.load_error:
            raise RuntimeError(self.load_error)

    def make_batcher(self, process: Callable[[list[Job]], list[JobResult]]) -> ServeBatcher:
        s = self.settings
        return ServeBatcher(process, s.max_batch_size, s.max_batch_wait_ms / 1000.0, self.on_batch)


@serve.ingress()
class PixelLLMDeployment:
    """One replica: the same FastAPI app as `pixelllm serve`, on a `RayEngine`."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, RayEngine)


def deployment_options(settings: Settings) -> dict[str, Any]:
    """`serve.deployment` options from the `ray_*` settings: replicas or autoscaling, resources, queue limits."""
    s = settings
    options: dict[str, Any] = dict(
        name=DEPLOYMENT_NAME,
        ray_actor_options={"num_cpus": s.ray_num_cpus, "num_gpus": s.ray_num_gpus},
        max_ongoing_requests=s.ray_max_ongoing_requests,
        max_queued_requests=s.ray_max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
    )
    if s.ray_max_replicas is None:
        options["num_replicas"] = s.ray_replicas
    else:  # a replica with a full batch waiting is busy enough
        options["autoscaling_config"] = dict(
            min_replicas=s.ray_min_replicas, max_replicas=s.ray_max_replicas, target_ongoing_requests=s.max_batch_size
        )
    return options


PATH_SETTINGS = ("model", "sam_checkpoint", "eva_checkpoint", "t5_path", "api_keys_file")


def application(settings: Settings) -> Application:
    """The Serve application: `settings` travel to the replicas, every path that exists here made absolute (a
    replica runs in the directory its cluster started in)."""
    given = {"model": settings.resolved_model(), **{k: getattr(settings, k) for k in PATH_SETTINGS[1:]}}
    paths = {k: type(v)(Path(v).resolve()) for k, v in given.items() if v and Path(v).exists()}  # "" is unset
    settings = settings.model_copy(update={"model": given["model"], **paths})
    return serve.deployment(PixelLLMDeployment, **deployment_options(settings)).bind(settings.model_dump())


def build_app(args: dict[str, Any]) -> Application:
    """The `import_path` of a Serve config: `args` are settings (`model`, `max_batch_size`...) over `PIXELLLM_*`."""
    return application(Settings(**args))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    """Deploy on Ray Serve with HTTP on `host:port` and serve until SIGINT/SIGTERM; then delete the app."""
    settings = serving_settings(settings)
    ray.init()
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, whose handler would abort the process
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(settings), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        logger.info("shutting down the %s application", APP_NAME)
    finally:
        serve.delete(APP_NAME)
