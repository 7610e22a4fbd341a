"""Half precision (`PIXELLLM_DTYPE=bfloat16 / float16`) and an int8 language model (`PIXELLLM_QUANTIZE=int8`): the
shipped default model answers every kind of prompt, close to its float32 answers, in the library and over HTTP."""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from server_helpers import DEFAULT_MODEL_DIR, GRACEFUL, ROOT, start_server

from pixelllm import PixelLLM, Predictor, build_pixelllm
from pixelllm.evaluate import box_iou, mask_iou

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = ROOT / "assets" / "sample.jpg"
TEXT = "the red circle"


def predictor(dtype: torch.dtype, quantize: bool = False) -> Predictor:
    model = PixelLLM.from_pretrained(DEFAULT_MODEL_DIR).to(dtype=dtype).eval()
    if quantize:
        model.quantize_language_model()
    predictor = Predictor(model)
    predictor.set_image(Image.open(SAMPLE))
    return predictor


@pytest.fixture(scope="module")
def answers_fp32() -> dict:
    return answers(predictor(torch.float32))


def answers(p: Predictor) -> dict:
    height, width = p.embedding.original_size  # (H, W), as SAM
    return {
        "caption": p.caption(),
        "box": p.caption(box=(0, 0, width / 2, height)),
        "point": p.caption(point=(width / 3, height / 3)),
        "beams": p.caption(num_beams=3),
        "stream": list(p.caption_stream()),
        "localize": p.localize(TEXT, mask=True),
        "dense": p.dense_caption(),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_answers_every_prompt_like_float32(dtype: torch.dtype, answers_fp32: dict) -> None:
    p = predictor(dtype)
    assert p.model.dtype == dtype
    assert_close(answers(p), answers_fp32, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_draws_coordinates_in_float32(dtype: torch.dtype) -> None:
    """The point and proposal heads stay float32 in a half-precision model: in bfloat16 every word corner came out
    on the bfloat16 grid, in [0.5, 1] a multiple of 1/512 of the image (7.8 px of a 4000 px photo)."""
    p = predictor(dtype)
    saved = PixelLLM.from_pretrained(DEFAULT_MODEL_DIR).state_dict()
    heads = {"point_head": p.model.point_head, "proposal_head": p.model.proposal_head}
    for name, head in heads.items():  # the saved float32 weights themselves, not rounded to `dtype` first
        assert all(torch.equal(v, saved[f"{name}.{k}"]) for k, v in head.state_dict().items()), name
    hidden = torch.randn(64, p.model.language_model.dim, generator=torch.Generator().manual_seed(0))
    corners, confidence = p.model._points(hidden.to(dtype))
    assert corners.dtype == confidence.dtype == torch.float32
    assert (corners != corners.to(dtype).float()).any()  # not all on the half-precision grid
    logits, edges = p.model.proposal_head(p.embedding.features.fused)
    assert p.embedding.features.fused.dtype == dtype and edges.dtype == logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast changes nothing
        assert torch.equal(p.model._points(hidden.to(dtype))[0], corners)
        assert torch.equal(p.model.proposal_head(p.embedding.features.fused)[1], edges)


def test_float16_keeps_the_t5_feed_forward_outputs_in_float32() -> None:
    """Flan-T5-XL's feed-forward outputs (`wo`) overflow float16, so transformers keeps them float32 in a float16
    T5; a float16 PixelLLM does too. With outputs past float16's range the encoder still answers as in float32
    (with them cast, T5 clamped the overflow: 2.0 off); bfloat16, with float32's range, casts them."""
    torch.manual_seed(0)
    language_model = build_pixelllm("pixelllm-tiny").eval().language_model
    with torch.no_grad():
        for name, param in language_model.t5.encoder.named_parameters():
            if name.endswith("wo.weight"):
                param.normal_(0, 1e6 / param.shape[1])
    half = copy.deepcopy(language_model).to(dtype=torch.float16)
    wo = {n: p for n, p in half.t5.named_parameters() if n.endswith("wo.weight")}
    assert wo and all(p.dtype == torch.float32 for p in wo.values())
    assert all(p.dtype == torch.float16 for n, p in half.t5.named_parameters() if n not in wo)
    visual = torch.randn(2, 5, language_model.dim)
    ids, mask = torch.randint(1, 50, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        full, _ = language_model.encode(visual, ids, mask)
        states, _ = half.encode(visual.half(), ids, mask)
    assert states.dtype == torch.float16
    assert (states.float() - full).abs().max() < 0.05
    assert all(p.dtype == torch.bfloat16 for p in half.to(dtype=torch.bfloat16).parameters())


def test_bfloat16_reads_prompt_coordinates_in_float32() -> None:
    """A box a fraction of a pixel off is another prompt in bfloat16 too: the prompt encoder read corners in
    [128, 256) model pixels rounded to whole pixels (in [256, 512), even ones: 10 px of a 4000 px photo at
    384), for region captions and for the boxes masks are drawn in."""
    from pixelllm.modeling.pixelllm import Prompts

    p = predictor(torch.bfloat16)
    features = p.embedding.features
    boxes = torch.tensor([[10.0, 10.0, 150.2, 150.2], [10.0, 10.0, 150.4, 150.4]])
    assert torch.equal(boxes.to(torch.bfloat16)[0], boxes.to(torch.bfloat16)[1])  # one prompt, had it been cast
    tokens = p.model._extract(features, Prompts(texts=["", ""], boxes=boxes, image_index=torch.tensor([0, 0])))
    assert not torch.equal(tokens[0], tokens[1])
    assert not torch.equal(p.model.masks(features, boxes[:1]), p.model.masks(features, boxes[1:]))


def test_int8_language_model_answers_every_prompt_like_float32(answers_fp32: dict) -> None:
    p = predictor(torch.float32, quantize=True)
    t5 = p.model.language_model.t5
    assert p.model.language_model.quantized
    assert not any(isinstance(m, torch.nn.Linear) for m in t5.modules())  # the vocabulary head too
    assert_close(answers(p), answers_fp32, p)


def assert_close(got: dict, answers_fp32: dict, p: Predictor) -> None:
    height, width = p.embedding.original_size  # (H, W), as SAM
    for caption in (got["caption"], got["box"], got["point"], got["beams"]):
        assert caption.words
        for word in caption.words:
            assert all(isinstance(v, float) and np.isfinite(v) for v in (*word.point, *word.box, word.score))
            assert 0 <= word.point[0] <= width and 0 <= word.point[1] <= height
    assert [w.text for w in got["stream"]] == [w.text for w in got["caption"].words]
    # a region caption is short and confident: the same words, each located within a few pixels
    assert got["box"].text == answers_fp32["box"].text
    for half, full in zip(got["box"].words, answers_fp32["box"].words):
        assert np.hypot(half.point[0] - full.point[0], half.point[1] - full.point[1]) < 0.02 * width
    found, expected = got["localize"], answers_fp32["localize"]
    assert box_iou(found.box, expected.box) > 0.9
    assert found.mask.shape == (height, width) and found.mask.dtype == bool
    assert mask_iou(found.mask, expected.mask) > 0.9
    assert len(got["dense"]) == len(answers_fp32["dense"])
    assert max(box_iou(got["dense"][0].box, r.box) for r in answers_fp32["dense"]) > 0.9


@pytest.mark.parametrize("settings", [{"dtype": "bfloat16"}, {"quantize": "int8"}], ids=["bfloat16", "int8"])
def test_server_answers_caption_and_localize(tmp_path_factory: pytest.TempPathFactory, settings: dict) -> None:
    server = start_server(tmp_path_factory, DEFAULT_MODEL_DIR, **settings)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            image = {"image": ("sample.jpg", SAMPLE.read_bytes(), "image/jpeg")}
            caption = client.post("/v1/caption", files=image)
            assert caption.status_code == 200, caption.text
            assert caption.json()["words"]
            found = client.post("/v1/localize", files=image, data={"text": TEXT, "mask": "true"})
            assert found.status_code == 200, found.text
            assert found.json()["results"][0]["mask"]["size"] == list(reversed(Image.open(SAMPLE).size))
    finally:
        assert server.stop() in GRACEFUL, server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]
    language = "int8" if settings.get("quantize") == "int8" else settings["dtype"]
    assert f"language model {language})" in server.log()
