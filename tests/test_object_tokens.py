"""Object tokens: one visual token per object the model's own proposal head finds (`ExtractorConfig`)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, perturb_
from test_model_tiny import prompts_of

from pixelllm import PixelLLM, Predictor, build_pixelllm
from pixelllm.config import ExtractorConfig, PixelLLMConfig, load_config
from pixelllm.modeling.feature_extractor import PromptFeatureExtractor
from pixelllm.modeling.pixelllm import ImageFeatures, Prompts
from pixelllm.modeling.prompt_encoder import LocationPromptEncoder
from pixelllm.predictor import ImageEmbedding
from pixelllm.train import TrainConfig, initial_model

pytestmark = pytest.mark.usefixtures("one_thread")
K = 4


def objects_model(objectness_bias: float = 3.0, seed: int = 0) -> PixelLLM:
    """A random tiny model with up to K object tokens, its box projection made nonzero, and an objectness
    bias that decides which proposals pass the 0.3 threshold (3.0: every peak NMS keeps; -10: none)."""
    torch.manual_seed(seed)
    model = build_pixelllm("pixelllm-tiny")
    model.add_object_tokens(K)
    perturb_(model.extractor.object_box_proj, seed=seed, scale=0.5)
    model.proposal_head.objectness.bias.data.fill_(objectness_bias)
    return model.eval()


def test_object_tokens_need_anchors_and_a_proposal_head():
    with pytest.raises(ValueError, match="needs extractor.anchor_grid"):
        ExtractorConfig(num_queries=4, anchor_grid=0, object_tokens=2)
    data = load_config("pixelllm-tiny").to_dict()
    data["extractor"]["object_tokens"] = 2
    assert PixelLLMConfig.from_dict(data).extractor.object_tokens == 2
    data["proposal_head"] = None
    with pytest.raises(ValueError, match="needs a proposal_head"):
        PixelLLMConfig.from_dict(data)
    cfg = load_config("pixelllm-tiny")
    cfg.proposal_head = None
    with pytest.raises(ValueError, match="no proposal head"):
        build_pixelllm(cfg).add_object_tokens(2)


def small_extractor_with_object_tokens() -> tuple[PromptFeatureExtractor, LocationPromptEncoder, torch.Tensor]:
    """A random anchored extractor (4 queries, 2x2 anchors, 80 px input) with object tokens, its prompt encoder, and
    fused features (1, 8, 10, 10)."""
    torch.manual_seed(0)
    cfg = ExtractorConfig(num_queries=4, width=32, depth=2, num_heads=2, mlp_dim=64, query_dim=32, anchor_grid=2)
    extractor = PromptFeatureExtractor(cfg, in_dim=8, prompt_dim=16, lm_dim=24, image_size=80).eval()
    extractor.add_object_tokens(prompt_dim=16, lm_dim=24)
    return extractor, LocationPromptEncoder(16, 10, 80), torch.randn(1, 8, 10, 10)


def test_untrained_object_token_is_the_layout_token_of_a_box_prompt():
    """The box projection starts at zero, so an object's token is exactly what a region prompt on its box
    makes as its layout token (what region captions already read the object's color and shape from)."""
    extractor, encoder, features = small_extractor_with_object_tokens()
    boxes = torch.tensor([[8.0, 12.0, 40.0, 30.0], [44.0, 40.0, 76.0, 78.0]])
    box_tokens = encoder(boxes=boxes)
    with torch.no_grad():
        region = extractor(features.expand(2, -1, -1, -1), box_tokens, encoder.pe_layer, boxes)
        out = extractor(
            features, encoder(batch_size=1), encoder.pe_layer, torch.tensor([[0.0, 0.0, 80.0, 80.0]]),
            object_boxes=boxes[None], object_box_tokens=box_tokens[None],
        )  # fmt: skip
    assert out.shape == (1, 4 + 1 + 2, 24)
    torch.testing.assert_close(out[0, 5:], region[:, 4])
    assert not torch.allclose(out[0, 5], out[0, 6])


@pytest.mark.parametrize("objectness_bias", [3.0, -10.0])
def test_visual_mask_marks_the_proposals_each_image_has(objectness_bias):
    model = objects_model(objectness_bias)
    images = make_batch(model)["images"][:2]
    with torch.no_grad():
        features = model.encode_images(images)
        boxes, valid = model.object_proposals(features)
        found = model.propose(features, max_proposals=K)
        boxed = Prompts(
            texts=["a", "b", "c"],
            boxes=torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [10.0, 10.0, 90.0, 90.0]]),
            box_mask=torch.tensor([False, False, True]),
            image_index=torch.tensor([1, 0, 1]),
        )
        visual, mask = model.visual_tokens(features, boxed)
    assert boxes.shape == (2, K, 4) and valid.shape == (2, K)
    assert valid.sum(1).tolist() == [len(b) for b, _ in found]
    for u, (b, _) in enumerate(found):
        torch.testing.assert_close(boxes[u, : len(b)], b.float())
    q = model.cfg.extractor.num_queries + 1
    assert visual.shape == (3, q + K, model.language_model.dim)
    assert mask[:, :q].all()
    assert torch.equal(mask[:2, q:], valid[torch.tensor([1, 0])])
    assert not mask[2, q:].any()  # a region prompt reads its own box, not the image's objects
    if objectness_bias > 0:
        assert 0 < valid.sum() < valid.numel()  # this seed's images: some object tokens real, some masked
    else:
        assert not valid.any()


