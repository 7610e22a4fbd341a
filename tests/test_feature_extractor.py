"""The prompt feature extractor: anchored queries, the shared position basis, the free (paper) queries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer

from pixelllm import build_pixelllm
from pixelllm.config import ExtractorConfig, load_config
from pixelllm.modeling.feature_extractor import PromptFeatureExtractor, anchor_grid_points, two_way_forward
from pixelllm.modeling.prompt_encoder import LocationPromptEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_anchor_grid_points_tile_the_box_row_major():
    points = anchor_grid_points(torch.tensor([[10.0, 20.0, 50.0, 40.0]]), grid=2)
    assert torch.equal(points, torch.tensor([[[20.0, 25.0], [40.0, 25.0], [20.0, 35.0], [40.0, 35.0]]]))


@pytest.mark.parametrize("skip_first_layer_pe", [True, False])
@pytest.mark.parametrize("image_index", [None, [0, 0, 0], [1, 0, 1, 1]])
def test_two_way_forward_matches_sam_with_images_shared_by_prompts(skip_first_layer_pe, image_index):
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64).eval()
    transformer.layers[0].skip_first_layer_pe = skip_first_layer_pe
    num_images = 3 if image_index is None else max(image_index) + 1
    index = None if image_index is None else torch.tensor(image_index)
    images = torch.randn(num_images, 32, 5, 6)
    pe = torch.randn(1, 32, 5, 6)
    tokens = torch.randn(num_images if index is None else len(index), 7, 32)
    per_prompt = images if index is None else images[index]
    expected, _ = transformer(per_prompt, pe.expand(len(per_prompt), -1, -1, -1), tokens)
    got = two_way_forward(transformer, images.flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2), tokens, index)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_anchor_boxes_follow_the_prompt_kind():
    encoder = LocationPromptEncoder(embed_dim=16, image_embedding_size=10, image_size=160)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    points = torch.tensor([[0.0, 0.0], [80.0, 100.0], [0.0, 0.0]])
    out = encoder.anchor_boxes(
        0.25,
        boxes=boxes,
        box_mask=torch.tensor([True, False, False]),
        points=points,
        point_mask=torch.tensor([False, True, False]),
    )
    assert torch.equal(out[0], boxes[0])  # a box prompt: the box
    assert torch.equal(out[1], torch.tensor([60.0, 80.0, 100.0, 120.0]))  # a point: 0.25 x 160 around it
    assert torch.equal(out[2], torch.tensor([0.0, 0.0, 160.0, 160.0]))  # no prompt: the global box
    assert torch.equal(encoder.anchor_boxes(0.25, batch_size=2), torch.tensor([[0.0, 0.0, 160.0, 160.0]] * 2))


def test_too_few_queries_for_the_anchor_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="anchor_grid 3 needs 9 queries"):
        ExtractorConfig(num_queries=8, anchor_grid=3)


def _extractor(anchor_grid: int) -> tuple[PromptFeatureExtractor, LocationPromptEncoder]:
    torch.manual_seed(0)
    cfg = ExtractorConfig(
        num_queries=4, width=32, depth=2, num_heads=2, mlp_dim=64, query_dim=32, anchor_grid=anchor_grid
    )
    return PromptFeatureExtractor(cfg, in_dim=8, prompt_dim=16, lm_dim=24, image_size=80), LocationPromptEncoder(
        16, 10, 80
    )


def test_anchored_queries_read_the_cells_under_their_anchors():
    """Query i starts from the features at its anchor: changing the image only far from the box changes the
    anchored queries' inputs not at all, and changing it under one anchor changes that query most."""
    extractor, encoder = _extractor(anchor_grid=2)
    extractor.eval()
    features = torch.randn(1, 8, 10, 10)
    box = torch.tensor([[0.0, 0.0, 40.0, 40.0]])  # the top-left quarter: cells 0..4 x 0..4, anchors at 10 / 30 px
    tokens = encoder(boxes=box)
    base = extractor(features, tokens, encoder.pe_layer, box)
    assert base.shape == (1, 5, 24)  # 4 queries + the layout token

    captured = []
    value_proj = extractor.transformer.layers[0].self_attn.v_proj  # its input: the tokens entering the transformer
    hook = value_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    extractor(features, tokens, encoder.pe_layer, box)
    far = features.clone()
    far[..., 6:, 6:] += 5.0  # bottom-right cells, outside the box
    extractor(far, tokens, encoder.pe_layer, box)
    under = features.clone()
    under[..., 1, 1] += 5.0  # the cell under the first anchor (10 px, 10 px)
    extractor(under, tokens, encoder.pe_layer, box)
    hook.remove()
    plain, far_tokens, under_tokens = captured
    # GroupNorm over the whole map shifts every cell a little when any cell changes, so compare sizes.
    far_change = (far_tokens[0, :4] - plain[0, :4]).norm(dim=-1)
    under_change = (under_tokens[0, :4] - plain[0, :4]).norm(dim=-1)
    assert int(under_change.argmax()) == 0
    assert under_change[0] > 5 * far_change.max()


