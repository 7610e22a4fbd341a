"""The tiny preset end to end: training step, generation with a location per token, localization, LoRA merge."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, perturb_
from peft.tuners.lora import LoraLayer

from pixelllm import build_pixelllm
from pixelllm.config import load_config
from pixelllm.modeling.pixelllm import Prompts, _shift_right
from pixelllm.tokenizer import EOS_ID, PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")


def prompts_of(batch: dict) -> Prompts:
    return Prompts(
        texts=batch["prompts"],
        boxes=batch["boxes"],
        box_mask=batch["box_mask"],
        points=batch["points"],
        point_mask=batch["point_mask"],
    )


def lora_tiny(seed: int = 0):
    """`pixelllm-tiny` with a LoRA-adapted (frozen) T5 and nonzero LoRA B, so the adapters change outputs."""
    cfg = load_config("pixelllm-tiny")
    cfg.language_model.mode = "lora"
    torch.manual_seed(seed)
    model = build_pixelllm(cfg)
    perturb_(torch.nn.ParameterList([p for n, p in model.named_parameters() if ".lora_B" in n]), seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def lively_model():
    """A random tiny model whose decoder and vocabulary head are perturbed strongly enough that captions
    vary token by token and beam search differs from greedy decoding on `make_batch(seed=1)` (the first
    perturbation seed that gives that; none would if beam search always returned the greedy caption)."""
    for seed in range(1, 11):
        torch.manual_seed(seed)
        model = build_pixelllm("pixelllm-tiny").eval()
        perturb_(model.language_model.t5.decoder, seed=seed, scale=0.3)
        perturb_(model.language_model.t5.lm_head, seed=seed, scale=0.3)
        batch = make_batch(model, seed=1)
        with torch.no_grad():
            features = model.encode_images(batch["images"])
            greedy = model.generate(features, prompts_of(batch), max_new_tokens=7)
            beams = model.generate(features, prompts_of(batch), max_new_tokens=7, num_beams=3)
        if any(not torch.equal(a.ids, b.ids) for a, b in zip(greedy, beams)):
            return model
    raise AssertionError("beam search gave the greedy caption for every row of 10 perturbed models")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_forward_backward_finite_and_gradients_only_where_trainable(mode):
    if mode == "lora":
        model = lora_tiny()
    else:
        torch.manual_seed(0)
        model = build_pixelllm("pixelllm-tiny")
    model.train()
    batch = make_batch(model)  # caption, region by box, region by point, referring (with a mask target)
    assert batch["box_mask"].any() and batch["point_mask"].any() and batch["mask_valid"].any()
    out = model(batch)
    assert {"loss", "ce", "point_l1", "confidence_bce", "mask"} <= out.keys()
    assert all(torch.isfinite(v) for v in out.values())
    assert out["point_l1"] > 0
    out["loss"].backward()

    params = dict(model.named_parameters())
    frozen_with_grad = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)
    # every trainable part learns; the only trainable tensors without a gradient are SAM prompt-encoder
    # embeddings no prompt here uses (negative points, mask inputs), SAM's mask-quality (IoU) head, whose
    # score we do not use, and timm's `fc_norm`, which EVA applies to the pooled feature for its classifier
    # while we take the patch tokens of `forward_features`
    no_grad = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    unused = ("prompt_encoder.sam.", "mask_head.decoder.iou_prediction_head.", "image_encoder.eva.fc_norm.")
    assert [n for n in no_grad if not n.startswith(unused)] == []
    parts = {n.split(".")[0] + "." + n.split(".")[1] for n, p in params.items() if p.requires_grad}
    for part in parts:
        grads = [p.grad for n, p in params.items() if (n == part or n.startswith(part + ".")) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part
    if mode == "lora":
        t5_trained = {n for n, p in params.items() if n.startswith("language_model.") and p.grad is not None}
        assert t5_trained and all(".lora_" in n for n in t5_trained)


@torch.no_grad()
def teacher_forced_points(model, batch, result, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners and confidence of the point head over `result.ids` fed back through the decoder in one pass."""
    enc, enc_mask = model.encode_prompts(model.encode_images(batch["images"][row : row + 1]), _row(batch, row))
    hidden, _ = model.language_model.decode(_shift_right(result.ids[None]), enc, enc_mask)
    corners, confidence = model.point_head(hidden)
    return corners[0].clamp(0, 1), torch.sigmoid(confidence[0])


