"""Loaders of the official formats, on tiny files the peer libraries build and save themselves, and our own
save_pretrained / from_pretrained. Wrong, truncated and mismatched files must raise `CheckpointError` naming
the file and the first mismatched keys and shapes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import (
    OFFICIAL_IMAGE_SIZE,
    PEER_EVA,
    PEER_SAM_IMAGE_SIZE,
    make_batch,
    official_tiny_config,
    peer_sam,
    peer_t5,
    perturb_,
    train_tokenizer,
)
from safetensors.torch import load_file, save_file
from segment_anything.modeling.image_encoder import get_rel_pos
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

from pixelllm import PixelLLM, Tokenizer, build_pixelllm
from pixelllm.build import load_model
from pixelllm.checkpoints import (
    CheckpointError,
    load_eva_checkpoint,
    load_sam_checkpoint,
    load_t5,
    resize_input,
)
from pixelllm.config import load_config
from pixelllm.modeling.pixelllm import Prompts

pytestmark = pytest.mark.usefixtures("one_thread")

# the SAM checkpoint format: top-level prefix -> our module holding that part
SAM_PARTS = {
    "image_encoder": lambda m: m.image_encoder.sam,
    "prompt_encoder": lambda m: m.prompt_encoder.sam,
    "mask_decoder": lambda m: m.mask_head.decoder,
}


def sam_file_parts(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(path, weights_only=True)
    return {p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")} for p in SAM_PARTS}


def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def first_shape_mismatch(file_state: dict, own_state: dict) -> str:
    """The first key, in the model's order, whose shape differs: what the error must name."""
    return next(k for k, v in own_state.items() if k in file_state and file_state[k].shape != v.shape)


@pytest.fixture(scope="module")
def sam_same_model(official_files):
    """The official config with a SAM checkpoint saved at exactly our input size (no resampling)."""
    return build_pixelllm(official_tiny_config(), sam_checkpoint=official_files["sam_same"])


# ------------------------------------------------------------------ SAM
def test_sam_same_size_loads_every_weight_exactly(official_files, sam_same_model):
    for prefix, part in sam_file_parts(official_files["sam_same"]).items():
        ours = SAM_PARTS[prefix](sam_same_model).state_dict()
        assert ours.keys() == part.keys()
        for k, v in part.items():
            assert torch.equal(ours[k], v), f"{prefix}.{k}"


