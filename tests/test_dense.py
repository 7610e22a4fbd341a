"""Dense captioning: the proposal head, `Predictor.dense_caption`, the densecap metrics, and adding a head."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import make_batch

from pixelllm import Predictor, Region
from pixelllm.config import ProposalHeadConfig, load_config
from pixelllm.data.synthetic import generate_scene, scene_seed
from pixelllm.data.tasks import region_caption
from pixelllm.dense_eval import (
    DensePrediction,
    DenseTruth,
    average_precision,
    box_iou_matrix,
    densecap_map,
    merge_regions,
    meteor_exact,
    object_recall,
)
from pixelllm.modeling.pixelllm import ImageFeatures
from pixelllm.modeling.proposal_head import ProposalHead
from pixelllm.train import TrainConfig, initial_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_meteor_exact_known_values():
    """METEOR 1.5's English parameters: function words ("a", ".") weigh 0.25, content words 0.75."""
    assert meteor_exact("a red circle.", "a red circle.") == 1.0  # a whole match has no fragmentation penalty
    assert meteor_exact("blue star", "a red circle") == 0.0
    # "red" and "circle" (0.75 each) of "red big circle" (2.25) and of "a red small circle" (2.5), in two chunks
    p, r = 1.5 / 2.25, 1.5 / 2.5
    expected = p * r / (0.85 * p + 0.15 * r) * (1 - 0.6 * (2 / 2) ** 0.2)
    assert meteor_exact("red big circle", "a red small circle") == pytest.approx(expected)
    # a repeated word is aligned where it makes the fewest chunks: "a small" is one chunk, not the first "a"
    p, r = 1.0 / 2.0, 1.0 / 2.75
    expected = p * r / (0.85 * p + 0.15 * r) * (1 - 0.6 * (1 / 2) ** 0.2)
    assert meteor_exact("a green a small", "a small blue diamond.") == pytest.approx(expected)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR's jar needs Java")
def test_meteor_exact_scores_as_the_meteor_jar_does():
    """Against pycocoevalcap's METEOR 1.5 jar (`-l en -norm`, densecap's scorer): region captions of the synthetic
    vocabulary and scrambled word strings (repeats, no full stop), both ways round. The exact-only formula of
    METEOR 2005 that stood here scored 'a small blue star.' against 'a small red circle.' 0.469, the jar 0.203."""
    meteor = pytest.importorskip("pycocoevalcap.meteor.meteor")
    captions = sorted({region_caption(o) for i in range(40) for o in generate_scene(scene_seed(5, i)).objects})
    words = sorted({w for c in captions for w in c.replace(".", " .").split()})
    rng = random.Random(0)

    def scrambled() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 7)))

    pairs = [tuple(rng.sample(captions, 2)) for _ in range(100)] + [(c, c) for c in captions[:10]]
    pairs += [(scrambled(), rng.choice(captions)) for _ in range(100)]
    pairs += [(rng.choice(captions), scrambled()) for _ in range(50)]
    gts = {i: [reference] for i, (_, reference) in enumerate(pairs)}
    res = {i: [candidate] for i, (candidate, _) in enumerate(pairs)}
    _, jar = meteor.Meteor().compute_score(gts, res)
    ours = [meteor_exact(candidate, reference) for candidate, reference in pairs]
    assert ours == pytest.approx(jar, abs=1e-9)


def test_average_precision_known_value():
    """101-point interpolated: precision 1 up to recall 0.5 (51 points), then 2/3 up to recall 1 (50 points)."""
    ap = average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), num_truth=2)
    assert ap == pytest.approx((51 * 1.0 + 50 * (2 / 3)) / 101)
    assert average_precision(np.array([0.5]), np.array([True]), num_truth=4) == pytest.approx(26 / 101)


