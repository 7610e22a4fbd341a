"""Session fixtures for the service tests: load with `pytest_plugins = ["server_fixtures"]`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_helpers import DEFAULT_MODEL_DIR, MAKE_MODEL, ROOT, SLOW_WORD_S, start_server


@pytest.fixture(scope="session")
def random_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight pixelllm-tiny saved with `save_pretrained`, so every server loads the same weights."""
    path = tmp_path_factory.mktemp("model") / "pixelllm-tiny-random"
    subprocess.run([sys.executable, "-c", MAKE_MODEL, str(path)], cwd=ROOT, check=True, timeout=300)
    return path


MAIN_SETTINGS = dict(
    max_batch_size=8,
    max_batch_wait_ms=20,
    max_body_bytes=2_000_000,
    max_image_pixels=4_000_000,
    max_texts=4,
    max_regions=6,
    max_text_chars=64,
    cache_entries=64,
)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, random_tiny_dir: Path):
    """The service with dynamic batching (up to 8, waiting up to 20 ms) and small limits."""
    proc = start_server(tmp_path_factory, random_tiny_dir, **MAIN_SETTINGS)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def service_client(service):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def trained_service(tmp_path_factory: pytest.TempPathFactory):
    """The shipped default model (real captions: punctuation, words of several tokens), default settings."""
    proc = start_server(tmp_path_factory, DEFAULT_MODEL_DIR)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def slow_stream_service(tmp_path_factory: pytest.TempPathFactory):
    """The shipped default model; each batch and each streamed word 0.25 s late; 2 requests at most; 4 s timeout."""
    proc = start_server(
        tmp_path_factory, DEFAULT_MODEL_DIR, debug_batch_delay_ms=SLOW_WORD_S * 1000, max_queue=2, request_timeout_s=4
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def unbatched_service(tmp_path_factory: pytest.TempPathFactory, random_tiny_dir: Path):
    """The same model with no batching and no cache: every request runs alone, encoders included."""
    proc = start_server(tmp_path_factory, random_tiny_dir, max_batch_size=1, cache_entries=0)
    yield proc
    proc.stop()
