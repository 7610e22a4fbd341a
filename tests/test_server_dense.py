"""POST /v1/dense against a real uvicorn process: regions, their captions, limits and a model without a head."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap

import httpx
import pytest
from PIL import Image
from server_helpers import ROOT, assert_error, png, start_server

from pixelllm.data.synthetic import generate_scene

pytest_plugins = ["server_fixtures"]

IMAGE = png(128, 96, seed=1)
W, H = 128, 96


def test_dense_regions_are_region_captions_of_their_boxes(service_client: httpx.Client) -> None:
    r = service_client.post("/v1/dense", files={"image": IMAGE}, data={"score_threshold": "0", "max_new_tokens": "8"})
    assert r.status_code == 200, r.text
    body = r.json()
    regions = body["regions"]
    assert 1 <= len(regions) <= 6  # the server's max_regions (server_fixtures.MAIN_SETTINGS) caps the count
    assert [g["score"] for g in regions] == sorted((g["score"] for g in regions), reverse=True)
    assert body["image"] == {"width": W, "height": H} and "dense" in body["timing_ms"]
    for g in regions:
        b = g["box"]
        assert 0 <= b["x0"] < b["x1"] <= W and 0 <= b["y0"] < b["y1"] <= H
        assert g["box_norm"]["x1"] == pytest.approx(b["x1"] / W)
        assert len(g["words"]) >= 2, g  # so the comparison below says something
        for w in g["words"]:
            assert g["caption"][w["start"] : w["end"]] == w["text"]
    # each region's caption is what /v1/regions says for that box, on the same cached embedding
    boxes = [g["box"] for g in regions]
    same = service_client.post(
        "/v1/regions", json={"image": base64.b64encode(IMAGE).decode(), "boxes": boxes, "max_new_tokens": 8}
    )
    assert same.status_code == 200, same.text
    assert same.json()["cache_hit"]
    assert [c["caption"] for c in same.json()["captions"]] == [g["caption"] for g in regions]


def test_dense_json_body_and_parameters(service_client: httpx.Client) -> None:
    image = base64.b64encode(IMAGE).decode()
    one = service_client.post("/v1/dense", json={"image": image, "score_threshold": 0, "max_regions": 1})
    assert one.status_code == 200, one.text
    assert len(one.json()["regions"]) == 1
    none = service_client.post("/v1/dense", json={"image": image, "score_threshold": 1})
    assert none.status_code == 200 and none.json()["regions"] == []
    bad = service_client.post("/v1/dense", json={"image": image, "score_threshold": 2})
    assert_error(bad, 422, "invalid_request", field="score_threshold")
    bad = service_client.post("/v1/dense", json={"image": image, "nms_iou": 0})
    assert_error(bad, 422, "invalid_request", field="nms_iou")


MAKE_CAPTIONER = textwrap.dedent(
    """
    import sys
    from pixelllm import build_pixelllm
    from pixelllm.config import load_config
    cfg = load_config("pixelllm-tiny")
    cfg.proposal_head = None
    build_pixelllm(cfg).save_pretrained(sys.argv[1])
    """
)


def test_model_without_proposal_head_answers_501(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("captioner") / "model"
    subprocess.run([sys.executable, "-c", MAKE_CAPTIONER, str(path)], cwd=ROOT, check=True, timeout=300)
    proc = start_server(tmp_path_factory, path)
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            r = client.post("/v1/dense", files={"image": IMAGE})
            assert_error(r, 501, "not_supported")
            assert "proposal head" in r.json()["error"]["message"]
            assert client.post("/v1/caption", files={"image": IMAGE}).status_code == 200
    finally:
        proc.stop()


def test_default_model_localizes_with_a_proposal_box(trained_service) -> None:
    """The shipped model has a proposal head: /v1/localize answers the proposal nearest its point head's box."""
    scene = generate_scene(3)
    image = io.BytesIO()
    Image.fromarray(scene.image).save(image, format="PNG")
    with httpx.Client(base_url=trained_service.url, timeout=60) as client:
        found = client.post(
            "/v1/localize", files={"image": image.getvalue()}, data={"text": scene.objects[0].referring}
        )
        dense = client.post("/v1/dense", files={"image": image.getvalue()})
    assert found.status_code == 200 and dense.status_code == 200, (found.text, dense.text)
    (result,) = found.json()["results"]
    assert result["regressed_box"] is not None and result["regressed_box"] != result["box"]
    assert any(result["box"] == pytest.approx(g["box"]) for g in dense.json()["regions"])


def test_default_model_snaps_caption_words_to_proposal_boxes(trained_service) -> None:
    """/v1/caption (and its stream) answer each located word with the proposal nearest its point head's box, which
    stays in `regressed_box`."""
    scene = generate_scene(3)
    image = io.BytesIO()
    Image.fromarray(scene.image).save(image, format="PNG")
    with httpx.Client(base_url=trained_service.url, timeout=60) as client:
        caption = client.post("/v1/caption", files={"image": image.getvalue()})
        dense = client.post("/v1/dense", files={"image": image.getvalue()})
    assert caption.status_code == 200 and dense.status_code == 200, (caption.text, dense.text)
    located = [w for w in caption.json()["words"] if w["score"] >= 0.5]
    assert located and all(w["regressed_box"] is not None for w in located)
    regions = [g["box"] for g in dense.json()["regions"]]
    assert all(any(w["box"] == pytest.approx(box) for box in regions) for w in located)
    assert any(w["box"] != pytest.approx(w["regressed_box"]) for w in located)
    for w in located:
        box, point = w["box"], w["point"]
        assert point == pytest.approx({"x": (box["x0"] + box["x1"]) / 2, "y": (box["y0"] + box["y1"]) / 2})


def test_default_model_decodes_as_long_as_the_python_api_by_default(trained_service) -> None:
    """Without max_new_tokens the service decodes up to the model's max_text_tokens, as `Predictor.caption` does:
    this four-object scene's caption is longer than the 32 tokens the service once stopped at."""
    from server_helpers import DEFAULT_MODEL_DIR

    from pixelllm import PixelLLM, Predictor

    scene = generate_scene(1)
    image = io.BytesIO()
    Image.fromarray(scene.image).save(image, format="PNG")
    predictor = Predictor(PixelLLM.from_pretrained(DEFAULT_MODEL_DIR))
    predictor.set_image(scene.image)
    expected, cut = predictor.caption(), predictor.caption(max_new_tokens=32)
    with httpx.Client(base_url=trained_service.url, timeout=60) as client:
        served = client.post("/v1/caption", files={"image": image.getvalue()})
    assert served.status_code == 200, served.text
    assert expected.text != cut.text and served.json()["caption"] == expected.text
