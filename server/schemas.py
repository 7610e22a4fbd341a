"""Request and response models: they are the OpenAPI schema of the service."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pixelllm.config import MAX_PROPOSALS, PROPOSAL_NMS_IOU, PROPOSAL_SCORE_THRESHOLD

Coord = Field(ge=0, allow_inf_nan=False)
MaxNewTokens = Field(None, ge=1, le=128, description="Most tokens to decode; default: the model's max_text_tokens")


class Box(BaseModel):
    """A box in absolute pixels: x right, y down, origin top-left."""

    x0: float
    y0: float
    x1: float
    y1: float


class Point(BaseModel):
    """A point in absolute pixels."""

    x: float
    y: float


def needs_mask(mask_format: str, info: ValidationInfo) -> str:
    """A `mask_format` given without `mask=true` would do nothing, unnoticed: say so."""
    if not info.data.get("mask"):
        raise ValueError("mask_format says how to send the mask: ask for one with mask=true")
    return mask_format


def expect_object(data: Any, keys: str) -> Any:
    """Say what to send where a prompt comes as a list or a multipart-style string instead of an object."""
    if isinstance(data, (list, tuple, str)):
        kind = "a list" if not isinstance(data, str) else "a string (that form is for multipart bodies)"
        raise ValueError(f"give an object {{{keys}}} in pixels, not {kind}")
    return data


class BoxPrompt(Box):
    """A box prompt: finite, non-negative, x0 < x1 and y0 < y1."""

    model_config = ConfigDict(extra="forbid")  # e.g. a "normalized" flag would do nothing: say so
    x0: float = Coord
    y0: float = Coord
    x1: float = Coord
    y1: float = Coord

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        return expect_object(data, '"x0", "y0", "x1", "y1"')

    @model_validator(mode="after")
    def _ordered(self) -> BoxPrompt:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError("box is inverted or empty: need x0 < x1 and y0 < y1")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


class PointPrompt(Point):
    """A point prompt: finite and non-negative."""

    model_config = ConfigDict(extra="forbid")
    x: float = Coord
    y: float = Coord

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        return expect_object(data, '"x", "y"')

    def as_tuple(self) -> tuple[float, float]:
        return (self.x, self.y)


MaskFormat = Literal["rle", "png", "both"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptionParams(_Request):
    box: BoxPrompt | None = Field(None, description="Caption this region (multipart: 'x0,y0,x1,y1')")
    point: PointPrompt | None = Field(None, description="Caption the object at this point (multipart: 'x,y')")
    max_new_tokens: int | None = MaxNewTokens
    num_beams: int = Field(1, ge=1, le=8)
    stream: bool = Field(False, description="Answer with Server-Sent Events, a word at a time (greedy: num_beams=1)")

    @field_validator("point")
    @classmethod
    def _not_both(cls, point: PointPrompt | None, info: ValidationInfo) -> PointPrompt | None:
        if point is not None and info.data.get("box") is not None:
            raise ValueError("give a box or a point, not both")
        return point


class LocalizeParams(_Request):
    text: str | list[str] = Field(description="One text, or many (multipart: repeat the field)")
    mask: bool = Field(False, description="Also return a segmentation mask")
    mask_format: MaskFormat = Field("rle", description="How to send the mask (with mask=true)")

    _needs_mask = field_validator("mask_format")(needs_mask)

    @field_validator("text", mode="before")
    @classmethod
    def _one_or_many(cls, text: object) -> object:
        """One error in the user's words (pydantic's names both union members: `text.str`, `text.list[str]`)."""
        if isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text)):
            return text
        raise ValueError("give a text, or a list of texts")

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class RegionsParams(_Request):
    boxes: list[BoxPrompt] = Field(default_factory=list, description="Caption each box (multipart: repeat)")
    points: list[PointPrompt] = Field(default_factory=list, description="Caption at each point (multipart: repeat)")
    texts: list[str] = Field(default_factory=list, description="Localize each text (multipart: repeat)")
    mask: bool = False
    mask_format: MaskFormat = Field("rle", description="How to send the masks (with mask=true)")
    max_new_tokens: int | None = MaxNewTokens
    num_beams: int = Field(1, ge=1, le=8)

    _needs_mask = field_validator("mask_format")(needs_mask)

    @field_validator("mask")
    @classmethod
    def _masks_of_texts(cls, mask: bool, info: ValidationInfo) -> bool:
        """Masks are the texts' objects': one asked for without texts would do nothing, unnoticed."""
        if mask and "texts" in info.data and not info.data["texts"]:
            raise ValueError("masks are of the texts' objects: give texts, or leave mask out")
        return mask

    @field_validator("max_new_tokens", "num_beams")
    @classmethod
    def _for_captions(cls, value: int | None, info: ValidationInfo) -> int | None:
        """How to caption, with nothing to caption, would do nothing, unnoticed."""
        if "boxes" in info.data and "points" in info.data and not (info.data["boxes"] or info.data["points"]):
            raise ValueError(f"{info.field_name} says how to caption boxes and points: give some, or leave it out")
        return value


class DenseParams(_Request):
    score_threshold: float = Field(
        PROPOSAL_SCORE_THRESHOLD, ge=0, le=1, allow_inf_nan=False, description="Least objectness a region needs"
    )
    nms_iou: float = Field(
        PROPOSAL_NMS_IOU,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Regions overlapping a better one by more are dropped",
    )
    max_regions: int = Field(
        MAX_PROPOSALS, ge=1, le=256, description="At most this many regions (and the server's max_regions)"
    )
    max_new_tokens: int | None = MaxNewTokens
    num_beams: int = Field(1, ge=1, le=8)


IMAGE_DESCRIPTION = "The image, base64 (a data: URL prefix is allowed). PNG, JPEG, WEBP, BMP or GIF."


class CaptionJSON(CaptionParams):
    image: str = Field(description=IMAGE_DESCRIPTION)


class LocalizeJSON(LocalizeParams):
    image: str = Field(description=IMAGE_DESCRIPTION)


class RegionsJSON(RegionsParams):
    image: str = Field(description=IMAGE_DESCRIPTION)


class DenseJSON(DenseParams):
    image: str = Field(description=IMAGE_DESCRIPTION)


class Word(BaseModel):
    text: str
    start: int = Field(description="Character offset of the word in the caption")
    end: int
    point: Point = Field(description="The centre of `box`")
    point_norm: Point
    box: Box = Field(
        description="In captions, the object proposal nearest the point head's box for a word that has a location "
        "(score >= 0.5, models with a proposal head), else that box"
    )
    box_norm: Box
    regressed_box: Box | None = Field(None, description="The point head's own box, when a proposal replaced it")
    generated_text: str | None = Field(
        None,
        description="The decoder's word, when the region caption of the word's object said another word of its "
        "class (a color, a shape: the model's `attribute_words`) and replaced it",
    )
    score: float = Field(description="The point head's confidence that the word has a location")


class ImageInfo(BaseModel):
    width: int
    height: int


class Mask(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str | None = Field(None, description="COCO compressed RLE (column-major), as pycocotools writes")
    png: str | None = Field(None, description="Base64 PNG, mode L, 255 inside the mask")


class CaptionResult(BaseModel):
    caption: str
    words: list[Word]
    score: float = Field(
        description="The geometric mean of the caption's token probabilities, in [0, 1] (with beams: of its "
        "length-normalized log-probability)"
    )
    box: Box | None = Field(None, description="The region prompt, if any")
    point: Point | None = Field(None, description="The point prompt, if any")


class Localization(BaseModel):
    text: str
    box: Box = Field(description="The object proposal nearest the point head's box, or that box (no proposal head)")
    box_norm: Box
    regressed_box: Box | None = Field(None, description="The point head's own box, when a proposal replaced it")
    score: float
    words: list[Word]
    mask: Mask | None = None


class _Response(BaseModel):
    image: ImageInfo
    model: str
    cache_hit: bool = Field(description="The image embedding came from the cache (no encoder pass)")
    timing_ms: dict[str, float]


class CaptionResponse(_Response, CaptionResult):
    pass


class LocalizeResponse(_Response):
    results: list[Localization]


class RegionsResponse(_Response):
    captions: list[CaptionResult] = Field(description="One per box, then one per point, in request order")
    localizations: list[Localization] = Field(description="One per text, in request order")


class DenseRegion(BaseModel):
    box: Box
    box_norm: Box
    score: float = Field(description="Objectness of the region, in [0, 1]")
    caption: str
    words: list[Word]


class DenseResponse(_Response):
    regions: list[DenseRegion] = Field(description="Best score first")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    model: str | None = None


class Ready(Health):
    max_body_bytes: int = Field(description="the largest request body the service reads, in bytes (413 above)")
