"""Model configuration: one dataclass tree, read from and written to JSON presets (`pixelllm/configs/*.json`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_DIR = Path(__file__).parent / "configs"
# The trained default model of a source checkout (`make train-default` trains it), wherever the command runs from.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "pixelllm-tiny"


@dataclass
class SamEncoderConfig:
    """SAM `ImageEncoderViT` (encoder A) and the SAM prompt encoder / mask decoder widths."""

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    patch_size: int = 16
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    out_chans: int = 256
    trainable: bool = False


@dataclass
class EvaEncoderConfig:
    """A timm EVA02 model (encoder B), made by `timm.create_model(model_name, **overrides)`.

    `final_norm`: put the patch tokens through the trunk's final LayerNorm, as the paper does (scenic's
    `use_ln_post`). timm's avg-pooled EVA02 keeps that norm as `fc_norm` and applies it only after pooling, so
    `forward_features` alone leaves it out. The presets with official EVA02 weights set it; `pixelllm-tiny` was
    trained without it.
    """

    model_name: str = "eva02_large_patch14_448"
    overrides: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True
    final_norm: bool = False


@dataclass
class FrozenBlockConfig:
    """Optional frozen LM layer in the visual path (seed paper). `checkpoint` is a HF model directory."""

    checkpoint: str | None = None
    layer: int = -1


@dataclass
class ExtractorConfig:
    """Prompt feature extractor: learnable queries + prompt tokens through SAM's TwoWayTransformer.

    `anchor_grid` g > 0 anchors the first g*g queries on a g x g grid inside the prompt's box (the whole image
    without a prompt, a box of `point_anchor_size` x the image side around a point prompt): each such query
    starts from the fused features sampled at its anchor plus the anchor's position encoding and keeps its
    own content through the first self-attention, and one more visual token is made from all the samples
    (the layout inside the box). 0 is the paper's free queries. `scripts/extractor_probe.py` shows why the
    CPU-trained `pixelllm-tiny` needs anchors.

    `object_tokens` k > 0 (needs `anchor_grid` and a proposal head) gives every prompt without a box or point
    (whole-image captions, referring expressions) up to k more visual tokens, one per object the model's own
    proposal head finds in the image (best first): the layout of the proposal's box, made as a box prompt's
    layout token is, plus the box's prompt-encoder embedding. A whole-image caption then reads each object as a
    region caption reads its box. 0: none (the paper).

    `object_readings` (needs `object_tokens`) adds to each object token what a box prompt on the object's box reads:
    the extractor's visual tokens for that box (as a region caption gets them), through a projection that starts at
    zero, so a model given them to fine-tune begins as it was.
    """

    num_queries: int = 32
    width: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    query_dim: int = 1024
    anchor_grid: int = 0
    point_anchor_size: float = 0.25
    object_tokens: int = 0
    object_readings: bool = False

    def __post_init__(self) -> None:
        if self.object_readings and not self.object_tokens:
            raise ValueError("extractor.object_readings needs extractor.object_tokens > 0 (they add to object tokens)")
        if self.object_tokens and not self.anchor_grid:
            raise ValueError("extractor.object_tokens needs extractor.anchor_grid > 0 (object tokens are box layouts)")
        if self.anchor_grid**2 > self.num_queries:
            raise ValueError(
                f"extractor.anchor_grid {self.anchor_grid} needs {self.anchor_grid**2} queries, "
                f"but num_queries is {self.num_queries}"
            )


@dataclass
class MaskDecoderConfig:
    """SAM `MaskDecoder` (on SAM's own features, prompted by a box)."""

    depth: int = 2
    mlp_dim: int = 2048
    num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    trainable: bool = False


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0  # the paper has no LoRA dropout (T5's own dropout_rate applies)
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])