def test_densecap_map_rewards_right_boxes_and_captions():
    truth = DenseTruth(np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), ["a red circle", "a blue square"])
    perfect = DensePrediction(truth.boxes.copy(), np.array([0.9, 0.8]), list(truth.captions))
    assert densecap_map([perfect], [truth])["dense_map"] == pytest.approx(1.0)
    wrong_words = DensePrediction(truth.boxes.copy(), np.array([0.9, 0.8]), ["green star", "purple star"])
    scores = densecap_map([wrong_words], [truth])
    assert scores["dense_ap@0.5_iou_any_caption"] == pytest.approx(1.0)
    assert scores["dense_map"] == 0.0  # METEOR 0 passes no caption threshold: it must exceed it
    duplicate = DensePrediction(np.array([[0, 0, 10, 10]] * 2), np.array([0.9, 0.8]), ["a red circle"] * 2)
    assert densecap_map([duplicate], [truth])["dense_map"] == pytest.approx(51 / 101)  # recall 0.5 at precision 1

    def same(a: str, b: str) -> bool:
        return a == b

    assert object_recall([perfect], [truth], same) == 1.0
    assert object_recall([duplicate], [truth], same) == 0.5
    shifted = DensePrediction(truth.boxes + 3, np.array([0.9, 0.8]), list(truth.captions))
    assert object_recall([shifted], [truth], same) == 0.5  # the big box still overlaps >= 0.5
    # the best one-to-one matching: taking, for the first object, the prediction it overlaps most (0.82, shared
    # with the second) left the second none, and the recall was 0.5
    pair = DenseTruth(np.array([[0, 0, 10, 10], [2, 0, 12, 10]]), ["a red circle"] * 2)
    between = DensePrediction(np.array([[1, 0, 11, 10], [-2, 0, 8, 10]]), np.array([0.9, 0.8]), ["a red circle"] * 2)
    assert object_recall([between], [pair], same) == 1.0


def test_densecap_map_follows_densecaps_own_matching():
    """As densecap's eval_utils.lua: a region is taken by the best-scored prediction whose best match it is, even
    one too loose to count, so a tight duplicate after it counts at no threshold; regions overlapping by >= 0.7 are
    one, with every caption of theirs a reference."""
    truth = DenseTruth(np.array([[0, 0, 10, 10]]), ["a red circle"])
    loose_first = DensePrediction(np.array([[0, 0, 6, 6], [0, 0, 10, 10]]), np.array([0.9, 0.8]), ["a red circle"] * 2)
    assert box_iou_matrix(loose_first.boxes[:1], truth.boxes)[0, 0] == pytest.approx(0.36)
    assert densecap_map([loose_first], [truth])["dense_map"] == pytest.approx(1 / 5)  # only IoU 0.3 counts it
    nowhere = DensePrediction(np.array([[50, 50, 60, 60]]), np.array([0.9]), ["a red circle"])
    assert densecap_map([nowhere], [truth]) == {"dense_map": 0.0, "dense_ap@0.5_iou_any_caption": 0.0}
    twice = DenseTruth(
        np.array([[0, 0, 10, 10], [0, 0, 10, 11], [30, 30, 40, 40]]), ["a red circle", "a disc", "a cube"]
    )
    boxes, references = merge_regions(twice)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10.5], [30, 30, 40, 40]])
    assert references == [["a red circle", "a disc"], ["a cube"]]
    one_each = DensePrediction(np.array([[0, 0, 10, 10], [30, 30, 40, 40]]), np.array([0.9, 0.8]), ["a disc", "a cube"])
    assert densecap_map([one_each], [twice])["dense_map"] == pytest.approx(1.0)  # two regions, both found


def test_proposal_head_learns_and_decodes_boxes():
    """Overfit the head on fixed features: its proposals must come back as the target boxes."""
    torch.manual_seed(0)
    head = ProposalHead(ProposalHeadConfig(hidden_dim=32), in_dim=16)
    features = torch.randn(2, 16, 20, 20)
    boxes = [torch.tensor([[0.1, 0.1, 0.35, 0.3], [0.6, 0.5, 0.95, 0.9]]), torch.tensor([[0.3, 0.4, 0.7, 0.6]])]
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = head.loss(features, boxes)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.2 * first
    found = head.propose(features, score_threshold=0.3, nms_iou=0.5)
    for (pred, scores), target in zip(found, boxes):
        assert len(pred) == len(target)
        assert torch.all(scores[:-1] >= scores[1:])
        iou = _iou(pred, target)
        assert iou.max(0).values.min() > 0.7, iou


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torchvision

    return torchvision.ops.box_iou(a, b)


def test_training_batch_carries_object_boxes_and_proposal_loss(tiny_model):
    batch = make_batch(tiny_model)
    assert batch["objects_valid"].all()
    assert all(b.shape[1] == 4 and len(b) >= 1 for b in batch["object_boxes"])
    losses = tiny_model(batch)
    assert "proposal" in losses and torch.isfinite(losses["proposal"])
    losses["loss"].backward()
    assert tiny_model.proposal_head.objectness.weight.grad is not None
    tiny_model.zero_grad(set_to_none=True)