def _first_self_attention_similarity(extractor: PromptFeatureExtractor, encoder: LocationPromptEncoder) -> torch.Tensor:
    """Cosine similarity (4, 4) of the first 4 queries after the first layer's self-attention (and its norm) to
    each of them before it, on random features and a box."""
    layer, seen = extractor.transformer.layers[0], []
    hooks = [
        layer.self_attn.v_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0])),  # the tokens entering
        layer.norm1.register_forward_hook(lambda m, args, out: seen.append(out)),
    ]
    box = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    with torch.no_grad():
        extractor.eval()(torch.randn(1, 8, 10, 10), encoder(boxes=box), encoder.pe_layer, box)
    for hook in hooks:
        hook.remove()
    before, after = seen[0][0, :4], seen[1][0, :4]
    return F.cosine_similarity(after[:, None], before[None], dim=-1)


def test_anchored_queries_keep_their_own_content_through_the_first_self_attention():
    """An anchored query leaves the first self-attention still carrying what it sampled, unlike the other queries;
    SAM's first layer, kept for the free (paper) queries, replaces each token by the attention mix (nothing of it
    is kept: measured |cos| < 0.4 where the anchored queries keep > 0.9)."""
    anchored = _first_self_attention_similarity(*_extractor(anchor_grid=2))
    assert (anchored.diagonal() > 0.8).all() and torch.equal(anchored.argmax(dim=1), torch.arange(4))
    free = _first_self_attention_similarity(*_extractor(anchor_grid=0))
    assert (free.diagonal().abs() < 0.5).all()


def test_anchored_extractor_needs_anchor_boxes():
    extractor, encoder = _extractor(anchor_grid=2)
    with pytest.raises(ValueError, match="anchor_boxes"):
        extractor(torch.randn(1, 8, 10, 10), encoder(batch_size=1), encoder.pe_layer)


def test_tiny_preset_anchors_and_paper_preset_does_not():
    assert load_config("pixelllm-tiny").extractor.anchor_grid == 4
    assert load_config("pixelllm-t5xl").extractor.anchor_grid == 0


def test_shared_images_give_the_same_tokens_as_repeated_images():
    """`image_index` (many prompts on one image's features) equals repeating the features per prompt."""
    torch.manual_seed(0)
    model = build_pixelllm("pixelllm-tiny").eval()
    features = torch.randn(1, model.image_encoder.out_dim, 20, 20)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [80.0, 20.0, 150.0, 90.0]])
    tokens = model.prompt_encoder(boxes=boxes)
    anchors = model.prompt_encoder.anchor_boxes(0.25, boxes=boxes)
    pe = model.prompt_encoder.pe_layer
    with torch.no_grad():
        shared = model.extractor(features, tokens, pe, anchors, torch.tensor([0, 0]))
        repeated = model.extractor(features.expand(2, -1, -1, -1), tokens, pe, anchors)
    torch.testing.assert_close(shared, repeated)
    assert not torch.allclose(shared[0], shared[1])  # different boxes read different tokens
