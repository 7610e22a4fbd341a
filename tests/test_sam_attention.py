"""`RelPosAttention` against segment_anything's `Attention` on the same weights: outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from pixelllm.modeling.image_encoder import RelPosAttention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("batch", "height", "width", "mask_bytes"),
    [
        (2, 12, 12, 1 << 30),  # a global block, one block of query rows
        (3, 9, 7, 3 * 2 * 7 * 9 * 7 * 4 * 2),  # not square; two query rows per block, the last block shorter
        (6, 5, 5, 1),  # window attention; one query row per block
    ],
)
@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_rel_pos_attention_equals_segment_anything(
    batch: int, height: int, width: int, mask_bytes: int, use_rel_pos: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    sam = Attention(32, num_heads=2, use_rel_pos=use_rel_pos, input_size=(height, width))
    if use_rel_pos:  # SAM starts them at zero, which would hide a wrong axis
        torch.nn.init.normal_(sam.rel_pos_h, std=0.5)
        torch.nn.init.normal_(sam.rel_pos_w, std=0.5)
    ours = copy.deepcopy(sam)
    ours.__class__ = RelPosAttention
    monkeypatch.setattr(RelPosAttention, "MASK_BYTES", mask_bytes)
    x = torch.randn(batch, height, width, 32)
    x_sam, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = sam(x_sam), ours(x_ours)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_sam.grad, rtol=1e-4, atol=1e-5)
    for (name, p_sam), p_ours in zip(sam.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_sam.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_sam_encoder_runs_rel_pos_attention(tiny_model) -> None:
    blocks = tiny_model.image_encoder.sam.blocks
    assert blocks and all(type(block.attn) is RelPosAttention for block in blocks)