@torch.no_grad()
def test_sam_same_size_outputs_equal_segment_anything(official_files, sam_same_model):
    cfg = official_tiny_config()
    sam = peer_sam(cfg, cfg.image_size)
    sam.load_state_dict(torch.load(official_files["sam_same"], weights_only=True))
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    feats = sam.image_encoder(sam.preprocess(images * 255))
    torch.testing.assert_close(sam_same_model.image_encoder.encode_sam(images), feats, rtol=1e-5, atol=1e-5)
    # the mask path: SAM's prompt encoder + mask decoder on a box, as `Sam.forward` wires them
    boxes = torch.tensor([[10.0, 20.0, 70.0, 90.0], [0.0, 0.0, 50.0, 30.0]])
    expected = []
    for i in range(2):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
        low, _ = sam.mask_decoder(
            image_embeddings=feats[i : i + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        expected.append(low[:, 0])
    got = sam_same_model.mask_head(feats, boxes, sam_same_model.prompt_encoder)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_sam_other_size_resamples_position_tables(official_files, official_model):
    cfg = official_model.cfg
    parts = sam_file_parts(official_files["sam_resized"])
    ours = official_model.image_encoder.sam.state_dict()
    grid = cfg.image_size // cfg.sam.patch_size
    assert parts["image_encoder"]["pos_embed"].shape[1] == PEER_SAM_IMAGE_SIZE // cfg.sam.patch_size != grid
    resampled = set()
    for k, v in parts["image_encoder"].items():
        if v.shape == ours[k].shape:
            assert torch.equal(ours[k], v), k
            continue
        resampled.add(k)
        if k == "pos_embed":
            expected = resample_abs_pos_embed_nhwc(v, [grid, grid], interpolation="bicubic", antialias=False)
            torch.testing.assert_close(ours[k], expected)
        else:
            # a global block's relative position table: SAM itself resizes it at run time in `get_rel_pos`
            # when the grid differs, so the resampled table must index to exactly what SAM would use
            torch.testing.assert_close(get_rel_pos(grid, grid, ours[k]), get_rel_pos(grid, grid, v))
    global_tables = {f"blocks.{i}.attn.rel_pos_{a}" for i in cfg.sam.global_attn_indexes for a in "hw"}
    assert resampled == {"pos_embed"} | global_tables
    for prefix in ("prompt_encoder", "mask_decoder"):
        own = SAM_PARTS[prefix](official_model).state_dict()
        for k, v in parts[prefix].items():
            assert torch.equal(own[k], v), f"{prefix}.{k}"


def test_sam_mismatched_widths_name_file_and_first_shapes(tmp_path):
    cfg = official_tiny_config()
    other = official_tiny_config()
    other.sam.embed_dim = 32
    path = tmp_path / "sam_narrow.pth"
    torch.save(peer_sam(other, cfg.image_size).state_dict(), path)
    model = build_pixelllm(cfg)
    with pytest.raises(CheckpointError) as e:
        load_sam_checkpoint(model, path)
    msg = str(e.value)
    part = sam_file_parts(path)["image_encoder"]
    own = model.image_encoder.sam.state_dict()
    key = first_shape_mismatch(part, own)
    assert str(path) in msg and "image_encoder" in msg
    assert f"{key}: file {tuple(part[key].shape)} vs model {tuple(own[key].shape)}" in msg


def test_sam_deeper_encoder_names_unexpected_keys(tmp_path):
    cfg = official_tiny_config()
    other = official_tiny_config()
    other.sam.depth += 1
    path = tmp_path / "sam_deeper.pth"
    torch.save(peer_sam(other, cfg.image_size).state_dict(), path)
    model = build_pixelllm(cfg)
    with pytest.raises(CheckpointError) as e:
        load_sam_checkpoint(model, path)
    part = sam_file_parts(path)["image_encoder"]
    extra = [k for k in part if k not in model.image_encoder.sam.state_dict()]
    assert extra and str(path) in str(e.value) and "unexpected" in str(e.value) and extra[0] in str(e.value)


# ------------------------------------------------------------------ EVA02 (timm)
@pytest.mark.parametrize("fmt", ["eva_pth", "eva_safetensors"])
@torch.no_grad()
def test_eva_weights_load_like_timm_loads_them(official_files, fmt):
    path = official_files[fmt]
    cfg = official_tiny_config()
    model = build_pixelllm(cfg, eva_checkpoint=path)
    # timm's own loader, from the same file, at our input size (it resamples pos_embed itself)
    reference = timm.create_model(
        PEER_EVA,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": 10},  # timm drops a head of another size
        num_classes=0,
        img_size=OFFICIAL_IMAGE_SIZE,
    ).eval()
    saved = timm.create_model(PEER_EVA).state_dict()
    assert reference.pos_embed.shape != saved["pos_embed"].shape  # 224 px -> 112 px
    ours = model.image_encoder.eva.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(ours[k], v), k
    images = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(reference.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(reference.pretrained_cfg["std"]).view(1, 3, 1, 1)
    tokens = reference.forward_features((images - mean) / std)[:, reference.num_prefix_tokens :]
    got = model.image_encoder.encode_eva(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, tokens, rtol=1e-5, atol=1e-5)
    # with final_norm (the presets with official EVA02 weights), the tokens go through the file's final LayerNorm
    cfg.eva.final_norm = True
    normed = build_pixelllm(cfg, eva_checkpoint=path).image_encoder.encode_eva(images).flatten(2).transpose(1, 2)
    assert not torch.equal(reference.fc_norm.weight, torch.ones_like(reference.fc_norm.weight))  # the file's
    torch.testing.assert_close(normed, reference.fc_norm(tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normed, tokens, atol=1e-2)


@pytest.mark.parametrize("preset", ["pixelllm-t5xl", "pixelllm-base"])
def test_presets_for_official_weights_follow_the_paper(preset):
    """EVA02 tokens through the final LayerNorm (scenic's use_ln_post); LoRA r 32, scale 2, no LoRA dropout."""
    cfg = load_config(preset)
    assert cfg.eva.final_norm and cfg.language_model.mode == "lora"
    lora = cfg.language_model.lora
    assert (lora.r, lora.alpha / lora.r, lora.dropout, lora.target_modules) == (32, 2.0, 0.0, ["q", "v"])


def test_eva_mismatched_model_names_file_and_shapes(tmp_path):
    path = tmp_path / "eva_wide.safetensors"
    other = timm.create_model(PEER_EVA, embed_dim=96, num_heads=3)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    model = build_pixelllm(official_tiny_config())
    with pytest.raises(CheckpointError) as e:
        load_eva_checkpoint(model, path)
    assert str(path) in str(e.value)
    own = model.image_encoder.eva.state_dict()
    key = first_shape_mismatch(other.state_dict(), own)
    assert key in str(e.value) and "shape" in str(e.value)


def test_eva_shallower_model_names_missing_keys(tmp_path):
    path = tmp_path / "eva_shallow.pth"
    torch.save(timm.create_model(PEER_EVA, depth=2).state_dict(), path)
    model = build_pixelllm(official_tiny_config())
    with pytest.raises(CheckpointError) as e:
        load_eva_checkpoint(model, path)
    first_missing = next(k for k in model.image_encoder.eva.state_dict() if k.startswith("blocks.2."))
    assert str(path) in str(e.value) and "missing" in str(e.value) and first_missing in str(e.value)


# ------------------------------------------------------------------ T5 (transformers)
@torch.no_grad()
def test_t5_directory_loads_weights_and_tokenizer(official_files, official_model):
    from transformers import T5ForConditionalGeneration

    reference = T5ForConditionalGeneration.from_pretrained(official_files["t5"]).eval()
    lm = official_model.language_model
    # LoRA wraps q and v (`q.base_layer`); every base weight is the saved one
    base = {k.replace(".base_layer", ""): v for k, v in lm.t5.state_dict().items() if ".lora_" not in k}
    ref = reference.state_dict()
    assert base.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(base[k], v), k
    # LoRA B starts at zero, so the adapted model computes exactly the saved T5
    gen = torch.Generator().manual_seed(0)
    visual = torch.randn(1, 4, lm.dim, generator=gen)
    ids = torch.randint(3, lm.vocab_size, (1, 5), generator=gen)
    dec = torch.randint(3, lm.vocab_size, (1, 6), generator=gen)
    states, mask = lm.encode(visual, ids, torch.ones_like(ids))
    hidden, _ = lm.decode(dec, states, mask)
    embeds = torch.cat([visual, reference.get_input_embeddings()(ids)], 1)
    out = reference(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(lm.logits(hidden), out.logits, rtol=1e-5, atol=1e-5)
    # the directory's tokenizer, and the config updated to the loaded T5's shape
    text = "a small green star in the middle."
    assert official_model.tokenizer.encode(text) == Tokenizer.from_file(official_files["t5"]).encode(text)
    assert official_model.cfg.language_model.t5["d_model"] == reference.config.d_model
    # Flan-T5's layout: the LM head is the file's own, not the input embeddings, and outputs are not scaled;
    # the config records that, so a T5 built from it (no t5_path) does not scale them either
    head = load_file(str(official_files["t5"] / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(lm.t5.lm_head.weight, head) and not torch.equal(head, lm.t5.shared.weight)
    assert official_model.cfg.language_model.t5["tie_word_embeddings"] is False
    rebuilt = PixelLLM(official_model.cfg, official_model.tokenizer).language_model.t5
    assert rebuilt.config.scale_decoder_outputs is False is reference.config.scale_decoder_outputs


def test_a_flan_directory_loads_without_transformers_advice_to_untie_what_is_untied(official_files, tmp_path):
    """transformers 5 reads Flan's tie_word_embeddings=false as True, then warns to set it False: not shown."""
    import logging

    from transformers import T5ForConditionalGeneration

    notices = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    loader_log = logging.getLogger("transformers.modeling_utils")  # transformers' loggers do not propagate
    loader_log.addHandler(handler)
    try:
        T5ForConditionalGeneration.from_pretrained(official_files["t5"])
        assert any("NOT tie them" in n for n in notices)  # transformers says it, loading a Flan layout on its own
        notices.clear()
        load_t5(official_files["t5"])
        assert not any("NOT tie them" in n for n in notices)
        T5ForConditionalGeneration.from_pretrained(official_files["t5"])
        assert any("NOT tie them" in n for n in notices)  # only while we load: transformers' logging is left as is
        notices.clear()
        tied = copy_t5_dir(official_files["t5"], tmp_path / "says-tied")  # a head of its own against its config
        config = json.loads((tied / "config.json").read_text())
        (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        load_t5(tied)
        assert any("NOT tie them" in n for n in notices)  # there the notice is right, and shown
    finally:
        loader_log.removeHandler(handler)


def test_a_t5_directory_saved_in_bf16_loads_in_float32(official_files, tmp_path):
    """Official directories come in bf16 too; the T5 must compute in the dtype of the rest of the model."""
    from transformers import T5ForConditionalGeneration

    bf16 = tmp_path / "flan-t5-bf16"
    T5ForConditionalGeneration.from_pretrained(official_files["t5"], dtype=torch.bfloat16).save_pretrained(bf16)
    shutil.copy(official_files["t5"] / "tokenizer.json", bf16)
    assert {v.dtype for v in load_file(str(bf16 / "model.safetensors")).values()} == {torch.bfloat16}
    model = build_pixelllm(official_tiny_config(), t5_path=bf16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert outputs(model)["ids0"].numel() > 0  # generates (a bf16 T5 beside float32 heads raised a dtype error)


def test_a_sharded_t5_directory_loads_every_shard(official_files, official_model, tmp_path):
    """Flan-T5-XL ships its weights in shards with an index (`model-00001-of-00002.safetensors`, ...)."""
    from transformers import T5ForConditionalGeneration

    sharded = tmp_path / "flan-t5-sharded"
    T5ForConditionalGeneration.from_pretrained(official_files["t5"]).save_pretrained(sharded, max_shard_size="40KB")
    shutil.copy(official_files["t5"] / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 2
    t5 = build_pixelllm(official_tiny_config(), t5_path=sharded).language_model.t5.state_dict()
    for k, v in official_model.language_model.t5.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(t5[k], v), k


def copy_t5_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_t5_directory_errors(official_files, tmp_path):
    src = official_files["t5"]
    no_config = copy_t5_dir(src, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    no_tokenizer = copy_t5_dir(src, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    no_weights = copy_t5_dir(src, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    truncated = copy_t5_dir(src, tmp_path / "truncated")
    truncated_copy(src / "model.safetensors", truncated / "model.safetensors")
    for bad, words in (
        (no_config, ["config.json"]),
        (no_tokenizer, ["tokenizer.json"]),
        (no_weights, []),
        (truncated, []),
    ):
        with pytest.raises(CheckpointError) as e:
            load_t5(bad)
        assert str(bad) in str(e.value)
        assert all(w in str(e.value) for w in words)


def test_t5_weights_of_another_shape_name_keys_and_shapes(official_files, tmp_path):
    cfg = official_tiny_config()
    other = dict(cfg.language_model.t5, d_ff=96)
    other_dir = tmp_path / "other"
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(**other)).save_pretrained(other_dir)
    mixed = copy_t5_dir(official_files["t5"], tmp_path / "mixed")
    shutil.copy(other_dir / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_t5(mixed)
    file_state = load_file(str(mixed / "model.safetensors"))
    own = peer_t5(cfg).state_dict()
    bad = sorted(k for k in own if k in file_state and file_state[k].shape != own[k].shape)
    assert str(mixed) in str(e.value)
    assert f"{bad[0]}: file {tuple(file_state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}" in str(e.value)


def test_t5_weights_with_missing_tensors_are_an_error(official_files, tmp_path):
    # transformers alone would re-initialize a missing tensor at random and carry on
    partial = copy_t5_dir(official_files["t5"], tmp_path / "partial")
    state = load_file(str(partial / "model.safetensors"))
    dropped = sorted(state)[len(state) // 2]
    del state[dropped]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_t5(partial)
    assert str(partial) in str(e.value) and "missing" in str(e.value) and dropped in str(e.value)


# ------------------------------------------------------------------ unreadable files
def test_corrupt_and_foreign_files_are_clear_errors(official_files, tmp_path):
    model = build_pixelllm(official_tiny_config())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"\xff" * 64)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], a_list)
    pickled_code = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_code)  # needs unpickling code: refused, not run
    cases = [
        (load_sam_checkpoint, truncated_copy(official_files["sam_same"], tmp_path / "sam_trunc.pth")),
        (load_eva_checkpoint, truncated_copy(official_files["eva_pth"], tmp_path / "eva_trunc.pth")),
        (load_eva_checkpoint, truncated_copy(official_files["eva_safetensors"], tmp_path / "eva_trunc.safetensors")),
        (load_sam_checkpoint, garbage),
        (load_eva_checkpoint, garbage_st),
        (load_sam_checkpoint, a_list),
        (load_sam_checkpoint, pickled_code),
        (load_sam_checkpoint, tmp_path / "missing.pth"),
        (load_sam_checkpoint, official_files["eva_pth"]),  # an EVA file given as SAM
        (load_eva_checkpoint, official_files["sam_same"]),  # a SAM file given as EVA
    ]
    for loader, path in cases:
        with pytest.raises(CheckpointError) as e:
            loader(model, path)
        assert str(path) in str(e.value), (loader.__name__, path, str(e.value))
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_sam_checkpoint(model, official_files["eva_pth"])


# ------------------------------------------------------------------ our format
@torch.no_grad()
def outputs(model: PixelLLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """Losses on a real batch, and greedy generation with points: everything a round trip must keep."""
    batch = make_batch(model, seed=seed)
    out = {k: v for k, v in model(batch).items()}
    features = model.encode_images(batch["images"])
    prompts = Prompts(
        texts=batch["prompts"],
        boxes=batch["boxes"],
        box_mask=batch["box_mask"],
        points=batch["points"],
        point_mask=batch["point_mask"],
    )
    for i, g in enumerate(model.generate(features, prompts, max_new_tokens=6)):
        out[f"ids{i}"], out[f"corners{i}"], out[f"confidence{i}"] = g.ids, g.corners, g.confidence
    out["masks"] = model.masks(features, batch["mask_boxes"])
    return out


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_and_load_random_tiny_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = PixelLLM.from_pretrained(tmp_path / "m")
    own, back = tiny_model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys()
    for k in own:
        assert torch.equal(own[k], back[k]), k
    assert_same_outputs(outputs(tiny_model), outputs(loaded))


def test_a_model_saved_with_lora_merged_loads_back_the_same(tmp_path):
    """`set_lora_merged(True)` folds LoRA into the base weights; the file must still hold the base weights alone,
    or a loaded model (LoRA unmerged, added on every call) adds LoRA twice."""
    cfg = load_config("pixelllm-tiny")
    cfg.language_model.mode = "lora"
    torch.manual_seed(0)
    model = perturb_(build_pixelllm(cfg), seed=2, scale=0.05).eval()  # LoRA B nonzero: LoRA changes the outputs
    model.save_pretrained(tmp_path / "unmerged")
    expected = outputs(model)
    model.set_lora_merged(True)
    model.save_pretrained(tmp_path / "merged")
    stored = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("unmerged", "merged")]
    assert stored[0].keys() == stored[1].keys()
    for k in stored[0]:
        torch.testing.assert_close(stored[1][k], stored[0][k], atol=1e-6, rtol=0, msg=k)
    loaded = outputs(PixelLLM.from_pretrained(tmp_path / "merged"))
    for k in ("ids0", "ids1", "ids2"):
        assert torch.equal(loaded[k], expected[k]), k
    torch.testing.assert_close(loaded["loss"], expected["loss"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_saved_files_get_the_umasks_mode(tiny_model, tmp_path, umask, mode):
    """safetensors writes owner-only files: the weights must be as readable as the config (a server or container
    running as another user reads both)."""
    old = os.umask(umask)
    try:
        tiny_model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == {
        name: mode for name in ("config.json", "model.safetensors", "tokenizer.json")
    }


def test_a_save_cut_off_leaves_the_model_saved_before(tiny_model, tmp_path, monkeypatch):
    """A full disk while saving over a model wrote half its weights over the good ones; now those stay whole."""
    import pixelllm.checkpoints

    (tmp_path / ".saving-killed").mkdir(parents=True)  # what a save killed outright (SIGKILL) leaves
    (tmp_path / ".saving-killed" / "model.safetensors").write_bytes(b"half a file")
    tiny_model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # the staging folder left is gone: a dir would raise

    def disk_full(state, path, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pixelllm.checkpoints, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tiny_model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no staging folder left behind
    assert PixelLLM.from_pretrained(tmp_path)


def test_save_from_official_files_stores_only_non_official_weights(official_files, tmp_path):
    cfg = official_tiny_config()
    model = build_pixelllm(
        cfg,
        sam_checkpoint=official_files["sam_resized"],
        eva_checkpoint=official_files["eva_pth"],
        t5_path=official_files["t5"],
    )
    # "fine-tune": change every trainable weight (LoRA B included) so the stored file matters
    perturb_(torch.nn.ParameterList([p for p in model.parameters() if p.requires_grad]), seed=5, scale=0.05)
    model.save_pretrained(tmp_path / "m")
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= stored.keys()
    # frozen official weights stay in the official files: SAM (encoder, prompt encoder, mask decoder) and T5
    assert not [k for k in stored if k.startswith(("image_encoder.sam.", "prompt_encoder.sam.", "mask_head."))]
    t5_keys = [k for k in stored if k.startswith("language_model.")]
    assert t5_keys and all(".lora_" in k for k in t5_keys)
    assert any(k.startswith("image_encoder.eva.") for k in stored)  # trainable here, so ours
    loaded = PixelLLM.from_pretrained(tmp_path / "m")
    assert loaded.sources == model.sources
    own, back = model.state_dict(), loaded.state_dict()
    for k in own:
        assert torch.equal(own[k], back[k]), k
    assert_same_outputs(outputs(model), outputs(loaded))
    # what the file holds follows the config, not what was frozen or unfrozen by hand before saving
    model.requires_grad_(False)
    model.mask_head.requires_grad_(True)
    model.save_pretrained(tmp_path / "frozen")
    assert load_file(str(tmp_path / "frozen" / "model.safetensors")).keys() == stored.keys()
    assert_same_outputs(outputs(model), outputs(PixelLLM.from_pretrained(tmp_path / "frozen")))


def test_saving_over_another_model_leaves_none_of_its_files(official_files, tiny_model, tmp_path):
    """A directory saved again holds only the new model: an official-file list or tokenizer left by the model saved
    there before would be read with the new one (its files, wherever they went; a tokenizer it never had)."""
    official = build_pixelllm(official_tiny_config(), sam_checkpoint=official_files["sam_resized"])
    assert official.sources and official.tokenizer is None
    directory = tmp_path / "m"
    tiny_model.save_pretrained(directory)
    official.save_pretrained(directory)
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", "checkpoints.json"}
    tiny_model.save_pretrained(directory)
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert_same_outputs(outputs(tiny_model), outputs(PixelLLM.from_pretrained(directory)))


def test_resize_input_resamples_position_embeddings_and_keeps_the_rest(tiny_model, tmp_path):
    cfg = tiny_model.cfg
    assert resize_input(tiny_model, cfg.image_size) is tiny_model
    resized = resize_input(tiny_model, 224)
    grid = 224 // cfg.sam.patch_size
    assert (resized.cfg.image_size, resized.cfg.eva.overrides["img_size"], cfg.image_size) == (224, 224, 160)
    own, new = tiny_model.state_dict(), resized.state_dict()
    assert own.keys() == new.keys()
    global_tables = {
        f"image_encoder.sam.blocks.{i}.attn.rel_pos_{a}" for i in cfg.sam.global_attn_indexes for a in "hw"
    }
    changed = {k for k in own if own[k].shape != new[k].shape}
    assert changed == {"image_encoder.sam.pos_embed", "image_encoder.eva.pos_embed"} | global_tables
    for k in own.keys() - changed:
        assert torch.equal(own[k], new[k]), k
    torch.testing.assert_close(
        new["image_encoder.sam.pos_embed"],
        resample_abs_pos_embed_nhwc(own["image_encoder.sam.pos_embed"], [grid, grid], antialias=False),
    )
    torch.testing.assert_close(
        new["image_encoder.eva.pos_embed"],
        resample_abs_pos_embed(own["image_encoder.eva.pos_embed"], [grid, grid], num_prefix_tokens=1),
    )
    for k in global_tables:  # what SAM's `get_rel_pos` would index at run time from the old table
        torch.testing.assert_close(get_rel_pos(grid, grid, new[k]), get_rel_pos(grid, grid, own[k]))
    # the resized model runs at its new size and round-trips through save / load
    assert resized.encode_images(torch.rand(1, 3, 224, 224)).fused.shape[-2:] == (grid, grid)
    resized.save_pretrained(tmp_path / "m")
    assert_same_outputs(outputs(resized), outputs(PixelLLM.from_pretrained(tmp_path / "m")))
    with pytest.raises(ValueError, match="multiple of SAM's patch size"):
        resize_input(tiny_model, 164)


def test_resize_input_reads_official_weights_again_and_keeps_trained_ones(official_files, tmp_path):
    """Frozen official weights come from the files, resampled once; what training changed is kept; the
    resized model saves and loads back exactly (the official files are read again on load)."""
    files = {"sam_checkpoint": official_files["sam_resized"], "eva_checkpoint": official_files["eva_pth"]}
    model = build_pixelllm(official_tiny_config(), t5_path=official_files["t5"], **files)
    perturb_(torch.nn.ParameterList([p for p in model.parameters() if p.requires_grad]), seed=6, scale=0.05)
    size = model.cfg.image_size + 2 * model.cfg.sam.patch_size
    resized = resize_input(model, size)
    direct = build_pixelllm(official_tiny_config().at_image_size(size), t5_path=official_files["t5"], **files)
    own, new, fresh = model.state_dict(), resized.state_dict(), direct.state_dict()
    for k, p in model.named_parameters():
        if not p.requires_grad and k.startswith("image_encoder.sam."):
            assert torch.equal(new[k], fresh[k]), k  # straight from the file at the new size
        elif p.requires_grad and own[k].shape == new[k].shape:
            assert torch.equal(new[k], own[k]), k  # trained, kept
    assert resized.sources == model.sources
    resized.save_pretrained(tmp_path / "m")
    assert_same_outputs(outputs(resized), outputs(PixelLLM.from_pretrained(tmp_path / "m")))
    model.set_lora_merged(True)
    with pytest.raises(ValueError, match="set_lora_merged"):
        resize_input(model, size)


def test_from_pretrained_errors(tiny_model, tmp_path):
    good = tmp_path / "good"
    tiny_model.save_pretrained(good)
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        PixelLLM.from_pretrained(missing)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    truncated_copy(good / "model.safetensors", corrupt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        PixelLLM.from_pretrained(corrupt)
    assert str(corrupt / "model.safetensors") in str(e.value)
    # weights of another shape under this config
    wider = tmp_path / "wider"
    shutil.copytree(good, wider)
    cfg = tiny_model.cfg.__class__.from_json(good / "config.json")
    cfg.point_head.hidden_dim = 64
    torch.manual_seed(0)
    other = build_pixelllm(cfg)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", wider / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        PixelLLM.from_pretrained(wider)
    own = tiny_model.state_dict()
    first = first_shape_mismatch(other.state_dict(), own)
    assert str(wider / "model.safetensors") in str(e.value) and first in str(e.value)


def test_build_refuses_a_saved_model_and_builds_its_configs_shape(tiny_model, tmp_path):
    """`build_pixelllm(dir)` gave a saved model's shape with random weights, without a word (it captioned
    'righrighrigh...'): it says to load it; `build_pixelllm(dir / "config.json")` still builds the shape."""
    tiny_model.save_pretrained(tmp_path)
    for given in (tmp_path, str(tmp_path)):
        with pytest.raises(ValueError, match=r"is a saved model: load it with PixelLLM.from_pretrained\("):
            build_pixelllm(given)
    shape = build_pixelllm(tmp_path / "config.json")
    assert {k: v.shape for k, v in shape.state_dict().items()} == {
        k: v.shape for k, v in tiny_model.state_dict().items()
    }


def test_tokenizer_round_trip(tmp_path):
    tok = train_tokenizer()
    tok.save(tmp_path)
    back = Tokenizer.from_file(tmp_path)
    text = "a large red circle on the left and a small blue square at the bottom."
    assert back.encode(text) == tok.encode(text)
    assert back.decode(back.encode(text)) == text


def test_a_path_beside_the_model_is_refused_with_where_the_model_is(tiny_model, tmp_path):
    """A training run's folder, its checkpoint, or a file of a model directory: each error says what to give."""
    from pixelllm.build import load_model

    done, running = tmp_path / "done-run", tmp_path / "running-run"
    tiny_model.save_pretrained(done / "final")
    running.mkdir()
    torch.save({}, running / "checkpoint.pt")
    cases = {
        done: f"its model is {done / 'final'}",
        running: f"it saves its model in {running / 'final'} after its last step",
        running / "checkpoint.pt": f"it saves its model in {running / 'final'}",
        done / "final" / "model.safetensors": f"a file of the model directory {done / 'final'}: give the directory",
        done / "final" / "config.json": f"a file of the model directory {done / 'final'}: give the directory",
    }
    for path, hint in cases.items():
        with pytest.raises((CheckpointError, ValueError)) as raised:
            load_model(path)
        assert hint in str(raised.value), (path, str(raised.value))
    assert isinstance(load_model(done / "final"), PixelLLM)


def test_a_model_built_from_official_parts_says_what_is_random(official_files, tmp_path, caplog):
    """Official checkpoints hold no captioning weights: load_model warns, naming the parts no file gave."""
    from pixelllm.build import load_model

    official_tiny_config().save(tmp_path / "official.json")
    parts = {"sam_checkpoint": official_files["sam_same"], "t5_path": official_files["t5"]}
    with caplog.at_level("WARNING", logger="pixelllm.build"):
        load_model(tmp_path / "official.json", **parts)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "pixelllm.build"]
    random = warning.split("RANDOM weights for ", 1)[1].split(": ", 1)[0]
    assert random.startswith("EVA02, the prompt feature extractor, point head") and "SAM" not in random
    assert "until it is fine-tuned (pixelllm train)" in warning


def test_a_model_whose_official_files_moved_loads_from_their_new_place(official_files, tmp_path):
    """`checkpoints.json` records where the official files were; when they moved (another machine, a container),
    loading says which file to give, and `sam_checkpoint=` etc. (`load_model`, the service's settings) give it."""
    moved = tmp_path / "official"
    shutil.copytree(official_files["t5"], moved / "t5")
    shutil.copy(official_files["sam_resized"], moved / "sam.pth")
    model = build_pixelllm(official_tiny_config(), sam_checkpoint=moved / "sam.pth", t5_path=moved / "t5")
    perturb_(torch.nn.ParameterList([p for p in model.parameters() if p.requires_grad]), seed=6, scale=0.05)
    model.save_pretrained(tmp_path / "m")
    expected = outputs(model)
    (moved / "sam.pth").rename(tmp_path / "sam-elsewhere.pth")
    (moved / "t5").rename(tmp_path / "t5-elsewhere")
    with pytest.raises(CheckpointError, match=r"checkpoints\.json records sam_checkpoint .* does not exist: .*"):
        PixelLLM.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="records t5_path .*PIXELLLM_T5_PATH"):
        PixelLLM.from_pretrained(tmp_path / "m", sam_checkpoint=tmp_path / "sam-elsewhere.pth")
    loaded = load_model(
        tmp_path / "m", sam_checkpoint=tmp_path / "sam-elsewhere.pth", t5_path=tmp_path / "t5-elsewhere"
    )
    assert loaded.sources["t5_path"] == str(tmp_path / "t5-elsewhere")
    assert_same_outputs(outputs(loaded), expected)
    with pytest.raises(
        CheckpointError, match="not built from an official file given as eva_checkpoint .*leave eva_checkpoint"
    ):
        PixelLLM.from_pretrained(tmp_path / "m", eva_checkpoint=official_files["eva_pth"])
    with pytest.raises(TypeError, match="unknown checkpoint argument 'sam_path'"):
        PixelLLM.from_pretrained(tmp_path / "m", sam_path=tmp_path / "sam-elsewhere.pth")


def test_checkpoint_errors_say_which_file_to_give(official_files, tmp_path):
    """A directory for a weights file, transformers' SAM format, another SAM size, a T5 directory that is not
    there: each error says what to give instead."""
    model = build_pixelllm(official_tiny_config())
    snapshot = tmp_path / "eva-snapshot"
    snapshot.mkdir()
    shutil.copy(official_files["eva_safetensors"], snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"is a directory: give the weights file in it \(it holds model\.safe"):
        load_eva_checkpoint(model, snapshot)
    hf_sam = tmp_path / "hf-sam.safetensors"
    save_file({"vision_encoder.patch_embed.projection.weight": torch.zeros(2, 3, 4, 4)}, hf_sam)
    with pytest.raises(CheckpointError, match="transformers SamModel format: give segment_anything's own release"):
        load_sam_checkpoint(model, hf_sam)
    vit_b = tmp_path / "sam-vit-b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, vit_b)
    paper = build_pixelllm("pixelllm-t5xl", device="meta")
    with pytest.raises(CheckpointError, match="is a SAM vit_b checkpoint, but pixelllm-t5xl has a SAM vit_h image"):
        load_sam_checkpoint(paper, vit_b)
    with pytest.raises(CheckpointError, match="T5 directory .*nowhere does not exist"):
        load_t5(tmp_path / "nowhere")
