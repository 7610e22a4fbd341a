"""Helpers for the service tests: a real uvicorn process, images, error and metric checks.

The fixtures built on these live in `server_fixtures.py` (`pytest_plugins = ["server_fixtures"]`)."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = ROOT / "weights" / "pixelllm-tiny"  # the shipped default model
GRACEFUL = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful shutdown
SLOW_WORD_S = 0.25  # `slow_stream_service`: each streamed word (and each batch) this much later

# Random weights, but a seed whose captions (whole image and box (8, 8, 64, 80)) have at least 2 words (a run of
# "-" is none) on the images the tests caption: test_server_browser's noise and `png(seed=1)`, rebuilt here as
# `random_image` makes it. Comparisons of answers are then not vacuous.
MAKE_MODEL = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from PIL import Image
    from pixelllm import Predictor, build_pixelllm
    noise = np.random.RandomState(0).randint(0, 255, (96, 128, 3), dtype=np.uint8)
    small = np.random.RandomState(1).randint(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((128, 96), Image.BILINEAR))
    for seed in range(100):
        torch.manual_seed(seed)
        model = build_pixelllm("pixelllm-tiny")
        predictor = Predictor(model)

        def wordy(image):
            predictor.set_image(image)
            return all(len(predictor.caption(box=b, max_new_tokens=8).words) >= 2 for b in (None, (8, 8, 64, 80)))

        if wordy(noise) and wordy(smooth):
            break
    else:
        raise SystemExit("no seed under 100 gives captions of 2 words or more")
    model.save_pretrained(sys.argv[1])
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server` (or `python <argv>`) on 127.0.0.1 with `PIXELLLM_*` settings from `env`, its log in
    `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, argv: tuple[str, ...] = ("-m", "server")) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PIXELLLM_DEVICE": "cpu", **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *argv, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 180.0, path: str = "/readyz") -> None:
        """Poll until `path` answers 200 (by default: the model is loaded); raise if the server exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{path} not 200 after {timeout_s}s:\n{self.log()[-4000:]}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, graceful: bool = True, tracebacks: bool = False) -> int:
        """SIGTERM, then wait for the exit (kill after 30 s); the exit code (uvicorn re-raises SIGTERM). Asserts the
        exit was graceful and the log holds no traceback, unless the test expects otherwise (`graceful=False`: not
        checked; `tracebacks=True`: allowed)."""
        self.terminate()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        if graceful:
            assert code in GRACEFUL, f"exit code {code}:\n{self.log()[-4000:]}"
        if not tracebacks:
            assert "Traceback" not in self.log(), self.log()[-4000:]
        return code


def settings_env(model_dir: Path, **settings: object) -> dict[str, str]:
    """`PIXELLLM_*` environment variables for a server of `model_dir` with these settings."""
    return {"PIXELLLM_MODEL": str(model_dir), **{f"PIXELLLM_{k.upper()}": str(v) for k, v in settings.items()}}


def start_server(tmp_path_factory: Any, model_dir: Path, **settings: object) -> ServerProcess:
    server = ServerProcess(settings_env(model_dir, **settings), tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.wait_ready()
    except Exception:
        server.stop(graceful=False, tracebacks=True)
        raise
    return server


def broken_model_dir(directory: Path, like: Path) -> Path:
    """A model directory with `like`'s config and weights that are not safetensors: it fails to load."""
    directory.mkdir()
    (directory / "config.json").write_text((like / "config.json").read_text())
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    return directory


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random image (so JPEG keeps it recognisable)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR).convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_turned(fmt: str) -> bytes:
    """Stored 160x80 with EXIF orientation 6 (turn 90 degrees clockwise to view), in `fmt`. A JPEG or PNG is
    shown 80x160; a WebP 160x80, as stored (the browsers' rule, `pixelllm.transforms.orientation`)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(random_image(160, 80, seed=6), fmt, exif=exif.tobytes())


def exif_after_pixels(png_data: bytes) -> bytes:
    """The PNG `png_data` with its eXIf chunk moved after the pixel data (IDAT), where browsers do not read it."""
    chunks, pos = [], 8
    while pos < len(png_data):
        length = int.from_bytes(png_data[pos : pos + 4], "big")
        chunks.append(png_data[pos : pos + 12 + length])
        pos += 12 + length
    (exif,) = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c is not exif]
    assert rest[-1][4:8] == b"IEND" and rest[-2][4:8] == b"IDAT"
    return png_data[:8] + b"".join(rest[:-1]) + exif + rest[-1]


def png(width: int = 128, height: int = 96, seed: int = 0) -> bytes:
    return encode(random_image(width, height, seed))


def assert_error(response: httpx.Response, status: int, code: str | None = None, field: str | None = None) -> dict:
    """The response is the JSON error shape with this status (and code, and a message that starts with `field: `)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if field is not None:
        assert body["error"]["message"].startswith(f"{field}: "), body
    return body["error"]


def wait_for(condition, timeout_s: float) -> float:
    """Seconds until `condition()` held (polling), or fail."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


# The names of a metric family's samples, by its type (other types: the family's name). A labelled family has no
# samples before its first labels are used: its name alone says the metric exists.
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition: 0 if its family has no sample with these labels
    yet; fails if no family's samples take that name (a renamed or missing metric)."""
    known = False
    for family in text_string_to_metric_families(text):
        known |= name in {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    assert known, f"no metric {name} in the exposition"
    return 0.0


@functools.cache
def image_b64(seed: int) -> str:
    return base64.b64encode(png(96 + 8 * (seed % 8), 80, seed=seed)).decode()


def requests_for(i: int) -> tuple[str, dict]:
    """A varied request: caption (whole, box, point), localize, or regions; 8 images per thousand `i`."""
    image = {"image": image_b64(100 * (i // 1000) + i % 8), "max_new_tokens": 6}
    kind = i % 5
    if kind == 0:
        return "/v1/caption", image
    if kind == 1:
        return "/v1/caption", {**image, "box": {"x0": 4, "y0": 8, "x1": 60 + i % 30, "y1": 70}}
    if kind == 2:
        return "/v1/caption", {**image, "point": {"x": 10 + i % 50, "y": 20}}
    if kind == 3:
        return "/v1/localize", {"image": image["image"], "text": ["a red ball", f"thing {i % 7}"]}
    return "/v1/regions", {**image, "boxes": [{"x0": 0, "y0": 0, "x1": 50, "y1": 50}], "texts": ["sky"]}


async def send_all(url: str, indices: list[int], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> httpx.Response:
            path, body = requests_for(i)
            async with limit:
                return await client.post(path, json=body)

        return await asyncio.gather(*(one(i) for i in indices))


def answers(response: httpx.Response) -> list[dict]:
    """The model's part of a response (no timings or cache flags)."""
    body = response.json()
    if "results" in body:
        return body["results"]
    if "captions" in body:
        return body["captions"] + body["localizations"]
    return [{k: body[k] for k in ("caption", "words", "score", "box", "point")}]


def assert_same(a: object, b: object, path: str = "") -> None:
    """Equal, floats to 1e-3 pixels (batching changes summation order, not answers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-3), path
    else:
        assert a == b, path