def test_captions_read_their_own_image_objects_when_images_share_a_batch():
    """Prompts on two images in one call (image_index) caption as each image alone does."""
    model = objects_model()
    perturb_(model.language_model.t5.decoder, seed=1, scale=0.3)
    batch = make_batch(model, seed=1)
    with torch.no_grad():
        features = model.encode_images(batch["images"][:2])
        index = torch.tensor([0, 1, 1, 0])
        prompts = Prompts(texts=["a short image caption: "] * 4, image_index=index)
        together = model.generate(features, prompts, max_new_tokens=6)
        alone = [model.generate(features[u : u + 1], Prompts(texts=["a short image caption: "]), 6)[0] for u in (0, 1)]
    for g, u in zip(together, index.tolist()):
        assert torch.equal(g.ids, alone[u].ids)
        torch.testing.assert_close(g.corners, alone[u].corners, rtol=1e-4, atol=1e-5)
    boxes, _ = model.object_proposals(features)
    assert not torch.equal(boxes[0], boxes[1])  # the two images have different objects


def test_region_prompts_skip_the_proposal_pass_and_caption_the_same(monkeypatch):
    """A prompt with a box or point masks the object tokens, so an image whose prompts all have one is not
    searched for objects; its captions equal those made beside a whole-image prompt on the same image, which
    has it searched. Only the images of whole-image prompts are searched, whatever the prompts' order."""
    model = objects_model()
    perturb_(model.language_model.t5.decoder, seed=1, scale=0.3)
    searched = []
    propose = model.propose
    monkeypatch.setattr(
        model, "propose", lambda features, **kw: searched.append(features.fused) or propose(features, **kw)
    )
    batch = make_batch(model, seed=1)
    box = torch.tensor([[10.0, 10.0, 90.0, 90.0]])

    def mixed(image_index: list[int]) -> Prompts:
        """A region prompt and a whole-image prompt, on the images `image_index`."""
        return Prompts(
            texts=["a", "a"], boxes=box.repeat(2, 1), box_mask=torch.tensor([True, False]),
            image_index=torch.tensor(image_index),
        )  # fmt: skip

    with torch.no_grad():
        features = model.encode_images(batch["images"][:2])
        region = Prompts(texts=["a"], boxes=box, box_mask=torch.tensor([True]), image_index=torch.tensor([1]))
        alone = model.generate(features, region, max_new_tokens=6)[0]
        assert searched == []
        beside = model.generate(features, mixed([1, 1]), max_new_tokens=6)[0]
        assert len(searched) == 1 and torch.equal(searched[0], features.fused[1:])
        crossed = model.generate(features, mixed([1, 0]), max_new_tokens=6)
        assert len(searched) == 2 and torch.equal(searched[1], features.fused[:1])  # image 0, not prompt 1's index
        whole = model.generate(features[:1], Prompts(texts=["a"]), max_new_tokens=6)[0]
    assert torch.equal(alone.ids, beside.ids) and torch.equal(alone.ids, crossed[0].ids)
    torch.testing.assert_close(alone.corners, beside.corners, rtol=1e-4, atol=1e-5)
    assert torch.equal(crossed[1].ids, whole.ids)  # the whole-image prompt read image 0's objects
    torch.testing.assert_close(crossed[1].corners, whole.corners, rtol=1e-4, atol=1e-5)


