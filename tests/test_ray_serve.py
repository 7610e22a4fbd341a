"""Ray Serve scale-out: `pixelllm serve --ray` with 2 replicas answers as the single-process server does."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
from server_fixtures import MAIN_SETTINGS
from server_helpers import (
    DEFAULT_MODEL_DIR,
    ROOT,
    ServerProcess,
    answers,
    assert_same,
    metric,
    send_all,
    settings_env,
)

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install -e '.[ray]'")

REPLICA_LINE = re.compile(r"\(ServeReplica:pixelllm:PixelLLM pid=(\d+)\).* POST /v1/\w+ 200 ")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """`pixelllm serve --ray` with 2 replicas of the default model on a new local Ray of its own, and the
    single-process server of the same model and settings; started together."""
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = settings_env(DEFAULT_MODEL_DIR, **MAIN_SETTINGS, ray_replicas=2, ray_num_cpus=1)
    env |= {"RAY_TMPDIR": ray_dir, "RAY_DEDUP_LOGS": "0"}
    start = time.monotonic()
    on_ray = ServerProcess(env, tmp_path_factory.mktemp("ray") / "serve.log", ("-m", "pixelllm.cli", "serve", "--ray"))
    alone = ServerProcess(
        settings_env(DEFAULT_MODEL_DIR, **MAIN_SETTINGS), tmp_path_factory.mktemp("single") / "server.log"
    )
    try:
        alone.wait_ready()
        on_ray.wait_ready(timeout_s=240)
        wait_for_line(on_ray, "Application 'pixelllm' is ready")  # Ray's word that every replica is up
        print(f"Ray Serve ready after {time.monotonic() - start:.0f} s")
        yield on_ray, alone
        start = time.monotonic()
        on_ray.stop()
        print(f"Ray Serve stopped in {time.monotonic() - start:.0f} s")
        alone.stop()
    finally:
        on_ray.terminate()
        alone.terminate()
        shutil.rmtree(ray_dir, ignore_errors=True)


def wait_for_line(proc: ServerProcess, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in proc.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{proc.log()[-4000:]}"
        time.sleep(0.5)


def replicas_that_answered(proc: ServerProcess, requests: int, timeout_s: float = 20.0) -> set[str]:
    """Replica pids in the access lines Ray forwards to the driver's log (they arrive a little later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = REPLICA_LINE.findall(proc.log())
        if len(lines) >= requests or time.monotonic() > deadline:
            return set(lines)
        time.sleep(0.5)


def test_two_replicas_answer_as_the_single_process_server(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """24 varied requests (caption, box, point, localize, regions on 8 images) from 8 clients at once."""
    ray_service, single_service = servers
    indices = list(range(24))
    on_ray = asyncio.run(send_all(ray_service.url, indices, concurrency=8))
    alone = asyncio.run(send_all(single_service.url, indices, concurrency=8))
    assert [r.status_code for r in on_ray] == [200] * len(indices), [r.text[:200] for r in on_ray]
    assert [r.status_code for r in alone] == [200] * len(indices)
    assert all(r.json()["model"] == "pixelllm-tiny" for r in on_ray)
    assert len([c for r in on_ray for c in answers(r) if c.get("caption")]) >= 8, "empty captions prove nothing"
    for i, (a, b) in enumerate(zip(on_ray, alone)):
        assert_same(answers(b), answers(a), f"request {i}")
    assert len(replicas_that_answered(ray_service, len(indices))) == 2


def test_serve_batch_gathers_concurrent_requests(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """Each replica's `/metrics` counts its own batches: with 8 clients, some batch holds several requests."""
    ray_service, _ = servers
    asyncio.run(send_all(ray_service.url, list(range(100, 116)), concurrency=8))
    with httpx.Client(base_url=ray_service.url, timeout=30) as client:
        seen = [client.get("/metrics").text for _ in range(8)]
    batched = [metric(t, "pixelllm_batch_size_sum") - metric(t, "pixelllm_batch_size_count") for t in seen]
    assert max(batched) > 0, "every batch held one request: @serve.batch did not batch"


def test_serve_config_builds_the_app() -> None:
    """deploy/ray-serve.yaml passes Ray's schema, names our deployment, and its args build the application."""
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from server import Settings
    from server.ray_app import DEPLOYMENT_NAME, build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "server.ray_app:build_app"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
    assert isinstance(build_app(app.args), Application)
    settings = Settings(**app.args)  # Ray's proxy answers its own timeout in plain text: the app's come first
    assert config.http_options.request_timeout_s > settings.body_timeout_s + settings.request_timeout_s


def test_the_replicas_get_every_local_path_absolute(tmp_path, monkeypatch) -> None:
    """A replica runs in the directory its cluster started in: relative paths that exist here travel absolute (only
    the model's did; a relative checkpoint or keys file was not found there). Preset names stay names."""
    from server import Settings
    from server.ray_app import application

    monkeypatch.chdir(tmp_path)
    for name in ("sam.pth", "eva.safetensors", "keys.txt"):
        (tmp_path / name).touch()
    (tmp_path / "flan-t5").mkdir()
    given = Settings(
        model="pixelllm-tiny",
        sam_checkpoint="sam.pth",
        eva_checkpoint="eva.safetensors",
        t5_path="flan-t5",
        api_keys_file="keys.txt",
    )
    (sent,) = application(given)._bound_deployment.init_args
    assert sent["model"] == "pixelllm-tiny"
    assert sent["sam_checkpoint"] == str(tmp_path / "sam.pth") and sent["t5_path"] == str(tmp_path / "flan-t5")
    assert sent["eva_checkpoint"] == str(tmp_path / "eva.safetensors")
    assert sent["api_keys_file"] == tmp_path / "keys.txt"
    (sent,) = application(Settings(model="pixelllm-tiny", t5_path=""))._bound_deployment.init_args
    assert sent["t5_path"] == ""  # unset, as the single-process server takes it: not the working directory


def test_replicas_or_autoscaling_from_settings() -> None:
    from server import Settings
    from server.ray_app import deployment_options

    fixed = deployment_options(Settings(ray_replicas=3, ray_num_gpus=0.5))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    auto = deployment_options(Settings(ray_min_replicas=2, ray_max_replicas=6, max_batch_size=16))
    assert auto["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16}
    assert "num_replicas" not in auto


def test_a_replica_runs_every_batch_on_one_thread() -> None:
    """Torch work stays on one long-lived thread (`server.threads`): `ServeBatcher` keeps its own worker."""
    import threading

    from server.batching import BatcherClosed
    from server.ray_app import ServeBatcher

    threads: list[threading.Thread] = []

    def process(jobs: list[int]) -> list[int]:
        threads.append(threading.current_thread())
        return [job * 2 for job in jobs]

    async def main() -> tuple[list[list[int]], threading.Thread]:
        other = await asyncio.to_thread(threading.current_thread)  # the loop's shared pool now has an idle thread
        batcher = ServeBatcher(process, max_batch_size=4, max_wait_s=0.01, on_batch=lambda size, seconds: None)
        results = [await batcher.run_batch([1, 2]), await batcher.run_batch([3])]
        await batcher.close()
        with pytest.raises(BatcherClosed):  # the service answers 503 shutting_down
            await batcher.submit(4)
        return results, other

    results, shared_pool_thread = asyncio.run(main())
    assert results == [[2, 4], [6]]
    assert len(threads) == 2 and threads[0] is threads[1]
    assert threads[0] not in (threading.main_thread(), shared_pool_thread)
