"""Predictor coordinates: model outputs map back to absolute pixels of non-square inputs, prompts map into the
model's input, bad prompts are refused. Hooks on the model fix its normalized outputs so the expected pixels
are known exactly."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from server_helpers import DEFAULT_MODEL_DIR, ROOT

from pixelllm import PixelLLM, Predictor
from pixelllm.tokenizer import EOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(100, 300), (300, 100), (257, 511), (160, 160)]  # (height, width)


@contextmanager
def controlled(model, corners: torch.Tensor | None = None, token: str | None = "circle") -> Iterator[dict]:
    """While active: the point head outputs `corners` ((2, 2) normalized [[x0, y0], [x1, y1]]) for every token,
    with confidence logit 0 (score 0.5); the vocabulary head always picks `token` and never EOS (so captions
    are `token` repeated max_new_tokens times);
    the inputs of the image encoder, prompt encoder and mask head are recorded in the yielded dict."""
    seen: dict = {}
    handles = []
    if corners is not None:

        def fix_points(module, args, out):
            fixed = corners.to(out[0].dtype).expand_as(out[0]).clone()
            return fixed, torch.zeros_like(out[1])

        handles.append(model.point_head.register_forward_hook(fix_points))
    if token is not None:
        (token_id,) = model.tokenizer.encode(token, add_eos=False)

        def force_token(module, args, out):
            forced = torch.full_like(out, -1e4)
            forced[..., token_id] = 0
            forced[..., EOS_ID] = -1e9
            return forced

        handles.append(model.language_model.t5.lm_head.register_forward_hook(force_token))

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = (args, kwargs)

        return hook

    handles.append(model.image_encoder.register_forward_pre_hook(record("image_encoder"), with_kwargs=True))
    handles.append(model.prompt_encoder.register_forward_pre_hook(record("prompt_encoder"), with_kwargs=True))
    handles.append(model.mask_head.register_forward_pre_hook(record("mask_head"), with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def normalized(box_px, height: int, width: int) -> torch.Tensor:
    """The model-output corners that mean `box_px`: the image is resized by its longer side into the square
    input and padded right/bottom, so normalized coordinates are pixels / max(height, width)."""
    x0, y0, x1, y1 = box_px
    side = max(height, width)
    return torch.tensor([[x0 / side, y0 / side], [x1 / side, y1 / side]])


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return Predictor(tiny_model)


def assert_box(got, expected, tol: float) -> None:
    assert got == pytest.approx(expected, abs=tol), (got, expected)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_words_and_boxes_map_back_to_image_pixels(predictor, size):
    h, w = size
    predictor.set_image(np.zeros((h, w, 3), np.uint8))
    target = (0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h)
    center = ((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)
    tol = 1e-4 * max(h, w)
    with controlled(predictor.model, normalized(target, h, w)):
        captions = [
            predictor.caption(max_new_tokens=3),
            predictor.caption(max_new_tokens=3, num_beams=2),
            *predictor.caption_batch([None, (1, 2, 20, 30), (5, 6)], max_new_tokens=3),
        ]
        streamed = list(predictor.caption_stream(max_new_tokens=3))
        loc = predictor.localize("the red circle")
    for cap in captions:
        assert cap.text == "circle circle circle"
        assert [(wd.text, wd.start, wd.end) for wd in cap.words] == [
            ("circle", 0, 6),
            ("circle", 7, 13),
            ("circle", 14, 20),
        ]
        for word in cap.words:
            assert_box(word.box, target, tol)
            assert_box(word.point, center, tol)
            assert word.score == pytest.approx(0.5)
    assert streamed == captions[0].words
    assert_box(loc.box, target, tol)
    assert [wd.text for wd in loc.words] == ["the", "red", "circle"]
    for word in loc.words:
        assert_box(word.box, target, tol)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_outputs_are_ordered_and_clipped_to_the_image(predictor, size):
    h, w = size
    predictor.set_image(np.zeros((h, w, 3), np.uint8))
    # corners given as (x1, y1), (x0, y0): the box is still x0 <= x1, y0 <= y1
    target = (0.25 * w, 0.3 * h, 0.5 * w, 0.6 * h)
    swapped = normalized(target, h, w).flip(0)
    with controlled(predictor.model, swapped):
        assert_box(predictor.caption(max_new_tokens=1).words[0].box, target, 1e-4 * max(h, w))
    # the whole square includes the padding beyond the image: clipped to the image
    with controlled(predictor.model, torch.tensor([[0.0, 0.0], [1.0, 1.0]])):
        cap = predictor.caption(max_new_tokens=1)
        loc = predictor.localize("the red circle")
    assert_box(cap.words[0].box, (0, 0, w, h), 1e-6)
    assert_box(loc.box, (0, 0, w, h), 1e-6)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_drawn_rectangle_found_in_the_model_input_maps_back_onto_itself(predictor, size):
    """Independent of the mapping formulas: find the rectangle where the model sees it, output those corners,
    and get the rectangle back in image pixels (to within one model-input pixel)."""
    h, w = size
    rect = (round(0.3 * w), round(0.4 * h), round(0.8 * w), round(0.7 * h))
    image = np.zeros((h, w, 3), np.uint8)
    image[rect[1] : rect[3], rect[0] : rect[2]] = 255
    model = predictor.model
    s = model.cfg.image_size
    with controlled(model, token="circle") as seen:
        predictor.set_image(Image.fromarray(image))
    model_input = seen["image_encoder"][0][0][0]  # (3, S, S) in [0, 1]
    ys, xs = np.nonzero(model_input.mean(0).numpy() > 0.5)
    found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # model-input pixels
    corners = torch.tensor([[found[0], found[1]], [found[2], found[3]]], dtype=torch.float32) / s
    with controlled(model, corners):
        box = predictor.caption(max_new_tokens=1).words[0].box
    assert_box(box, rect, tol=1.01 * max(h, w) / s)
    # the image fills the top-left of the square, the padding is black
    scale = s / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    assert model_input[:, nh:].abs().sum() == 0 and model_input[:, :, nw:].abs().sum() == 0


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_box_and_point_prompts_map_into_model_input_pixels(predictor, size):
    h, w = size
    predictor.set_image(np.zeros((h, w, 3), np.uint8))
    model = predictor.model
    scale = model.cfg.image_size / max(h, w)
    box, point = (0.2 * w, 0.1 * h, 0.9 * w, 0.5 * h), (0.75 * w, 0.25 * h)
    with controlled(model, normalized(box, h, w)) as seen:
        predictor.caption(box=box, max_new_tokens=1)
        kw = seen["prompt_encoder"][1]
        assert kw["box_mask"].tolist() == [True] and kw["point_mask"].tolist() == [False]
        assert kw["boxes"][0].tolist() == pytest.approx([c * scale for c in box], abs=1e-3)

        predictor.caption(point=point, max_new_tokens=1)
        kw = seen["prompt_encoder"][1]
        assert kw["box_mask"].tolist() == [False] and kw["point_mask"].tolist() == [True]
        assert kw["points"][0].tolist() == pytest.approx([c * scale for c in point], abs=1e-3)

        predictor.caption_batch([box, point, None], max_new_tokens=1)
        kw = seen["prompt_encoder"][1]  # the whole-image prompt reads the embedding's unlocated visual tokens
        assert kw["box_mask"].tolist() == [True, False]
        assert kw["point_mask"].tolist() == [False, True]
        assert kw["boxes"][0].tolist() == pytest.approx([c * scale for c in box], abs=1e-3)
        assert kw["points"][1].tolist() == pytest.approx([c * scale for c in point], abs=1e-3)

        # localize(mask=True) prompts the mask decoder with the found box, in model-input pixels
        loc = predictor.localize("the red circle", mask=True)
        mask_boxes = seen["mask_head"][0][1]
        assert mask_boxes[0].tolist() == pytest.approx([c * scale for c in loc.box], abs=1e-3)
        assert loc.mask.shape == (h, w) and loc.mask.dtype == bool


BAD_BOXES = {
    "x1 beyond width": lambda h, w: (0, 0, w + 1, h / 2),
    "y1 beyond height": lambda h, w: (0, 0, w / 2, h + 1),
    "negative x0": lambda h, w: (-1, 0, w / 2, h / 2),
    "x0 after x1": lambda h, w: (w / 2, 0, w / 4, h / 2),
    "empty": lambda h, w: (10, 10, 10, 20),
    "nan": lambda h, w: (math.nan, 0, 10, 10),
    "three numbers": lambda h, w: (1, 2, 3),
    "five numbers": lambda h, w: (0, 0, 10, 10, 1),
    "strings": lambda h, w: ("0", "0", "10", "10"),
    "a None": lambda h, w: (None, 0, 10, 10),
    "an int too big for a float": lambda h, w: (0, 0, 10**400, 10),
    "width and height swapped": lambda h, w: (0, 0, h, w),  # valid only if the image were transposed
}
BAD_POINTS = {
    "x beyond width": lambda h, w: (w + 0.5, 1),
    "y beyond height": lambda h, w: (1, h + 0.5),
    "negative": lambda h, w: (-0.5, 1),
    "infinite": lambda h, w: (math.inf, 1),
    "strings": lambda h, w: ("1", "1"),
    "width and height swapped": lambda h, w: (h, w),
}


@pytest.mark.parametrize("size", [(100, 300), (300, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_invalid_prompts_raise_value_error(predictor, size):
    h, w = size
    predictor.set_image(np.zeros((h, w, 3), np.uint8))
    for make in BAD_BOXES.values():
        with pytest.raises(ValueError):
            predictor.caption(box=make(h, w), max_new_tokens=1)
        with pytest.raises(ValueError):
            predictor.caption_batch([None, make(h, w)], max_new_tokens=1)
    for make in BAD_POINTS.values():
        with pytest.raises(ValueError):
            predictor.caption(point=make(h, w), max_new_tokens=1)
    with pytest.raises(ValueError):
        predictor.caption(box=(0, 0, 10, 10), point=(5, 5), max_new_tokens=1)
    with pytest.raises(ValueError, match="^the text is empty$"):
        predictor.localize("  ")
    with pytest.raises(ValueError, match=r"^texts\[1\]: the text is empty$"):
        predictor.localize_batch(["a circle", ""])
    with pytest.raises(TypeError, match="got one string; for one text, use localize"):
        predictor.localize_batch("a circle")
    with pytest.raises(TypeError, match="text must be a string, got list; for several, use localize_batch"):
        predictor.localize(["a circle"])
    limit = predictor.model.cfg.language_model.max_text_tokens - 1
    long = " ".join(["circle"] * 200)
    tokens = len(predictor.model.tokenizer.encode(long, add_eos=False))
    with pytest.raises(ValueError, match=f"^the text is {tokens} tokens; the model reads at most {limit}: shorten it$"):
        predictor.localize(long)
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=-1), dict(num_beams=0), dict(num_beams=-2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            predictor.caption(**bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            predictor.caption_stream(**bad) if "max_new_tokens" in bad else predictor.caption_batch([None], **bad)
    with pytest.raises(ValueError):  # when called, not at the first word
        predictor.caption_stream(box=(1, 2, 3))
    # the image's own corners are valid
    predictor.caption(box=(0, 0, w, h), max_new_tokens=1)
    predictor.caption(point=(w, h), max_new_tokens=1)


def test_image_inputs_and_state(tiny_model):
    p = Predictor(tiny_model)
    with pytest.raises(RuntimeError, match="set_image"):
        p.caption()
    array = np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)
    p.set_image(array)
    from_array = p.embedding.features.fused
    p.set_image(Image.fromarray(array))
    torch.testing.assert_close(p.embedding.features.fused, from_array)
    assert p.embedding.original_size == (90, 200)
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32)):
        with pytest.raises(ValueError):
            p.set_image(bad)
    for path in ("assets/sample.jpg", Path("assets/sample.jpg")):  # a likely slip: the message says what to do
        with pytest.raises(TypeError, match="got the path 'assets/sample.jpg', not an image: open it first"):
            p.set_image(path)
    p.reset_image()
    with pytest.raises(RuntimeError):
        p.localize("the red circle")


def test_a_texts_whitespace_is_collapsed_before_it_is_read():
    """A trailing space or a line break was a token of its own, read before the box at EOS: the shipped model then
    found the large circle for "the green square " (what a service text ending in a line break became)."""
    p = Predictor(PixelLLM.from_pretrained(str(DEFAULT_MODEL_DIR)))
    p.set_image(Image.open(ROOT / "assets" / "sample.jpg"))
    plain = p.localize("the green square")
    for text in ("the green square ", " the  green\nsquare\t"):
        got = p.localize(text)
        assert got.text == "the green square" and got.box == plain.box
        assert [(w.text, w.start, w.end) for w in got.words] == [(w.text, w.start, w.end) for w in plain.words]
    with pytest.raises(ValueError, match="the text is empty"):
        p.check_text(" \n\t")


@pytest.mark.parametrize(
    "text, words",
    [
        ("the 'blue' diamond", ["the", "blue", "diamond"]),  # quotes around a word are not in it
        ("the diamond - left -- now", ["the", "diamond", "left", "now"]),  # nor is a dash a word
        ("don’t x-ray the dogs'", ["don’t", "x-ray", "the", "dogs"]),  # inner apostrophes and hyphens are
        ("café ok", ["café", "ok"]),  # a decomposed accent belongs to its letter
    ],
)
def test_words_are_letters_with_inner_apostrophes_and_hyphens(tiny_model, text: str, words: list[str]):
    p = Predictor(tiny_model)
    p.set_image(np.zeros((32, 48, 3), np.uint8))
    got = p.localize(text)
    assert [w.text for w in got.words] == words
    assert all(got.text[w.start : w.end] == w.text for w in got.words)


def test_failed_set_image_leaves_no_image_and_empty_batches_answer_nothing(tiny_model):
    p = Predictor(tiny_model)
    p.set_image(np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(ValueError):
        p.set_image(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(RuntimeError, match="set_image"):
        p.caption()  # not the previous image's caption
    p.set_image(np.zeros((40, 60, 3), np.uint8))
    assert p.embed_batch([]) == [] and p.caption_batch([]) == [] and p.localize_batch([]) == []
    assert p.caption_embeddings([]) == [] and p.localize_embeddings([], []) == []
    assert p.dense_caption_embeddings([]) == []
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        p.localize_embeddings([p.embedding, p.embedding], ["a"])


@pytest.mark.parametrize("shape", [(1, 2000, 3), (2000, 1, 3)])
def test_very_thin_images_get_masks(tiny_model, shape):
    """Thinner than half a model-input pixel: the mask's crop of the model input is one row or column."""
    p = Predictor(tiny_model)
    p.set_image(np.full(shape, 128, np.uint8))
    assert p.localize("the red circle", mask=True).mask.shape == shape[:2]


