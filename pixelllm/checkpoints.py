"""Loading official checkpoints (SAM `.pth`, timm EVA02, Hugging Face T5) and our own save format.

Official loaders are small functions from a foreign state dict to our modules (like timm's
`checkpoint_filter_fn`): they resample position embeddings to our input size and report the first
mismatched keys and shapes with the file name. Pickle-based files are read with `weights_only=True`:
tensors only; a file that needs pickled code to load is refused, and its code never runs.

Our format (`save_pretrained`): `config.json` + `model.safetensors` + `tokenizer.json`. When the model
was built from official checkpoints, `config.json` records their paths and `model.safetensors` holds only
the weights those files do not provide (trainable or new parameters); `from_pretrained` loads the
official files first, then ours.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from torch import nn
from transformers import T5ForConditionalGeneration

from .config import model_path_hint
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, SOURCES_FILE = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "checkpoints.json",
)


UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # torch's weights-only refusal


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


# ------------------------------------------------------------------------- reading files
def refused_pickle(path: str | Path, error: Exception) -> CheckpointError | None:
    """The error for a pickle that needs code to load, if torch's weights-only loader refused `path` for that."""
    needs_code = UNSAFE_GLOBAL.search(str(error))
    if needs_code is None:
        return None
    return CheckpointError(
        f"refused {path}: loading it would run pickled Python code ({needs_code[1]}); checkpoints are read with "
        "torch.load(weights_only=True), tensors only. If you trust the file, re-save its tensors where you trust "
        "it: torch.save(state_dict, ...) or safetensors.torch.save_file(state_dict, ...)."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a torch pickle read with `weights_only=True`."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", ".pth", ".bin", ".pt"))
        raise CheckpointError(
            f"{path} is a directory: give the weights file in it"
            + (f" (it holds {', '.join(inside[:5])})" if inside else " (it holds no .safetensors/.pth/.bin file)")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise refused_pickle(path, e) or CheckpointError(
            f"{path} could not be loaded as a weights-only torch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It may be truncated or not a checkpoint."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state)`, strict, with an error naming `source` and the first mismatches."""
    problems = state_mismatches(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: {problems}")
    module.load_state_dict(state, strict=True)


def state_mismatches(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """How `state` (from a file) differs from `own` (the model's), as one line; "" when it matches."""
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return mismatch_report(shapes, [k for k in own if k not in state], [k for k in state if k not in own])


def loading_problems(info: dict[str, list], prefix: str = "") -> str:
    """What transformers' `from_pretrained(..., output_loading_info=True)` filled in at random (missing keys) or
    skipped (`ignore_mismatched_sizes`), among the keys that start with `prefix`, as one line; "" when nothing."""
    shapes = [
        f"{k}: file {tuple(a)} vs model {tuple(b)}"
        for k, a, b in sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
        if k.startswith(prefix)
    ]
    missing = sorted(k for k in info.get("missing_keys") or [] if k.startswith(prefix))
    return mismatch_report(shapes, missing, [])


def mismatch_report(shapes: list[str], missing: list[str], unexpected: list[str]) -> str:
    """One line naming the first shape mismatches, missing and unexpected keys ("" when all match)."""
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches, first: {shapes[:3]}")
    if missing:
        problems.append(f"{len(missing)} missing keys, first: {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:5]}")
    return "; ".join(problems)


# ------------------------------------------------------------------------- SAM
SAM_SIZES = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}  # segment_anything's releases by image-encoder width


def sam_checkpoint_filter(state: dict[str, torch.Tensor], image_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """SAM image-encoder weights resampled to our input size.

    `pos_embed` (1, H, W, C) is resized bicubically to our patch grid; the relative position tables
    `rel_pos_h/w` (2L-1, C) of the global-attention blocks are resized linearly (as SAM's own
    `get_rel_pos` does at run time) to the grid's 2L-1.
    """
    own = image_encoder.state_dict()
    out = {}
    for k, v in state.items():
        target = own.get(k)
        if target is not None and v.shape != target.shape:
            if k == "pos_embed":
                v = (
                    F.interpolate(
                        v.permute(0, 3, 1, 2).float(),
                        size=target.shape[1:3],
                        mode="bicubic",
                        align_corners=False,
                    )
                    .permute(0, 2, 3, 1)
                    .to(v.dtype)
                )
            elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.shape[1] == target.shape[1]:
                v = (
                    F.interpolate(v.T[None].float(), size=target.shape[0], mode="linear")
                    .reshape(target.shape[1], target.shape[0])
                    .T.to(v.dtype)
                )
        out[k] = v
    return out


def load_sam_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an official SAM checkpoint (`sam_vit_h_4b8939.pth`: keys `image_encoder.*`, `prompt_encoder.*`,
    `mask_decoder.*`) into `model.image_encoder.sam`, `model.prompt_encoder.sam` and `model.mask_head.decoder`."""
    state = read_state_dict(path)
    parts = {
        "image_encoder": model.image_encoder.sam,
        "prompt_encoder": model.prompt_encoder.sam,
        "mask_decoder": model.mask_head.decoder,
    }
    unknown = sorted({k.split(".")[0] for k in state} - set(parts))
    if unknown:
        hint = (
            " (that is the transformers SamModel format: give segment_anything's own release, sam_vit_h_4b8939.pth)"
            if "vision_encoder" in unknown
            else ""
        )
        raise CheckpointError(f"{path} is not a SAM checkpoint: unexpected top-level keys {unknown[:5]}{hint}")
    width = state.get("image_encoder.patch_embed.proj.weight")
    own_width = model.image_encoder.sam.patch_embed.proj.weight.shape[0]
    if width is not None and {width.shape[0], own_width} <= SAM_SIZES.keys() and width.shape[0] != own_width:
        raise CheckpointError(
            f"{path} is a SAM {SAM_SIZES[width.shape[0]]} checkpoint, but {model.name} has a SAM "
            f"{SAM_SIZES[own_width]} image encoder: give the {SAM_SIZES[own_width]} release (the paper presets: "
            "sam_vit_h_4b8939.pth)"
        )
    for prefix, module in parts.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if prefix == "image_encoder":
            sub = sam_checkpoint_filter(sub, module)
        load_into(module, sub, f"{path} [{prefix}.*]")
    log.info("loaded SAM checkpoint %s", path)


# ------------------------------------------------------------------------- EVA02 (timm)
def load_eva_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load timm EVA02 weights (state dict `.pth`/`.bin` or `.safetensors`) into `model.image_encoder.eva`,
    resampling position embeddings with timm's own `checkpoint_filter_fn`; classifier head keys are dropped."""
    eva = model.image_encoder.eva
    state = eva_checkpoint_filter_fn(read_state_dict(path), eva)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in eva.state_dict()}
    load_into(eva, state, str(path))
    log.info("loaded EVA02 checkpoint %s", path)


# ------------------------------------------------------------------------- another input size
def resize_input(model: nn.Module, image_size: int) -> nn.Module:
    """`model` rebuilt for `image_size` px input, e.g. to fine-tune a checkpoint at a higher resolution.

    Weights from official files (`model.sources`) are read from those files again, resampled once to the new
    size; of the others, the SAM and EVA02 position embeddings are resampled as for official checkpoints
    (`sam_checkpoint_filter`, timm's `checkpoint_filter_fn`) and every other weight is copied unchanged.
    Returns `model` itself when it already takes `image_size`.
    """
    from .build import build_pixelllm

    if image_size == model.cfg.image_size:
        return model
    if any(m.merged for m in model.modules() if isinstance(m, LoraLayer)):
        raise ValueError("resize_input needs the LoRA weights unmerged: call model.set_lora_merged(False) first")
    sources = dict(model.sources)
    resized = build_pixelllm(model.cfg.at_image_size(image_size), tokenizer=model.tokenizer, **sources)
    state = _saved_state(model, sources)  # what the official files do not provide
    for prefix, module, resample in (
        ("image_encoder.sam.", resized.image_encoder.sam, sam_checkpoint_filter),
        ("image_encoder.eva.", resized.image_encoder.eva, eva_checkpoint_filter_fn),
    ):
        own = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        state.update({prefix + k: v for k, v in resample(own, module).items()})
    problems = state_mismatches(_saved_state(resized, sources), state)
    if problems:
        raise CheckpointError(f"resizing {model.name} to {image_size} px: {problems}")
    resized.load_state_dict(state, strict=False)
    resized.train(model.training)
    log.info("resized %s input from %d to %d px", model.name, model.cfg.image_size, image_size)
    reference = next(model.parameters())
    return resized.to(device=reference.device, dtype=reference.dtype)


# ------------------------------------------------------------------------- T5 (transformers)
def _flan_head_notice(record: logging.LogRecord) -> bool:
    """False for transformers 5's notice that a T5's LM head is "NOT tied" to its embeddings: it says to set
    tie_word_embeddings=False, which Flan-T5's config.json already does (transformers sets it True on reading
    it), and a Flan head of its own is right. Every other record passes."""
    return "so we will NOT tie them" not in record.getMessage()


def load_t5(path: str | Path) -> tuple[T5ForConditionalGeneration, Tokenizer]:
    """A Hugging Face Flan-T5 directory (`config.json`, weights, `tokenizer.json`) -> model and tokenizer."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"T5 directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model directory: config.json is missing")
    if not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json; save the fast tokenizer there first, e.g. "
            "transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    loader_log = logging.getLogger("transformers.modeling_utils")
    try:
        flan = json.loads((path / "config.json").read_text()).get("tie_word_embeddings") is False
    except (OSError, ValueError, AttributeError):
        flan = False  # from_pretrained says what is wrong with the file
    if flan:  # elsewhere an LM head unlike the embeddings contradicts the config, and the notice says so
        loader_log.addFilter(_flan_head_notice)
    try:
        # transformers would silently re-initialize missing or mis-shaped weights; we report them instead
        # in float32 as the rest of the model, whatever dtype the directory was saved in (a bf16 copy)
        t5, info = T5ForConditionalGeneration.from_pretrained(
            path, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        # transformers reads pytorch_model.bin with torch.load(weights_only=True)
        raise refused_pickle(path, e) or CheckpointError(
            f"could not load T5 weights from {path}: {str(e).splitlines()[0]}"
        ) from None
    finally:
        loader_log.removeFilter(_flan_head_notice)
    problems = loading_problems(info)
    if problems:
        raise CheckpointError(f"T5 weights in {path} do not match its config.json: {problems}")
    log.info("loaded T5 from %s", path)
    return t5, Tokenizer.from_file(path / TOKENIZER_FILE)


# ------------------------------------------------------------------------- our format
def official_prefixes(model: nn.Module, sources: dict[str, str]) -> list[str]:
    """State-dict prefixes whose weights come from official files and stay frozen, so are not saved."""
    cfg = model.cfg
    prefixes = []
    if sources.get("sam_checkpoint"):
        if not cfg.sam.trainable:
            prefixes += ["image_encoder.sam.", "prompt_encoder.sam."]
        if not cfg.mask_decoder.trainable:
            prefixes.append("mask_head.decoder.")
    if sources.get("eva_checkpoint") and not cfg.eva.trainable:
        prefixes.append("image_encoder.eva.")
    if sources.get("t5_path") and cfg.language_model.mode != "full":
        prefixes.append("language_model.t5.")
    if cfg.frozen_block is not None:
        prefixes.append("frozen_block.layer.")
    return prefixes


def _saved_state(model: nn.Module, sources: dict[str, str]) -> dict[str, torch.Tensor]:
    """The weights our file holds: all but those official files give (the LoRA adapters inside them are ours).
    Chosen by config and sources alone, so what a user froze or unfroze by hand, or LoRA merged or not, does not
    change the file."""
    skip = official_prefixes(model, sources)
    merged = {
        f"{name}.base_layer.weight": m for name, m in model.named_modules() if isinstance(m, LoraLayer) and m.merged
    }
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if any(k.startswith(p) for p in skip) and ".lora_" not in k:
            continue
        if v.data_ptr() in seen:  # tied weights (T5's shared embeddings) are stored once
            continue
        seen.add(v.data_ptr())
        if k in merged:  # LoRA folded in (`set_lora_merged`): store the base weight, as a loaded model adds LoRA
            v = v - sum(merged[k].get_delta_weight(adapter) for adapter in merged[k].merged_adapters)
        out[k] = v.detach().contiguous().cpu()
    return out


def _moved_sources(directory: Path, sources: dict[str, str], moved: dict[str, str]) -> dict[str, str]:
    """`sources` (from `checkpoints.json`) with the `moved` paths in place of the recorded ones; an error for a
    recorded file that is not there, and for a moved one the model was not built from."""
    from .build import OFFICIAL_PARTS

    for key in moved:
        if key not in OFFICIAL_PARTS:
            raise TypeError(f"unknown checkpoint argument {key!r}: give {', '.join(OFFICIAL_PARTS)}")
        if key not in sources:
            raise CheckpointError(
                f"the model in {directory} was not built from an official file given as {key} (its {WEIGHTS_FILE} "
                f"holds those weights itself): leave {key} (PIXELLLM_{key.upper()}) unset"
            )
    sources = {**sources, **moved}
    for key, path in sources.items():
        if key not in moved and not Path(path).exists():
            raise CheckpointError(
                f"{directory / SOURCES_FILE} records {key} {path}, which does not exist: give its new place as "
                f"from_pretrained(..., {key}=) (the service: PIXELLLM_{key.upper()})"
            )
    return sources


STAGING_PREFIX = ".saving-"


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Write `model` to `directory`. Every file is written whole in a staging folder there, then renamed into place
    (the config last), so that a save cut off while writing (a full disk, Ctrl-C) leaves a model saved there before
    as it was; a staging folder a killed save left is removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    sources = getattr(model, "sources", {}) or {}
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))  # one file system: renames are atomic
    try:
        model.cfg.save(staging / CONFIG_FILE)
        if sources:
            (staging / SOURCES_FILE).write_text(json.dumps(sources, indent=2) + "\n")
        save_file(_saved_state(model, sources), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        # safetensors writes the file owner-only (0600); give it the mode every other file here gets (the umask's),
        # so a server or container running as another user can read the weights it can read the config of
        (staging / WEIGHTS_FILE).chmod((staging / CONFIG_FILE).stat().st_mode & 0o777)
        if model.tokenizer is not None:
            model.tokenizer.save(staging)
        for name in (WEIGHTS_FILE, SOURCES_FILE, TOKENIZER_FILE, CONFIG_FILE):
            if (staging / name).is_file():
                os.replace(staging / name, directory / name)
            else:  # a model saved here before may have left one: this model would then load that model's files
                (directory / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved %s to %s", model.name, directory)


def from_pretrained(
    directory: str | Path, device: str | torch.device | None = None, **moved: str | Path | None
) -> nn.Module:
    """The model saved in `directory`. A model built from official files loads them from where `checkpoints.json`
    records; `moved` (`sam_checkpoint=`, `eva_checkpoint=`, `t5_path=`) gives the new place of any that moved."""
    from .build import build_pixelllm

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} is not a PixelLLM model directory: {name} is missing{model_path_hint(directory)}"
            )
    sources = json.loads((directory / SOURCES_FILE).read_text()) if (directory / SOURCES_FILE).is_file() else {}
    sources = _moved_sources(directory, sources, {k: str(v) for k, v in moved.items() if v})
    tokenizer = Tokenizer.from_file(directory / TOKENIZER_FILE) if (directory / TOKENIZER_FILE).is_file() else None
    model = build_pixelllm(directory / CONFIG_FILE, tokenizer=tokenizer, **sources)
    state = read_state_dict(directory / WEIGHTS_FILE)
    problems = state_mismatches(_saved_state(model, sources), state)
    if problems:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match its config: {problems}")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model.to(device) if device is not None else model
