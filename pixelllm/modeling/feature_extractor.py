"""Prompt feature extractor: learnable queries and prompt tokens read the fused image features.

SAM's `TwoWayTransformer` lets the query tokens attend to the image and the image attend back; the
queries' outputs become the language model's visual tokens. Positions are encoded with the prompt
encoder's own Fourier basis, as SAM does, so a prompt token and the image cells under it match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import Attention
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


def two_way_forward(
    transformer: TwoWayTransformer,
    image: torch.Tensor,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM's `TwoWayTransformer.forward` for many prompts per image; returns the processed tokens (B, T, C).

    Until the first layer updates the image tokens they are the image's own, so that layer's key, value and
    image-side query projections run once per image (U) instead of once per prompt (B), and the attention
    runs through `scaled_dot_product_attention`. Same arithmetic as SAM's modules, same weights.

    Args:
        image: image tokens (U, N, C).
        image_pe: their position encoding (1, N, C).
        tokens: prompt tokens (B, T, C), also their own position encoding (as in SAM).
        image_index: (B,) the image each prompt reads; default: the i-th (U == B).
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
        source = image if keys is None else keys
        positioned = source + image_pe
        image_k, image_v = to_image.k_proj(positioned), to_image.v_proj(source)
        image_q = to_token.q_proj(positioned)
        if keys is None:
            image_k, image_v, image_q, source = map(per_prompt, (image_k, image_v, image_q, source))

        queries = layer.norm2(queries + _attend(to_image, to_image.q_proj(queries + tokens), image_k, image_v))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        keys = layer.norm4(source + _attend(to_token, image_q, to_token.k_proj(q), to_token.v_proj(queries)))

    keys = per_prompt(image) if keys is None else keys
    final = transformer.final_attn_token_to_image
    queries = queries + _attention(final, queries + tokens, keys + image_pe, keys)
    return transformer.norm_final_attn(queries)


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
        self.anchor_grid = cfg.anchor_grid
        self.image_size = image_size

    def forward(
        self,
        features: torch.Tensor,
        prompt_tokens: torch.Tensor,
        pe_layer: PositionEmbeddingRandom,
        anchor_boxes: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Visual tokens (B, Q, D_lm); (B, Q + 1, D_lm) with anchors.

        Args:
            features: fused image features (U, C_in, h, w).
            prompt_tokens: location prompt tokens (B, P, C_p).
            pe_layer: the prompt encoder's position encoding (its Fourier basis encodes image cells and anchors).
            anchor_boxes: (B, 4) model-input pixels, the box each prompt's anchored queries tile; needed
                when `anchor_grid` > 0.
            image_index: (B,) the image of `features` each prompt reads (default: the i-th); the image-only
                projection runs once per image, however many prompts read it.
        """
        x = self.input_proj(features)
        _, _, h, w = x.shape
        pe = self.prompt_proj(pe_layer((h, w)).permute(1, 2, 0)).permute(2, 0, 1).unsqueeze(0).to(x.dtype)
        # SAM's attention adds the encoding to keys only; adding it to the features too puts absolute
        # position into the values the queries read, which the coordinates regressed later need.
        x = x + pe
        b = prompt_tokens.shape[0]
        queries = self.queries.expand(b, -1, -1)
        layout = None
        if self.anchor_grid:
            if anchor_boxes is None:
                raise ValueError("an extractor with anchor_grid > 0 needs anchor_boxes")
            queries = queries.clone()
            points = anchor_grid_points(anchor_boxes.to(x.dtype), self.anchor_grid)
            grid = (points / self.image_size * 2 - 1).unsqueeze(2)
            sampled = F.grid_sample(x if image_index is None else x[image_index], grid, align_corners=False)
            anchor_pe = self.prompt_proj(pe_layer.forward_with_coords(points, (self.image_size, self.image_size)))
            sampled = sampled.squeeze(-1).transpose(1, 2)  # (B, g*g, width)
            n = points.shape[1]
            queries[:, :n] = queries[:, :n] + sampled + anchor_pe.to(x.dtype)
            layout = self.layout_proj(sampled.flatten(1)).unsqueeze(1)
        tokens = torch.cat([queries, self.prompt_proj(prompt_tokens)], dim=1)
        image, image_pe = (t.flatten(2).transpose(1, 2) for t in (x, pe))
        out = two_way_forward(self.transformer, image, image_pe, tokens, image_index)
        visual = self.output_proj(self.query_proj(out[:, : self.num_queries]))
        return visual if layout is None else torch.cat([visual, layout], dim=1)
