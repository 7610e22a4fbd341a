"""The CPU image (docker/Dockerfile), built and run for real: it serves as a non-root user on a read-only root
filesystem, its HEALTHCHECK passes, and the baked-in model, or a mounted one, answers /v1/caption exactly as the
same weights do on the host.

Slow (the first build installs torch): `make docker-test`. It builds with `make docker-build`, so
`DOCKER_BUILD_FLAGS` from the environment apply. It skips, saying why, where no engine can run containers or the
base image cannot be pulled. The engine is podman where installed, else docker (`DOCKER` overrides).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import single_thread
from PIL import Image
from server_helpers import DEFAULT_MODEL_DIR, MAKE_MODEL, ROOT, free_port

from pixelllm import Predictor
from pixelllm.build import load_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# the engine's path: $DOCKER if it names one installed here (make passes "docker" when neither is), else podman
ENGINE = shutil.which(os.environ.get("DOCKER") or "podman") or shutil.which("docker")
IMAGE = os.environ.get("DOCKER_IMAGE", "pixelllm:cpu")
UID = "10001"  # the image's user
# what podman and docker print when the base image cannot be pulled (no registry access)
PULL_FAILED = ("initializing source docker://", "failed to resolve source metadata", "pull access denied")
# the settings `docker/compose.yaml` runs with, and one thread: the test machine may be busy
COMPOSE_FLAGS = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
RUN_FLAGS = (*COMPOSE_FLAGS, "-e", "OMP_NUM_THREADS=1")
MAX_NEW_TOKENS = 8


def engine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, list]:
    """The host's captions of the sample by the baked-in model and by a random one (to mount), taken before the
    build: both sides then run the same checkout, even one that changes while the image builds."""
    if ENGINE is None:
        pytest.skip("no container engine: install podman (daemonless) or docker")
    info = engine("info")
    if info.returncode:
        pytest.skip(f"{ENGINE} cannot run containers here (`{ENGINE} info` failed): {info.stderr.strip()[-300:]}")
    random_dir = tmp_path_factory.mktemp("model") / "random-tiny"
    # saved as a user with the usual umask saves it; the files must then be readable by the container's user
    # (safetensors alone writes the weights owner-only); pytest's folders are private, so open the mounted one
    save = [sys.executable, "-c", MAKE_MODEL, str(random_dir)]
    subprocess.run(save, cwd=ROOT, check=True, timeout=300, preexec_fn=lambda: os.umask(0o022))
    random_dir.chmod(0o755)
    data = sample_png()
    return {DEFAULT_MODEL_DIR: host_caption(DEFAULT_MODEL_DIR, data), random_dir: host_caption(random_dir, data)}


@pytest.fixture(scope="module")
def image(expected: dict[Path, list]) -> str:
    """The image, built from this checkout (the layer cache makes an unchanged rebuild take seconds)."""
    build = subprocess.run(
        ["make", "docker-build", f"DOCKER={ENGINE}", f"DOCKER_IMAGE={IMAGE}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    log = build.stdout + build.stderr
    if build.returncode and any(marker in log for marker in PULL_FAILED):
        pytest.skip(
            'the base image cannot be pulled here: build on a local one, DOCKER_BUILD_FLAGS="--build-arg BASE=..."'
        )
    assert build.returncode == 0, log[-4000:]
    return IMAGE


@contextmanager
def container(image: str, *flags: str) -> Iterator[tuple[str, httpx.Client]]:
    """A container of `image` run like docker/compose.yaml runs it; its id and a client once /readyz answers."""
    port = free_port()
    run = engine("run", "-d", *RUN_FLAGS, "-p", f"127.0.0.1:{port}:8000", *flags, image)
    assert run.returncode == 0, run.stderr
    cid = run.stdout.strip()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(cid, client)
            yield cid, client
        assert engine("stop", "-t", "30", cid).returncode == 0
        logs = engine("logs", cid)
        assert "Application shutdown complete" in logs.stderr + logs.stdout, logs.stderr[-4000:]
        assert "Traceback" not in logs.stderr + logs.stdout, logs.stderr[-4000:]
    finally:
        engine("rm", "-f", cid)


def wait_ready(cid: str, client: httpx.Client, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        state = engine("inspect", "--format", "{{.State.Status}}", cid).stdout.strip()
        if state != "running":
            pytest.fail(f"container {state}:\n{engine('logs', cid).stderr[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"container not ready after {timeout_s}s:\n{engine('logs', cid).stderr[-4000:]}")


def sample_png() -> bytes:
    """assets/sample.jpg as PNG: lossless, so host and container decode the same pixels."""
    buffer = io.BytesIO()
    Image.open(ROOT / "assets" / "sample.jpg").convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def host_caption(model_dir: Path, data: bytes) -> list[tuple[str, tuple[float, ...]]]:
    """Each word of the caption and its box, from these weights loaded on the host."""
    with single_thread():
        predictor = Predictor(load_model(model_dir))
        predictor.set_image(Image.open(io.BytesIO(data)).convert("RGB"))
        caption = predictor.caption(max_new_tokens=MAX_NEW_TOKENS)
    return [(w.text, tuple(w.box)) for w in caption.words]


def served_caption(client: httpx.Client, data: bytes) -> list[tuple[str, tuple[float, ...]]]:
    response = client.post(
        "/v1/caption", files={"image": ("sample.png", data)}, data={"max_new_tokens": str(MAX_NEW_TOKENS)}
    )
    assert response.status_code == 200, response.text
    return [(w["text"], tuple(w["box"][k] for k in ("x0", "y0", "x1", "y1"))) for w in response.json()["words"]]


def assert_same_caption(served: list, expected: list) -> None:
    assert [text for text, _ in served] == [text for text, _ in expected]
    for (_, box), (_, want) in zip(served, expected):
        assert box == pytest.approx(want, abs=0.5)


def test_image_serves_baked_model_read_only_as_non_root(image: str, expected: dict[Path, list]) -> None:
    with container(image) as (cid, client):
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/readyz").json() == {"status": "ready", "model": "pixelllm-tiny", "max_body_bytes": 20 << 20}
        served = served_caption(client, sample_png())
        assert served, "empty caption"
        assert_same_caption(served, expected[DEFAULT_MODEL_DIR])
        assert '"static/docs/swagger-ui-bundle.js"' in client.get("/docs").text  # the docs' files are in the image
        assert client.get("/static/docs/swagger-ui-bundle.js").status_code == 200

        assert engine("exec", cid, "id", "-u").stdout.strip() == UID
        root_flags = engine("exec", cid, "python", "-c", "import os; print(os.statvfs('/').f_flag)").stdout
        assert int(root_flags) & os.ST_RDONLY, "the root filesystem is writable"
        for path in ("/app/weights/pixelllm-tiny/config.json", "/opt/venv/bin/pixelllm", "/app/new"):
            denied = engine("exec", cid, "sh", "-c", f"echo x >> {path}")
            assert denied.returncode != 0, (path, denied.stderr)  # read-only, and not the user's files
        assert engine("exec", cid, "sh", "-c", "echo x > /tmp/x").returncode == 0

        # the image's HEALTHCHECK command, run in the container as the engine would run it
        test = engine("inspect", "--format", "{{json .Config.Healthcheck.Test}}", cid).stdout.strip()
        kind, *command = json.loads(test)
        assert kind == "CMD" and "/healthz" in command[-1]
        assert engine("exec", cid, *command).returncode == 0


def test_mounted_model_replaces_baked_one(image: str, expected: dict[Path, list]) -> None:
    random_dir = next(path for path in expected if path != DEFAULT_MODEL_DIR)
    assert expected[random_dir] != expected[DEFAULT_MODEL_DIR], "the two models must caption differently"
    mount = ("-v", f"{random_dir}:/models/random-tiny:ro", "-e", "PIXELLLM_MODEL=/models/random-tiny")
    with container(image, *mount) as (_, client):
        assert_same_caption(served_caption(client, sample_png()), expected[random_dir])