@dataclass
class LanguageModelConfig:
    """`T5ForConditionalGeneration`; `t5` holds `T5Config` keyword arguments."""

    t5: dict[str, Any] = field(default_factory=dict)
    mode: Literal["lora", "full", "frozen"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_text_tokens: int = 128
    max_prompt_tokens: int = 8


@dataclass
class PointHeadConfig:
    hidden_dim: int = 512
    depth: int = 4


# The default object-proposal search (dense captions, refined words, object tokens): least objectness, NMS
# overlap above which the weaker of two proposals is dropped, most proposals per image.
PROPOSAL_SCORE_THRESHOLD, PROPOSAL_NMS_IOU, MAX_PROPOSALS = 0.3, 0.5, 32


@dataclass
class ProposalHeadConfig:
    """Optional object-proposal head for dense captioning (see `modeling.proposal_head`)."""

    hidden_dim: int = 256
    box_weight: float = 2.0


@dataclass
class LossConfig:
    label_smoothing: float = 0.1
    point_weight: float = 0.1
    mask_weight: float = 1.0
    proposal_weight: float = 1.0


IMAGE_PADDINGS = ("black", "mean")


@dataclass
class PixelLLMConfig:
    name: str = "pixelllm"
    image_size: int = 384
    sam: SamEncoderConfig = field(default_factory=SamEncoderConfig)
    eva: EvaEncoderConfig = field(default_factory=EvaEncoderConfig)
    frozen_block: FrozenBlockConfig | None = None
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    point_head: PointHeadConfig = field(default_factory=PointHeadConfig)
    proposal_head: ProposalHeadConfig | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    tokenizer: str | None = None  # a tokenizer in configs/tokenizers/ by name (default: `name`)
    caption_prompt: str = "A long image caption: "
    region_prompt: str = "an object of "
    localize_prompt: str = "where is "
    # what fills the square around a non-square image: "mean" (SAM's pixel mean, 0 once normalized, as SAM and the
    # paper pad) or "black" (0 before normalizing; what the shipped default model was trained with)
    image_padding: str = "black"
    # word classes (e.g. "color": ["red", ...]) that `Predictor.caption` checks against region captions
    attribute_words: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_padding not in IMAGE_PADDINGS:
            raise ValueError(f"image_padding is {self.image_padding!r}: it must be one of {', '.join(IMAGE_PADDINGS)}")
        if self.extractor.object_tokens and self.proposal_head is None:
            raise ValueError("extractor.object_tokens needs a proposal_head: the object tokens are its proposals")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelLLMConfig:
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, path: str | Path) -> PixelLLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model config not found: {path}{model_path_hint(path.parent)}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def at_image_size(self, image_size: int) -> PixelLLMConfig:
        """A copy for `image_size` px input (EVA02's `img_size` override follows)."""
        if image_size <= 0 or image_size % self.sam.patch_size:
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of SAM's patch size {self.sam.patch_size}"
            )
        cfg = copy.deepcopy(self)
        cfg.image_size = image_size
        if "img_size" in cfg.eva.overrides:
            cfg.eva.overrides["img_size"] = image_size
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; an unknown key, or a value not of its
    field's type (`"steps": "500"`), is an error naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object of its keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        kwargs[name] = _from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
        if not _is_of_type(kwargs[name], hints[name]):
            raise ValueError(f"{cls.__name__} key {name!r} is {value!r}: it must be {fields[name].type}")
    return cls(**kwargs)


def _is_of_type(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON is of type `hint`: an int is a float, a bool is no number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_of_type(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint in (int, float):
        allowed = (int,) if hint is int else (int, float)
        return isinstance(value, allowed) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_is_of_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _is_of_type(k, args[0]) and _is_of_type(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, origin or hint)


_NESTED: dict[tuple[str, str], type] = {
    ("PixelLLMConfig", "sam"): SamEncoderConfig,
    ("PixelLLMConfig", "eva"): EvaEncoderConfig,
    ("PixelLLMConfig", "frozen_block"): FrozenBlockConfig,
    ("PixelLLMConfig", "extractor"): ExtractorConfig,
    ("PixelLLMConfig", "mask_decoder"): MaskDecoderConfig,
    ("PixelLLMConfig", "language_model"): LanguageModelConfig,
    ("PixelLLMConfig", "point_head"): PointHeadConfig,
    ("PixelLLMConfig", "proposal_head"): ProposalHeadConfig,
    ("PixelLLMConfig", "loss"): LossConfig,
    ("LanguageModelConfig", "lora"): LoraConfig,
}


def model_path_hint(path: Path) -> str:
    """Where the model is, for an error about `path`, which is not a model directory ("" without a better guess):
    a training run's `final/`, or the directory holding a file of it."""
    if (path / "final" / "config.json").is_file():
        return f" (a training run: its model is {path / 'final'})"
    if (path / "checkpoint.pt").is_file():
        return (
            f" (a training run that has not finished: it saves its model in {path / 'final'} after its last step; "
            "run its training config again to resume)"
        )
    if path.is_file() and (path.parent / "model.safetensors").is_file():
        return f" (a file of the model directory {path.parent}: give the directory)"
    return model_path_hint(path.parent) if path.is_file() else ""  # a run's checkpoint.pt, say


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path | PixelLLMConfig) -> PixelLLMConfig:
    """A preset name (`pixelllm-tiny`), a JSON file, a model directory holding `config.json`, or a config."""
    if isinstance(name_or_path, PixelLLMConfig):
        return name_or_path
    path = Path(name_or_path)
    if path.is_dir():
        return PixelLLMConfig.from_json(path / "config.json")
    if path.suffix == ".json":
        return PixelLLMConfig.from_json(path)
    preset = CONFIG_DIR / f"{name_or_path}.json"
    if preset.is_file():
        return PixelLLMConfig.from_json(preset)
    hint = model_path_hint(path)
    if not hint and not path.exists() and not path.is_absolute() and len(path.parts) > 1:  # from another folder?
        hint = f" (there is no {path} under {Path.cwd()}, where relative paths are read from)"
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: not a preset ({', '.join(list_presets())}), "
        f"a config JSON file or a model directory{hint}"
    )