def test_dense_caption_returns_regions_in_image_pixels(tiny_model):
    predictor = Predictor(tiny_model)
    scene = generate_scene(5)
    h, w = scene.image.shape[:2]
    predictor.set_image(scene.image)
    regions = predictor.dense_caption(score_threshold=0.0, max_regions=5)
    assert 1 <= len(regions) <= 5
    assert all(isinstance(r, Region) for r in regions)
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    for r in regions:
        x0, y0, x1, y1 = r.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # the caption is the model's region caption of that box
        assert r.caption.text == predictor.caption(box=r.box).text
    assert predictor.dense_caption(score_threshold=1.0) == []
    with pytest.raises(ValueError, match="score_threshold"):
        predictor.dense_caption(score_threshold=2)


def test_model_without_proposal_head_says_how_to_get_one(tiny_model, tmp_path):
    cfg = load_config("pixelllm-tiny")
    cfg.proposal_head = None
    from pixelllm import build_pixelllm

    model = build_pixelllm(cfg, tokenizer=tiny_model.tokenizer)
    predictor = Predictor(model)
    predictor.set_image(generate_scene(1).image)
    with pytest.raises(RuntimeError, match="no proposal head"):
        predictor.dense_caption()
    # a second stage from it adds a fresh head (the model's other weights are kept)
    model.save_pretrained(tmp_path / "captioner")
    train_cfg = TrainConfig(model="pixelllm-tiny", init_from=str(tmp_path / "captioner"))
    started = initial_model(train_cfg)
    assert started.proposal_head is not None
    assert started.cfg.loss.proposal_weight == load_config("pixelllm-tiny").loss.proposal_weight
    torch.testing.assert_close(started.point_head.state_dict(), model.point_head.state_dict())
    started.save_pretrained(tmp_path / "dense")
    saved = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert saved["proposal_head"] == {"hidden_dim": 64, "box_weight": 2.0}


def test_dense_caption_embeddings_batch_equals_one_by_one(tiny_model):
    predictor = Predictor(tiny_model)
    embeddings = [predictor.embed(generate_scene(s).image) for s in (2, 3)]
    batched = predictor.dense_caption_embeddings(embeddings, score_threshold=0.0, max_regions=4)
    for emb, regions in zip(embeddings, batched):
        alone = predictor.dense_caption_embeddings([emb], score_threshold=0.0, max_regions=4)[0]
        assert [r.caption.text for r in regions] == [r.caption.text for r in alone]
        np.testing.assert_allclose([r.box for r in regions], [r.box for r in alone], atol=1e-3)


@contextmanager
def confident_proposals(model, shift: float = 8.0) -> Iterator[None]:
    """Raise the random proposal head's objectness so that every peak of its map passes the thresholds."""
    bias = model.proposal_head.objectness.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias += shift
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


# hand-made proposals (model-input pixels) on a 160x120 image, which the 160 px model takes unscaled; the last one
# lies in the padding below row 120
PROPOSALS = (
    torch.tensor(
        [[0.0, 0.0, 40.0, 30.0], [100.0, 80.0, 150.0, 110.0], [60.0, 60.0, 70.0, 70.0], [10.0, 125.0, 50.0, 155.0]]
    ),
    torch.tensor([0.9, 0.8, 0.7, 0.6]),
)
IMAGE = np.full((120, 160, 3), 128, np.uint8)


def test_nearest_proposal_takes_the_nearest_centre(tiny_model):
    assert tiny_model.cfg.image_size == 160
    predictor = Predictor(tiny_model)
    transform = predictor.embed(IMAGE).transform
    nearest = {  # normalized corners -> the proposal whose centre is nearest theirs (L1), image pixels
        (0.0, 0.0, 0.2, 0.2): (0.0, 0.0, 40.0, 30.0),
        (0.9, 0.7, 0.7, 0.5): (100.0, 80.0, 150.0, 110.0),
        (0.35, 0.35, 0.45, 0.45): (60.0, 60.0, 70.0, 70.0),
        (0.15, 0.85, 0.25, 0.95): None,  # nearest the one in the padding, which clips to nothing
    }
    centres = np.array([np.reshape(corners, (2, 2)).mean(axis=0) * 160 for corners in nearest])
    got = predictor._nearest_proposals(centres, PROPOSALS, transform)
    for box, expected in zip(got, nearest.values()):
        assert box == (expected if expected is None else pytest.approx(expected))
    nothing = (PROPOSALS[0][:0], PROPOSALS[1][:0])
    assert predictor._nearest_proposals(centres[:2], nothing, transform) == [None, None]