def test_pil_images_are_taken_upright_as_decode_takes_them(tiny_model, tmp_path):
    """A PIL image's EXIF orientation is applied, so `Image.open` and `decode` (the CLI's and the service's way)
    give the same size and the same answer."""
    from pixelllm.transforms import decode

    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn off: shown 60 wide and 90 high
    array = np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "turned.png", exif=exif.tobytes())
    p = Predictor(tiny_model)
    answers = []
    for read in (lambda im: im, decode):
        with Image.open(tmp_path / "turned.png") as im:
            p.set_image(read(im))
        assert p.embedding.original_size == (90, 60)
        answers.append(p.caption(box=(5, 10, 50, 80), max_new_tokens=6))
    assert answers[0].text == answers[1].text
    np.testing.assert_allclose([w.box for w in answers[0].words], [w.box for w in answers[1].words], atol=1e-4)


def test_prompts_sharing_images_equal_one_call_each(tiny_model):
    """Interleaved prompts on two images (each image's features computed once) answer as separate calls do."""
    from pixelllm.data.synthetic import generate_scene

    predictor = Predictor(tiny_model)
    a, b = (predictor.embed(generate_scene(s).image) for s in (11, 12))
    embeddings = [a, b, a, b, a]
    boxes = [(5, 5, 60, 60), None, (10, 20, 90, 70), (0, 0, 40, 30), None]
    features, index = predictor._distinct(embeddings)
    assert features.fused.shape[0] == 2 and index.tolist() == [0, 1, 0, 1, 0]
    together = predictor.caption_embeddings(embeddings, boxes, max_new_tokens=6)
    for emb, box, caption in zip(embeddings, boxes, together):
        alone = predictor.caption_embeddings([emb], [box], max_new_tokens=6)[0]
        assert caption.text == alone.text
        np.testing.assert_allclose([w.box for w in caption.words], [w.box for w in alone.words], atol=1e-3)
    texts = ["the red circle", "a blue star", "the green square", "the red circle", "a star"]
    located = predictor.localize_embeddings(embeddings, texts, mask=True)
    for emb, text, loc in zip(embeddings, texts, located):
        alone = predictor.localize_embeddings([emb], [text], mask=True)[0]
        np.testing.assert_allclose(loc.box, alone.box, atol=1e-3)
        assert (loc.mask != alone.mask).mean() < 0.001