def _row(batch: dict, row: int) -> Prompts:
    p = prompts_of(batch)
    return Prompts(
        texts=p.texts[row : row + 1],
        boxes=p.boxes[row : row + 1],
        box_mask=p.box_mask[row : row + 1],
        points=p.points[row : row + 1],
        point_mask=p.point_mask[row : row + 1],
    )


def select(batch: dict, rows: list[int]) -> dict:
    """The training batch of `rows` only."""
    return {k: [v[i] for i in rows] if isinstance(v, list) else v[rows] for k, v in batch.items()}


def test_a_text_with_no_location_at_all_is_left_out_of_the_confidence_loss(tiny_model):
    """A plain caption (COCO's, no traces) says nothing of where its words are: it must not teach the confidence
    that they are nowhere. Its other losses stay; the confidence is learnt from the texts that locate a token."""
    batch = make_batch(tiny_model)  # caption, region by box, region by point, referring
    batch["located"][0] = False
    with torch.no_grad():
        whole = tiny_model(batch)
        rest = tiny_model(select(batch, [1, 2, 3]))
        alone = tiny_model(select(batch, [0]))
    assert whole["confidence_bce"] == pytest.approx(float(rest["confidence_bce"]), rel=1e-5)
    assert whole["ce"] != pytest.approx(float(rest["ce"]), rel=1e-3)  # the caption still trains its words
    assert float(alone["confidence_bce"]) == 0.0 and torch.isfinite(alone["loss"])


