"""Prompt feature extractor: learnable queries and prompt tokens read the fused image features.

SAM's `TwoWayTransformer` lets the query tokens attend to the image and the image attend back; the
queries' outputs become the language model's visual tokens.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

from ..config import ExtractorConfig


class PromptFeatureExtractor(nn.Module):
    """Fused features (U, C_in, h, w) + prompt tokens (B, P, C_p) -> visual tokens (B, Q, D_lm)."""

    def __init__(self, cfg: ExtractorConfig, in_dim: int, prompt_dim: int, lm_dim: int):
        super().__init__()
        self.input_proj = nn.Sequential(nn.Conv2d(in_dim, cfg.width, kernel_size=1), nn.GroupNorm(1, cfg.width))
        self.prompt_proj = nn.Linear(prompt_dim, cfg.width)
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.width) * 0.02)
        self.pe = PositionEmbeddingRandom(cfg.width // 2)
        self.transformer = TwoWayTransformer(
            depth=cfg.depth, embedding_dim=cfg.width, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim
        )
        self.query_proj = nn.Sequential(nn.Linear(cfg.width, cfg.query_dim), nn.GELU())
        self.output_proj = nn.Sequential(nn.Linear(cfg.query_dim, lm_dim), nn.LayerNorm(lm_dim))
        self.num_queries = cfg.num_queries

    def forward(
        self, features: torch.Tensor, prompt_tokens: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`image_index` (B,): the image of `features` (U, C_in, h, w) each prompt reads (default: the i-th);
        the image-only projection runs once per image, however many prompts read it."""
        x = self.input_proj(features)
        _, _, h, w = x.shape
        pe = self.pe((h, w)).unsqueeze(0).to(x.dtype)
        # SAM's attention adds the encoding to keys only; adding it to the features too puts absolute
        # position into the values the queries read, which the coordinates regressed later need.
        x = x + pe
        if image_index is not None:
            x = x[image_index]
        b = x.shape[0]
        pe = pe.expand(b, -1, -1, -1)
        tokens = torch.cat([self.queries.expand(b, -1, -1), self.prompt_proj(prompt_tokens)], dim=1)
        queries, _ = self.transformer(x, pe, tokens)
        return self.output_proj(self.query_proj(queries[:, : self.num_queries]))
