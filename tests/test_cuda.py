"""On a GPU: the default model, the service and training on CUDA. Skipped without one (CI has none); run on a GPU
machine by `benchmarks/device_check.sh`. `PIXELLLM_TEST_DEVICE=cpu` runs the same code on the CPU, a rehearsal of
the tests themselves (not of CUDA)."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import torch
from server_helpers import DEFAULT_MODEL_DIR, answers, assert_same, send_all, start_server
from test_train import tiny_config

from pixelllm import PixelLLM, Predictor
from pixelllm.data.synthetic import generate_scene
from pixelllm.train import load_checkpoint, rng_states, save_checkpoint, train

DEVICE = os.environ.get("PIXELLLM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
pytest_plugins = ["server_fixtures"]


@pytest.fixture(scope="module")
def scene():
    return generate_scene(5)


def on(device: str, dtype: torch.dtype = torch.float32) -> Predictor:
    return Predictor(PixelLLM.from_pretrained(DEFAULT_MODEL_DIR).to(device=device, dtype=dtype).eval())


def test_the_default_model_answers_on_the_device_as_on_the_cpu(scene, monkeypatch):
    """Same weights, fp32 (no TF32 convolutions): the same caption and localization, locations to a pixel (the GPU
    sums in another order)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    here, there = on("cpu"), on(DEVICE)
    for p in (here, there):
        p.set_image(scene.image)
    assert there.embedding.features.fused.device.type == torch.device(DEVICE).type
    a, b = here.caption(), there.caption()
    assert len(a.words) >= 4, "an empty caption would compare nothing"
    assert b.text == a.text
    np.testing.assert_allclose([w.box for w in b.words], [w.box for w in a.words], atol=1.0)
    text = " ".join(w.text for w in a.words[:3])
    np.testing.assert_allclose(there.localize(text).box, here.localize(text).box, atol=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_captions_with_locations_in_the_image(scene, dtype):
    predictor = on(DEVICE, dtype)
    predictor.set_image(scene.image)
    caption = predictor.caption()
    height, width = scene.image.shape[:2]
    assert len(caption.words) >= 4
    for w in caption.words:
        x0, y0, x1, y1 = w.box
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, w


def test_the_service_on_the_device_batches_and_answers_as_unbatched(tmp_path_factory, random_tiny_dir):
    """16 requests at once against one by one, both servers on the device (the CPU test's check, on CUDA)."""
    batched = start_server(tmp_path_factory, random_tiny_dir, device=DEVICE, max_batch_size=8, max_batch_wait_ms=20)
    alone = start_server(tmp_path_factory, random_tiny_dir, device=DEVICE, max_batch_size=1, cache_entries=0)
    try:
        indices = list(range(2000, 2016))
        together = asyncio.run(send_all(batched.url, indices, concurrency=16))
        one_by_one = asyncio.run(send_all(alone.url, indices, concurrency=1))
        assert [r.status_code for r in together + one_by_one] == [200] * 32, [r.text[:200] for r in together]
        for i, (a, b) in enumerate(zip(together, one_by_one)):
            assert_same(answers(a), answers(b), f"request {i}")
        assert f"on {DEVICE}" in batched.log()
    finally:
        for server in (batched, alone):
            server.stop()


def test_a_few_training_steps_on_the_device_reduce_the_loss(tmp_path):
    if torch.device(DEVICE).type == "cpu":
        pytest.skip("training takes the GPU whenever there is one; on the CPU test_train.py covers it")
    final = train(tiny_config(tmp_path, steps=8, lr=3e-3))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"], records
    assert "cuda" in torch.load(tmp_path / "checkpoint.pt", weights_only=True)["rng"][0]
    assert (final / "model.safetensors").is_file()


def test_a_checkpoint_keeps_the_devices_random_state_and_resuming_sets_it_back(tmp_path):
    device = torch.device(DEVICE)
    model = torch.nn.Linear(2, 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.manual_seed(7)
    (state,) = rng_states(device, distributed=False)
    assert ("cuda" in state) == (device.type == "cuda")
    save_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, 3, [state])
    drawn = torch.rand(4, device=device)  # as the uninterrupted run draws next (dropout on the device)
    torch.manual_seed(8)  # seeds the CPU and every GPU
    assert load_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, device) == 3
    assert torch.equal(torch.rand(4, device=device), drawn)