def test_localize_refines_the_box_with_a_proposal(tiny_model):
    predictor = Predictor(tiny_model)
    scene = generate_scene(5)
    predictor.set_image(scene.image)
    text = "the red circle"
    plain = predictor.localize(text)  # no proposal of the random head scores 0.3: nothing to snap to
    assert plain.regressed_box is None
    with confident_proposals(tiny_model):
        predictor.set_image(scene.image)  # an embedding keeps the proposals found when it is made
        refined = predictor.localize(text, mask=True)
        unrefined = predictor.localize(text, refine=False)
        regions = predictor.dense_caption(max_regions=32)
    assert unrefined.box == plain.box and unrefined.regressed_box is None
    assert refined.regressed_box == pytest.approx(plain.box)
    assert refined.box != pytest.approx(plain.box)
    assert any(refined.box == pytest.approx(r.box) for r in regions)  # the same proposals dense captioning sees
    assert refined.words == plain.words and refined.mask.shape == scene.image.shape[:2]


def test_kept_embeddings_answer_default_proposal_searches_without_the_head(tiny_model, monkeypatch):
    """An embedding keeps its image's proposals: captions, localize and default dense captions on it run no
    proposal head, and get what a search of the bare features finds; other searches run the head."""
    predictor = Predictor(tiny_model)
    with confident_proposals(tiny_model):
        embeddings = [predictor.embed(generate_scene(s).image) for s in (1, 6)]
        bare = [ImageFeatures(e.features.fused, e.features.sam) for e in embeddings]
        fresh = [tiny_model.propose(f)[0] for f in bare]
        fresh_2 = [tiny_model.propose(f, max_proposals=2)[0] for f in bare]
    assert all(len(boxes) > 2 for boxes, _ in fresh)
    both = ImageFeatures.cat([e.features for e in embeddings])
    kept = tiny_model.propose(both)
    kept_2 = tiny_model.propose(both[[1]], max_proposals=2) + tiny_model.propose(both[:1], max_proposals=2)
    for got, expected in zip(kept + kept_2, fresh + fresh_2[::-1], strict=True):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for index in (torch.tensor([False, True]), torch.tensor([1]), [1], slice(1, 2)):  # any way of indexing a batch
        assert torch.equal(both[index].proposals[0][0], fresh[1][0])
    assert embeddings[0].nbytes > bare[0].nbytes

    searches = []
    propose = tiny_model.proposal_head.propose
    monkeypatch.setattr(tiny_model.proposal_head, "propose", lambda *a, **kw: searches.append(1) or propose(*a, **kw))
    emb = embeddings[0]
    predictor.caption_embeddings([emb], max_new_tokens=6)
    localization = predictor.localize_embeddings([emb], ["the red circle"])[0]
    regions = predictor.dense_caption_embeddings([emb], max_new_tokens=4)[0]
    assert searches == []
    assert localization.regressed_box is not None  # refined with a kept proposal
    assert len(regions) == len(fresh[0][0])
    predictor.dense_caption_embeddings([emb], nms_iou=0.6, max_new_tokens=4)
    assert searches == [1]  # another overlap searches again


def test_localize_keeps_its_box_when_the_nearest_proposal_lies_in_the_padding(tiny_model, monkeypatch):
    predictor = Predictor(tiny_model)
    predictor.set_image(np.full((40, 320, 3), 128, np.uint8))  # model-input rows below 20 px are padding
    plain = predictor.localize("the red circle", refine=False)

    def propose_in_padding(features, score_threshold=0.3, nms_iou=0.5, max_proposals=32):
        return [(torch.tensor([[10.0, 100.0, 50.0, 150.0]]), torch.tensor([0.9]))] * len(features.fused)

    monkeypatch.setattr(tiny_model, "propose", propose_in_padding)
    refined = predictor.localize("the red circle", mask=True)
    assert refined.box == plain.box and refined.regressed_box is None