def storage_bytes(features) -> int:
    """Bytes of all the memory an `ImageFeatures` keeps alive (each storage once)."""
    reading = features.reading
    tensors = [features.fused, features.sam, *(features.objects or ()), *(t for p in features.proposals for t in p)]
    tensors += [reading.tokens, *reading.first, reading.objects, reading.unlocated]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def test_embeddings_of_a_batch_keep_only_their_own_memory(tiny_model):
    """A kept embedding from a batch holds what `nbytes` says (the embedding cache counts it), not its batch."""
    from pixelllm.data.synthetic import generate_scene

    predictor = Predictor(tiny_model)
    images = [generate_scene(s).image for s in (11, 12, 13)]
    batch = predictor.embed_batch(images)
    for image, emb in zip(images, batch):
        assert storage_bytes(emb.features) == emb.nbytes
        alone = predictor.embed(image)
        assert storage_bytes(alone.features) == alone.nbytes == emb.nbytes
        torch.testing.assert_close(emb.features.fused, alone.features.fused, atol=1e-5, rtol=1e-4)
        assert predictor.caption_embeddings([emb], max_new_tokens=6)[0].text == (
            predictor.caption_embeddings([alone], max_new_tokens=6)[0].text
        )


def test_masks_for_boxes_segment_image_pixel_boxes_on_their_own_images(tiny_model):
    """`masks_for_boxes` hands the mask head each box in model-input pixels with its own image's SAM features,
    and returns each mask in its own image's pixels: what `localize` draws on its box."""
    from pixelllm.data.synthetic import generate_scene

    predictor = Predictor(tiny_model)
    a = predictor.embed(generate_scene(21).image[:90])
    b = predictor.embed(generate_scene(22).image[:, :120])
    embeddings, boxes = [a, b, a], [(10, 5, 80, 60), (0, 20, 100, 130), (50, 40, 150, 90)]
    features, index = predictor._distinct(embeddings)
    with controlled(tiny_model, token=None) as seen:
        masks = predictor.masks_for_boxes(features[index], embeddings, boxes)
    sam, model_boxes = seen["mask_head"][0][:2]
    for i, (emb, box, mask) in enumerate(zip(embeddings, boxes, masks)):
        assert mask.dtype == bool and mask.shape == emb.original_size
        torch.testing.assert_close(sam[i], emb.features.sam[0])
        np.testing.assert_allclose(model_boxes[i].numpy(), np.array(box) * emb.transform.scale, rtol=1e-6)
    located = predictor.localize_embeddings([b], ["a blue star"], mask=True, refine=False)[0]
    np.testing.assert_array_equal(predictor.masks_for_boxes(b.features, [b], [located.box])[0], located.mask)