def test_corners_are_float32_under_bf16_autocast(tiny_model):
    """bf16 rounds a corner near the middle of the image to 2**-9 of its side (0.75 px of 384): the point head and
    its loss run in float32 under autocast."""
    batch = make_batch(tiny_model)
    dtypes = []
    hook = tiny_model.point_head.register_forward_hook(lambda m, i, out: dtypes.append(out[0].dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny_model(batch)
    finally:
        hook.remove()
    assert dtypes == [torch.float32] and torch.isfinite(out["point_l1"])


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. a KV-cache keyword transformers deprecated
@torch.no_grad()
def test_generation_gives_one_point_pair_per_token(lively_model):
    model = lively_model
    batch = make_batch(model, seed=1)
    features = model.encode_images(batch["images"])
    greedy = model.generate(features, prompts_of(batch), max_new_tokens=7)
    beams = model.generate(features, prompts_of(batch), max_new_tokens=7, num_beams=3)
    assert len(greedy) == len(beams) == len(batch["prompts"])
    assert any(not torch.equal(a.ids, b.ids) for a, b in zip(greedy, beams))  # beams found other captions
    for row, g in [*enumerate(greedy), *enumerate(beams)]:
        n = len(g.ids)
        assert 1 <= n <= 7 and (n == 7 or g.ids[-1] == EOS_ID)
        assert g.corners.shape == (n, 2, 2) and g.confidence.shape == (n,)
        assert ((g.corners >= 0) & (g.corners <= 1)).all()
        assert ((g.confidence >= 0) & (g.confidence <= 1)).all()
        assert PAD_ID not in g.ids[:-1].tolist() and EOS_ID not in g.ids[:-1].tolist()
        # each token's points are the point head on the decoder state that produced that token:
        # the KV-cached (and, for beams, reordered) decoding equals one teacher-forced pass
        corners, confidence = teacher_forced_points(model, batch, g, row)
        torch.testing.assert_close(g.corners, corners, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.confidence, confidence, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_greedy_text_is_the_same_with_and_without_points_and_streamed(lively_model):
    model = lively_model
    batch = make_batch(model, seed=2)
    features = model.encode_images(batch["images"])
    with_points = model.generate(features, prompts_of(batch), max_new_tokens=6)
    text_only = model.generate(features, prompts_of(batch), max_new_tokens=6, with_points=False)
    for a, b in zip(with_points, text_only):
        assert torch.equal(a.ids, b.ids) and b.corners is None
    streamed = list(model.generate_stream(features[0:1], _row(batch, 0), max_new_tokens=6))
    ids = torch.stack([s[0][0] for s in streamed])
    assert torch.equal(ids, with_points[0].ids)
    torch.testing.assert_close(torch.stack([s[1][0] for s in streamed]), with_points[0].corners)


@torch.no_grad()
def test_localize_teacher_forces_text_and_returns_box_at_eos(tiny_model):
    model = tiny_model
    batch = make_batch(model, tasks=("caption", "caption"), seed=3)
    features = model.encode_images(batch["images"])
    texts = ["the red circle", "a small green star on the left"]
    results = model.localize(features, Prompts(texts=[model.cfg.localize_prompt + t for t in texts]), texts)
    for text, g in zip(texts, results):
        ids = model.tokenizer.encode(text)
        assert g.ids.tolist() == ids and ids[-1] == EOS_ID
        assert g.corners.shape == (len(ids), 2, 2) and g.confidence.shape == (len(ids),)
        assert g.score <= 0
    masks = model.masks(features, torch.tensor([[10.0, 20.0, 90.0, 120.0], [0.0, 0.0, 40.0, 40.0]]))
    assert masks.shape == (2, model.cfg.image_size, model.cfg.image_size) and torch.isfinite(masks).all()


@torch.no_grad()
def test_lora_merged_and_unmerged_give_the_same_outputs():
    model = lora_tiny(seed=4)
    batch = make_batch(model, seed=4)
    features = model.encode_images(batch["images"])
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers
    base = lora_layers[0].base_layer.weight.clone()

    def run():
        losses = model(batch)
        gen = model.generate(features, prompts_of(batch), max_new_tokens=6, num_beams=2)
        return losses, gen

    unmerged_losses, unmerged_gen = run()
    model.set_lora_merged(True)
    assert all(m.merged for m in lora_layers)
    assert not torch.allclose(lora_layers[0].base_layer.weight, base)  # the adapters are folded in
    merged_losses, merged_gen = run()
    for k in unmerged_losses:
        torch.testing.assert_close(merged_losses[k], unmerged_losses[k], rtol=1e-5, atol=1e-5)
    for a, b in zip(unmerged_gen, merged_gen):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.corners, b.corners, rtol=1e-5, atol=1e-5)
    model.set_lora_merged(False)
    assert not any(m.merged for m in lora_layers)
    torch.testing.assert_close(lora_layers[0].base_layer.weight, base, rtol=1e-6, atol=1e-6)
    # and the adapters matter: without them the model computes something else
    for m in lora_layers:
        m.lora_B["default"].weight.zero_()
    without = model(batch)
    assert not torch.allclose(without["ce"], unmerged_losses["ce"])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    """A tokenizer with more ids than the language model has embeddings failed later, deep in T5 (IndexError)."""
    from pixelllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train([f"w{i} x{i * 7} y{i * 13} z{i}q{i % 7}" for i in range(400)], vocab_size=300)
    vocab = load_config("pixelllm-tiny").language_model.t5["vocab_size"]
    assert tokenizer.vocab_size > vocab
    with pytest.raises(ValueError, match=f"the tokenizer has {tokenizer.vocab_size} tokens but .* only {vocab}"):
        build_pixelllm("pixelllm-tiny", tokenizer=tokenizer)


def test_images_are_moved_to_the_model_device():
    """CPU images for a model elsewhere (here the meta device, as a GPU would be) are moved, not refused."""
    model = build_pixelllm("pixelllm-tiny", device="meta")
    size = model.cfg.image_size
    assert model.encode_images(torch.rand(1, 3, size, size)).fused.device.type == "meta"
