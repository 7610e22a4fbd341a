"""Prompt feature extractor: learnable queries and prompt tokens read the fused image features.

SAM's `TwoWayTransformer` lets the query tokens attend to the image and the image attend back; the
queries' outputs become the language model's visual tokens. Positions are encoded with the prompt
encoder's own Fourier basis, as SAM does, so a prompt token and the image cells under it match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn

from ..config import ExtractorConfig


def anchor_grid_points(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Boxes (B, 4) x0, y0, x1, y1 -> the centres of a grid x grid tiling of each box (B, grid*grid, 2), row-major."""
    steps = (torch.arange(grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid
    gy, gx = torch.meshgrid(steps, steps, indexing="ij")
    unit = torch.stack([gx.flatten(), gy.flatten()], dim=-1)
    return boxes[:, None, :2] + unit[None] * (boxes[:, None, 2:] - boxes[:, None, :2])


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's `Attention` after its input projections, through `scaled_dot_product_attention`.

    q (B, Nq, C_int), k and v (B, Nk, C_int), already projected -> (B, Nq, C).
    """
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def _attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's `Attention.forward`: q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
    return _attend(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v))


def image_projections(
    layer: TwoWayAttentionBlock, image: torch.Tensor, image_pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a layer projects of the image tokens (B, N, C): the keys and values the prompt tokens read
    (token-to-image) and the image tokens' own queries (image-to-token), each (B, N, C_int)."""
    positioned = image + image_pe
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    return to_image.k_proj(positioned), to_image.v_proj(image), to_token.q_proj(positioned)


def two_way_forward(
    transformer: TwoWayTransformer,
    image: torch.Tensor,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    image_index: torch.Tensor | None = None,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SAM's `TwoWayTransformer.forward` for many prompts per image; returns the processed tokens (B, T, C).

    Until the first layer updates the image tokens they are the image's own, so that layer's key, value and
    image-side query projections run once per image (U) instead of once per prompt (B), or not at all when
    given (`first`, that layer's `image_projections`), and the attention runs through
    `scaled_dot_product_attention`. Same arithmetic as SAM's modules, same weights.

    Args:
        image: image tokens (U, N, C).
        image_pe: their position encoding (1, N, C).
        tokens: prompt tokens (B, T, C), also their own position encoding (as in SAM).
        image_index: (B,) the image each prompt reads; default: the i-th (U == B).
        first: `image_projections(transformer.layers[0], image, image_pe)`, when kept from an earlier call.
    """

    def per_prompt(t: torch.Tensor) -> torch.Tensor:
        if image_index is None:
            return t
        return t.expand(len(image_index), -1, -1) if t.shape[0] == 1 else t[image_index]

    queries, keys = tokens, None
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = _attention(layer.self_attn, queries, queries, queries)
        else:
            q = queries + tokens
            queries = queries + _attention(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)

        to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if keys is None:
            projected = first or image_projections(layer, image, image_pe)
            image_k, image_v, image_q, source = map(per_prompt, (*projected, image))
        else:
            source = keys
            image_k, image_v, image_q = image_projections(layer, keys, image_pe)

        queries = layer.norm2(queries + _attend(to_image, to_image.q_proj(queries + tokens), image_k, image_v))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        keys = layer.norm4(source + _attend(to_token, image_q, to_token.k_proj(q), to_token.v_proj(queries)))

    keys = per_prompt(image) if keys is None else keys
    final = transformer.final_attn_token_to_image
    queries = queries + _attention(final, queries + tokens, keys + image_pe, keys)
    return transformer.norm_final_attn(queries)


@dataclass
class ImageReading:
    """What the extractor takes from U images before any prompt reads them; computed once for features kept to
    answer many prompts (`PromptFeatureExtractor.read`).

    tokens: input-projected features plus their position encoding, token-major (U, h*w, width), on a `grid` of
    (h, w) cells (the encoding, the same for every image, is not kept: `PromptFeatureExtractor.image_pe`); first:
    the first layer's `image_projections` of the tokens, each (U, h*w, C_int); objects: the object tokens
    (U, K, D_lm), for models with them; unlocated: the visual tokens (U, V, D_lm) of a prompt without box or point,
    the same for every such prompt on the image (set by `PixelLLM.encode_images(keep=True)`).
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    objects: torch.Tensor | None = None
    unlocated: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """The tokens channel-major (U, width, h, w), for sampling: a view, not a copy."""
        return self.tokens.transpose(1, 2).unflatten(2, self.grid)

    def __getitem__(self, index: slice | torch.Tensor | list[int]) -> ImageReading:
        first = tuple(t[index] for t in self.first)
        objects, unlocated = (None if t is None else t[index] for t in (self.objects, self.unlocated))
        return ImageReading(self.tokens[index], self.grid, first, objects, unlocated)  # type: ignore[arg-type]

    def clone(self) -> ImageReading:
        """A copy with memory of its own (an indexed reading shares its batch's)."""
        first = tuple(t.clone() for t in self.first)
        objects, unlocated = (None if t is None else t.clone() for t in (self.objects, self.unlocated))
        return ImageReading(self.tokens.clone(), self.grid, first, objects, unlocated)  # type: ignore[arg-type]

    @staticmethod
    def cat(items: list[ImageReading]) -> ImageReading:
        def cat_all(name: str) -> torch.Tensor | None:
            found = [getattr(r, name) for r in items]
            return None if any(t is None for t in found) else torch.cat(found)

        first = tuple(torch.cat(t) for t in zip(*(r.first for r in items)))
        tokens, objects, unlocated = map(cat_all, ("tokens", "objects", "unlocated"))
        return ImageReading(tokens, items[0].grid, first, objects, unlocated)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        tensors = (self.tokens, *self.first, self.objects, self.unlocated)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PromptFeatureExtractor(nn.Module):
    """Fused features (U, C_in, h, w) + prompt tokens (B, P, C_p) -> visual tokens (B, Q, D_lm), or (B, Q + 1, D_lm)
    with anchors (the last token is the anchors' layout)."""

    def __init__(self, cfg: ExtractorConfig, in_dim: int, prompt_dim: int, lm_dim: int, image_size: int):
        super().__init__()
        self.input_proj = nn.Sequential(nn.Conv2d(in_dim, cfg.width, kernel_size=1), nn.GroupNorm(1, cfg.width))
        self.prompt_proj = nn.Linear(prompt_dim, cfg.width)
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.width) * 0.02)
        self.transformer = TwoWayTransformer(
            depth=cfg.depth, embedding_dim=cfg.width, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim
        )
        if cfg.anchor_grid:
            # SAM's first layer replaces the tokens by their self-attention mix; anchored queries must keep
            # what they sampled, so that layer adds its output like the others do.
            self.transformer.layers[0].skip_first_layer_pe = False
        self.query_proj = nn.Sequential(nn.Linear(cfg.width, cfg.query_dim), nn.GELU())
        self.output_proj = nn.Sequential(nn.Linear(cfg.query_dim, lm_dim), nn.LayerNorm(lm_dim))
        if cfg.anchor_grid:
            # One more visual token: all anchors' samples at once, so the layout inside the box (the
            # object's shape) reaches the language model in a single token, as color does.
            self.layout_proj = nn.Sequential(
                nn.Linear(cfg.anchor_grid**2 * cfg.width, cfg.query_dim),
                nn.GELU(),
                nn.Linear(cfg.query_dim, lm_dim),
                nn.LayerNorm(lm_dim),
            )
        self.num_queries = cfg.num_queries
        self.object_box_proj = self._object_box_proj(prompt_dim, lm_dim) if cfg.object_tokens else None
        self.object_reading_proj = self._object_reading_proj(lm_dim) if cfg.object_readings else None
        self.anchor_grid = cfg.anchor_grid
        self.image_size = image_size

    @staticmethod
    def _object_box_proj(prompt_dim: int, lm_dim: int) -> nn.Linear:
        """A box's two prompt-encoder tokens -> an offset to its object token; starts at zero, so a model given
        object tokens to fine-tune first sees each object as the layout token a box prompt would give it."""
        proj = nn.Linear(2 * prompt_dim, lm_dim)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        return proj

    def _object_reading_proj(self, lm_dim: int) -> nn.Linear:
        """A box prompt's visual tokens (Q + 1 of them, flattened) -> an offset to the object token of its box;
        starts at zero, so a model given object readings to fine-tune begins as it was."""
        proj = nn.Linear((self.num_queries + 1) * lm_dim, lm_dim)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        return proj

    def add_object_readings(self, lm_dim: int) -> None:
        """Give an extractor with object tokens the (zero) projection of object readings."""
        reference = self.queries
        self.object_reading_proj = self._object_reading_proj(lm_dim).to(reference.device, reference.dtype)

    def add_object_tokens(self, prompt_dim: int, lm_dim: int) -> None:
        """Give an extractor made without them the (zero) box projection of object tokens."""
        reference = self.queries
        self.object_box_proj = self._object_box_proj(prompt_dim, lm_dim).to(reference.device, reference.dtype)

    def _anchor_samples(
        self, x: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features x (U, width, h, w) at the anchor grid of boxes (B, 4) in model-input pixels, box b on image
        image_index[b] (default: b) -> samples (B, g*g, width) and the anchor points (B, g*g, 2)."""
        points = anchor_grid_points(boxes.to(x.dtype), self.anchor_grid)
        if image_index is None:
            return self._sample(x, points), points
        # all boxes on one image in one call: the image's features are not copied per box
        sampled = x.new_empty(*points.shape[:2], x.shape[1])
        for u in image_index.unique().tolist():
            rows = (image_index == u).nonzero()[:, 0]
            sampled[rows] = self._sample(x[u : u + 1], points[rows].flatten(0, 1)[None]).view(len(rows), -1, x.shape[1])
        return sampled, points

    def image_pe(self, pe_layer: PositionEmbeddingRandom, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The position encoding of the image tokens on a `grid` of (h, w) cells: (1, width, h, w)."""
        return self.prompt_proj(pe_layer(grid).permute(1, 2, 0)).permute(2, 0, 1).unsqueeze(0).to(dtype)

    def read(
        self,
        features: torch.Tensor,
        pe_layer: PositionEmbeddingRandom,
        object_boxes: torch.Tensor | None = None,
        object_box_tokens: torch.Tensor | None = None,
        object_valid: torch.Tensor | None = None,
    ) -> ImageReading:
        """Fused features (U, C_in, h, w) -> what every prompt on these images reads of them (`ImageReading`);
        with the object tokens of object_boxes (U, K, 4), their box tokens (U, K, 2, C_p) and which are objects
        (U, K) (the others are padding no prompt reads), if given."""
        return self._read(features, pe_layer, object_boxes, object_box_tokens, object_valid)[0]

    def _read(
        self,
        features: torch.Tensor,
        pe_layer: PositionEmbeddingRandom,
        object_boxes: torch.Tensor | None,
        object_box_tokens: torch.Tensor | None,
        object_valid: torch.Tensor | None,
    ) -> tuple[ImageReading, torch.Tensor]:
        """`read`, and the image tokens' position encoding (1, h*w, width)."""
        x = self.input_proj(features)
        _, _, h, w = x.shape
        pe = self.image_pe(pe_layer, (h, w), x.dtype)
        # SAM's attention adds the encoding to keys only; adding it to the features too puts absolute
        # position into the values the queries read, which the coordinates regressed later need.
        x = x + pe
        # token-major, as the per-prompt image tokens that grow from them: channel-major ones would make every
        # per-prompt add and norm over (B, h*w, C) copy
        tokens, image_pe = (t.flatten(2).transpose(1, 2).contiguous() for t in (x, pe))
        first = image_projections(self.transformer.layers[0], tokens, image_pe)
        reading = ImageReading(tokens, (h, w), first)
        if object_boxes is not None:
            objects = self.object_tokens(x, object_boxes, object_box_tokens)
            if self.object_reading_proj is not None:  # read before the reading has object tokens
                objects = objects + self._object_readings(
                    reading, pe_layer, object_boxes, object_box_tokens, object_valid
                )
            reading.objects = objects
        return reading, image_pe

    def forward(
        self,
        features: torch.Tensor | ImageReading,
        prompt_tokens: torch.Tensor,
        pe_layer: PositionEmbeddingRandom,
        anchor_boxes: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        object_boxes: torch.Tensor | None = None,
        object_box_tokens: torch.Tensor | None = None,
        object_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Visual tokens (B, Q, D_lm); (B, Q + 1, D_lm) with anchors; (B, Q + 1 + K, D_lm) with object tokens.

        Args:
            features: fused image features (U, C_in, h, w), or what `read` took of them (with the object tokens
                already, if any: then object_boxes and object_box_tokens are not given).
            prompt_tokens: location prompt tokens (B, P, C_p).
            pe_layer: the prompt encoder's position encoding (its Fourier basis encodes image cells and anchors).
            anchor_boxes: (B, 4) model-input pixels, the box each prompt's anchored queries tile; needed
                when `anchor_grid` > 0.
            image_index: (B,) the image of `features` each prompt reads (default: the i-th); the image-only
                projection runs once per image, however many prompts read it.
            object_boxes: (U, K, 4) model-input pixels, the objects of each image (`object_tokens` > 0).
            object_box_tokens: (U, K, 2, C_p) their prompt-encoder box tokens.
            object_valid: (U, K) which object boxes are objects (default: all).
        """
        if isinstance(features, ImageReading):
            image = features
            image_pe = self.image_pe(pe_layer, image.grid, image.tokens.dtype).flatten(2).transpose(1, 2)
        else:
            image, image_pe = self._read(features, pe_layer, object_boxes, object_box_tokens, object_valid)
        b = prompt_tokens.shape[0]
        queries = self.queries.expand(b, -1, -1)
        layout = None
        if self.anchor_grid:
            if anchor_boxes is None:
                raise ValueError("an extractor with anchor_grid > 0 needs anchor_boxes")
            queries = queries.clone()
            sampled, points = self._anchor_samples(image.x, anchor_boxes, image_index)
            anchor_pe = self.prompt_proj(pe_layer.forward_with_coords(points, (self.image_size, self.image_size)))
            n = points.shape[1]
            queries[:, :n] = queries[:, :n] + sampled + anchor_pe.to(image.x.dtype)
            layout = self.layout_proj(sampled.flatten(1)).unsqueeze(1)
        tokens = torch.cat([queries, self.prompt_proj(prompt_tokens)], dim=1)
        out = two_way_forward(self.transformer, image.tokens, image_pe, tokens, image_index, image.first)
        visual = self.output_proj(self.query_proj(out[:, : self.num_queries]))
        if layout is None:
            return visual
        visual = torch.cat([visual, layout], dim=1)
        if image.objects is None:
            return visual
        return torch.cat([visual, image.objects if image_index is None else image.objects[image_index]], dim=1)

    def object_tokens(self, x: torch.Tensor, boxes: torch.Tensor, box_tokens: torch.Tensor) -> torch.Tensor:
        """Positioned features x (U, width, h, w), boxes (U, K, 4), box tokens (U, K, 2, C_p) -> (U, K, D_lm)."""
        if self.object_box_proj is None:
            raise ValueError("this extractor has no object tokens (extractor.object_tokens is 0)")
        u, k = boxes.shape[:2]
        points = anchor_grid_points(boxes.flatten(0, 1).to(x.dtype), self.anchor_grid)  # (U*K, g*g, 2)
        sampled = self._sample(x, points.view(u, -1, 2))  # each image's boxes in one call
        layout = self.layout_proj(sampled.reshape(u, k, -1))
        return layout + self.object_box_proj(box_tokens.flatten(2).to(layout.dtype))

    def _object_readings(
        self,
        reading: ImageReading,
        pe_layer: PositionEmbeddingRandom,
        boxes: torch.Tensor,
        box_tokens: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """What a box prompt on each object box reads, projected: (U, K, D_lm); zero where `valid` (U, K) is False.

        The extractor runs on the valid boxes (U, K, 4) with their box tokens (U, K, 2, C_p) as box prompts on the
        reading's images (which has no object tokens yet), so each gets a region caption's visual tokens."""
        u, k = boxes.shape[:2]
        flat = torch.ones(u * k, dtype=torch.bool, device=boxes.device) if valid is None else valid.flatten()
        rows = flat.nonzero()[:, 0]
        proj = self.object_reading_proj
        out = reading.tokens.new_zeros(u * k, proj.out_features)
        if len(rows):
            visual = self(reading, box_tokens.flatten(0, 1)[rows], pe_layer, boxes.flatten(0, 1)[rows], rows // k)
            out = out.index_put((rows,), proj(visual.flatten(1)))
        return out.view(u, k, -1)

    def _sample(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Features x (U, C, h, w) at points (U, P, 2) x, y in model-input pixels -> (U, P, C), bilinear."""
        grid = points / self.image_size * 2 - 1
        # contiguous: x is mostly `ImageReading.x`, a channels-last view, which grid_sample on CPU reads wrongly in
        # bfloat16 and float16 (torch 2.14: values of 1e37 or NaN; tests/test_dtypes.py)
        return F.grid_sample(x.contiguous(), grid.unsqueeze(2), align_corners=False)[..., 0].transpose(1, 2)