def test_caption_stream_asks_should_stop_before_every_decoder_step(tiny_model):
    """The stream stops inside a word: `should_stop()` is asked before each decoder step, not once per word."""
    from pixelllm import GenerationCancelled

    predictor = Predictor(tiny_model)
    emb = predictor.embed(np.zeros((64, 64, 3), np.uint8))
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(len(asked))
        return len(asked) > 3

    with controlled(tiny_model, token="circle"):  # every token is the word "circle", never EOS
        # unverified: the attribute word "circle" would wait for the word after its phrase
        words = predictor.caption_stream_embedding(emb, max_new_tokens=10, should_stop=should_stop, verify=False)
        assert next(words).text == "circle"  # complete once the second token is decoded: two steps, two asks
        assert next(words).text == "circle"  # the third step
        with pytest.raises(GenerationCancelled):
            next(words)
    assert len(asked) == 4


def test_the_image_is_padded_as_the_models_config_says(tiny_model, monkeypatch):
    """`image_padding` "mean" (the paper presets): the square around a non-square image is SAM's pixel mean."""
    from pixelllm.modeling.image_encoder import SAM_PIXEL_MEAN

    seen = []
    encode = tiny_model.encode_images
    monkeypatch.setattr(tiny_model, "encode_images", lambda images, **kw: seen.append(images) or encode(images, **kw))
    array = np.zeros((80, 160, 3), np.uint8)  # black, 2:1: the bottom half of the square is padding
    for padding in ("mean", "black"):
        monkeypatch.setattr(tiny_model.cfg, "image_padding", padding)
        Predictor(tiny_model).set_image(array)
    mean, black = seen
    s = tiny_model.cfg.image_size
    assert torch.equal(mean[0, :, s // 2 :], torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1).expand(3, s // 2, s))
    assert not black[0].any() and not mean[0, :, : s // 2].any()