def test_predictor_embeddings_hold_their_objects_for_every_prompt(monkeypatch):
    """`Predictor.embed` finds the image's objects and proposals once; captions on the embedding then do not
    search again and equal captions made from the bare features, which search in the call."""
    model = objects_model()
    perturb_(model.language_model.t5.decoder, seed=1, scale=0.3)
    image = (make_batch(model, seed=1)["images"][0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    predictor = Predictor(model)
    emb = predictor.embed(image)
    features = emb.features
    assert features.objects is not None
    boxes, valid = model.object_proposals(ImageFeatures(features.fused, features.sam))
    assert torch.equal(features.objects[0], boxes) and torch.equal(features.objects[1], valid)
    assert valid.any() and emb.nbytes > features.fused.nbytes + features.sam.nbytes
    calls = []  # searches of the proposal head
    propose = model.proposal_head.propose
    monkeypatch.setattr(model.proposal_head, "propose", lambda *a, **kw: calls.append(1) or propose(*a, **kw))
    with torch.no_grad():
        held = predictor.caption_embeddings([emb, emb], max_new_tokens=6)
        assert calls == []
        bare = predictor.caption_embeddings(
            [ImageEmbedding(ImageFeatures(features.fused, features.sam), emb.transform)], max_new_tokens=6
        )
    assert calls == [1, 1]  # the objects, then the proposals its words snap to
    assert held[0].text == held[1].text == bare[0].text and len(bare[0].words) > 1
    torch.testing.assert_close(
        torch.tensor([w.point for w in held[0].words]),
        torch.tensor([w.point for w in bare[0].words]),
        atol=1e-3,
        rtol=0,
    )


def test_training_step_reaches_the_object_box_projection():
    model = objects_model().train()
    out = model(make_batch(model))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grad = model.extractor.object_box_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_object_tokens_survive_save_load_and_a_training_stage_adds_them(tmp_path):
    model = objects_model()
    model.save_pretrained(tmp_path / "with")
    loaded = PixelLLM.from_pretrained(tmp_path / "with").eval()
    assert loaded.cfg.extractor.object_tokens == K
    batch = make_batch(model)
    with torch.no_grad():
        features = model.encode_images(batch["images"])
        a, _ = model.encode_prompts(features, prompts_of(batch))
        b, _ = loaded.encode_prompts(loaded.encode_images(batch["images"]), prompts_of(batch))
    torch.testing.assert_close(a, b)

    torch.manual_seed(0)
    build_pixelllm("pixelllm-tiny").save_pretrained(tmp_path / "without")
    staged = initial_model(TrainConfig(init_from=str(tmp_path / "without"), object_tokens=3))
    assert staged.cfg.extractor.object_tokens == 3
    assert not staged.extractor.object_box_proj.weight.any()


def test_kept_features_read_each_image_once_and_give_the_same_visual_tokens(monkeypatch):
    """`encode_images(keep=True)` finds the objects and reads the images for the extractor once; prompts on the
    kept features (whole-image, box and point, two images in one call) then neither search nor read again, and
    only the prompts with a box or point run the extractor. Their visual tokens and mask equal those computed
    from the plain features."""
    model = objects_model()
    images = make_batch(model, seed=1)["images"][:2]
    prompts = Prompts(
        texts=["a", "b", "c", "d"],
        boxes=torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 10.0, 90.0, 90.0], [0.0] * 4, [0.0] * 4]),
        box_mask=torch.tensor([False, True, False, False]),
        points=torch.tensor([[0.0, 0.0], [0.0, 0.0], [40.0, 60.0], [0.0, 0.0]]),
        point_mask=torch.tensor([False, False, True, False]),
        image_index=torch.tensor([1, 0, 1, 0]),
    )
    with torch.no_grad():
        kept = model.encode_images(images, keep=True)
        plain = model.encode_images(images)
        calls, extracted = [], []
        for name in ("read", "object_tokens"):
            method = getattr(model.extractor, name)
            monkeypatch.setattr(
                model.extractor, name, lambda *a, m=method, n=name, **kw: calls.append(n) or m(*a, **kw)
            )
        monkeypatch.setattr(model, "propose", lambda *a, **kw: calls.append("propose"))
        extract = model._extract
        monkeypatch.setattr(model, "_extract", lambda f, p: extracted.append(p.texts) or extract(f, p))
        visual, mask = model.visual_tokens(kept, prompts)
        whole_image, _ = model.visual_tokens(kept, Prompts(texts=["x", "y"], image_index=torch.tensor([1, 1])))
        assert calls == [] and extracted == [["b", "c"]]  # the located prompts only, and only in the first call
        monkeypatch.undo()
        expected, expected_mask = model.visual_tokens(plain, prompts)
    assert kept.reading is not None and kept.reading.objects.shape == (2, K, model.language_model.dim)
    torch.testing.assert_close(visual, expected)
    torch.testing.assert_close(whole_image, expected[[0, 0]])  # prompts "a" and "y" both read image 1 unlocated
    assert torch.equal(mask, expected_mask)
    reordered = ImageFeatures.cat([kept[1:], kept[:1]])  # the reading is indexed and concatenated with the features
    torch.testing.assert_close(reordered.reading.x, kept.reading.x.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(reordered.reading.unlocated, kept.reading.unlocated.flip(0), rtol=0, atol=0)
    assert kept.nbytes > plain.nbytes + kept.reading.tokens.numel() * 4


def test_object_readings_need_object_tokens():
    with pytest.raises(ValueError, match="needs extractor.object_tokens"):
        ExtractorConfig(num_queries=4, anchor_grid=2, object_readings=True)
    with pytest.raises(ValueError, match="no object tokens"):
        build_pixelllm("pixelllm-tiny").add_object_readings()


def test_object_reading_adds_what_a_box_prompt_reads_of_the_object():
    """Zero at first (a model given them begins as it was); then each valid object's token gains the projection of
    the visual tokens a box prompt on its box gets (what a region caption reads), and padding boxes gain nothing."""
    extractor, encoder, features = small_extractor_with_object_tokens()
    boxes = torch.tensor([[8.0, 12.0, 40.0, 30.0], [44.0, 40.0, 76.0, 78.0], [0.0, 0.0, 80.0, 80.0]])
    box_tokens = encoder(boxes=boxes)
    valid = torch.tensor([[True, True, False]])
    objects = dict(object_boxes=boxes[None], object_box_tokens=box_tokens[None], object_valid=valid)
    whole = (encoder(batch_size=1), encoder.pe_layer, torch.tensor([[0.0, 0.0, 80.0, 80.0]]))
    with torch.no_grad():
        before = extractor(features, *whole, **objects)
        extractor.add_object_readings(lm_dim=24)
        assert not extractor.object_reading_proj.weight.any()
        torch.testing.assert_close(extractor(features, *whole, **objects), before)
        perturb_(extractor.object_reading_proj, seed=2, scale=0.5)
        after = extractor(features, *whole, **objects)
        region = extractor(features.expand(3, -1, -1, -1), box_tokens, encoder.pe_layer, boxes)  # (3, Q + 1, D)
    added = after[0, 5:] - before[0, 5:]
    torch.testing.assert_close(added[:2], extractor.object_reading_proj(region[:2].flatten(1)), rtol=1e-4, atol=1e-5)
    assert added[:2].abs().sum() > 0 and not added[2].any()
    torch.testing.assert_close(after[0, :5], before[0, :5])  # the prompt's own visual tokens are untouched


def test_object_readings_train_survive_save_load_and_a_training_stage_adds_them(tmp_path):
    model = objects_model()
    model.add_object_readings()
    perturb_(model.extractor.object_reading_proj, seed=3, scale=0.5)
    out = model.train()(make_batch(model))
    out["loss"].backward()
    assert model.extractor.object_reading_proj.weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path / "with")
    loaded = PixelLLM.from_pretrained(tmp_path / "with").eval()
    assert loaded.cfg.extractor.object_readings
    batch = make_batch(model)
    prompts = prompts_of(batch)
    with torch.no_grad():
        a, _ = model.encode_prompts(model.encode_images(batch["images"]), prompts)
        b, _ = loaded.encode_prompts(loaded.encode_images(batch["images"]), prompts)
        kept, kept_mask = loaded.visual_tokens(loaded.encode_images(batch["images"], keep=True), prompts)
        plain, plain_mask = loaded.visual_tokens(loaded.encode_images(batch["images"]), prompts)
    torch.testing.assert_close(a, b)
    assert torch.equal(kept_mask, plain_mask) and kept_mask[:, -K:].any()
    torch.testing.assert_close(kept[kept_mask], plain[plain_mask], rtol=1e-4, atol=1e-5)  # read once per image

    objects_model().save_pretrained(tmp_path / "without")
    staged = initial_model(TrainConfig(init_from=str(tmp_path / "without"), object_readings=True))
    assert staged.cfg.extractor.object_readings and not staged.extractor.object_reading_proj.weight.any()
