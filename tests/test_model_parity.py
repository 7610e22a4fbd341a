"""Our parts against the peer libraries' own modules on the same weights: SAM image encoder, timm EVA02, T5."""

from __future__ import annotations

import pytest
import torch
from conftest import peer_eva, peer_sam, peer_t5
from timm.data import resolve_model_data_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_image_encoder_a_equals_segment_anything(tiny_model, images):
    cfg = tiny_model.cfg
    sam = peer_sam(cfg, cfg.image_size)
    sam.image_encoder.load_state_dict(tiny_model.image_encoder.sam.state_dict())
    # SAM's own preprocessing: 0-255 pixels normalized by its pixel_mean/std (and padded, a no-op at S x S)
    expected = sam.image_encoder(sam.preprocess(images * 255))
    got = tiny_model.image_encoder.encode_sam(images)
    assert got.shape == (2, cfg.sam.out_chans, *(2 * [cfg.image_size // cfg.sam.patch_size]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the fused map carries exactly these SAM features (same grid here) next to EVA's
    fused, sam_feats = tiny_model.image_encoder(images)
    torch.testing.assert_close(sam_feats, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[:, : cfg.sam.out_chans], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_image_encoder_b_equals_timm_eva02(tiny_model, images):
    cfg = tiny_model.cfg
    eva = peer_eva(cfg)
    eva.load_state_dict(tiny_model.image_encoder.eva.state_dict())
    data = resolve_model_data_config(eva)  # timm's own normalization for this model
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    tokens = eva.forward_features((images - mean) / std)[:, eva.num_prefix_tokens :]
    got = tiny_model.image_encoder.encode_eva(images)
    h, w = eva.patch_embed.grid_size
    assert got.shape == (2, eva.embed_dim, h, w)
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), tokens, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_language_model_equals_transformers_t5(tiny_model):
    cfg = tiny_model.cfg
    lm = tiny_model.language_model
    t5 = peer_t5(cfg)
    t5.load_state_dict(lm.t5.state_dict())
    gen = torch.Generator().manual_seed(1)
    b, q, d = 2, 5, lm.dim
    visual = torch.randn(b, q, d, generator=gen)
    prompt_ids = torch.randint(3, lm.vocab_size, (b, 6), generator=gen)
    prompt_mask = torch.ones(b, 6, dtype=torch.long)
    prompt_mask[1, 4:] = 0  # a padded prompt
    decoder_ids = torch.randint(3, lm.vocab_size, (b, 7), generator=gen)

    states, mask = lm.encode(visual, prompt_ids, prompt_mask)
    hidden, _ = lm.decode(decoder_ids, states, mask)
    logits = lm.logits(hidden)

    embeds = torch.cat([visual, t5.get_input_embeddings()(prompt_ids)], dim=1)
    attention = torch.cat([torch.ones(b, q, dtype=torch.long), prompt_mask], dim=1)
    out = t5(
        inputs_embeds=embeds,
        attention_mask=attention,
        decoder_input_ids=decoder_ids,
        output_hidden_states=True,
    )
    torch.testing.assert_close(mask, attention)
    torch.testing.assert_close(states, out.encoder_last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, out.decoder_hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
