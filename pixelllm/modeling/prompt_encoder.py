"""Location prompts: SAM's `PromptEncoder` for boxes and points, a learned embedding for "no prompt".

Every prompt becomes exactly two tokens (a box: its two corners; a point: the point and SAM's padding
point; none: two learned tokens), so captions, region captions and point prompts batch together.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling import PromptEncoder
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

PROMPT_TOKENS = 2


class PositionEmbedding(PositionEmbeddingRandom):
    """SAM's random Fourier position encoding, computed in float32 and returned in the model's dtype.

    SAM's own casts the coordinates to float32 and multiplies them by its Gaussian matrix, which fails once the
    model is in bfloat16 or float16. Same buffer; `LocationPromptEncoder` switches SAM's layer to it.
    """

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates (..., 2) in [0, 1] -> encoding (..., C)."""
        matrix = self.positional_encoding_gaussian_matrix
        angles = 2 * math.pi * ((2 * coords.float() - 1) @ matrix.float())
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(matrix.dtype)


class LocationPromptEncoder(nn.Module):
    """Boxes (B, 4) / points (B, 2) in model-input pixels -> prompt tokens (B, 2, C)."""

    def __init__(self, embed_dim: int, image_embedding_size: int, image_size: int):
        super().__init__()
        self.sam = PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        )
        self.sam.pe_layer.__class__ = PositionEmbedding  # the same module and matrix; building anew would draw new ones
        self.no_prompt = nn.Parameter(torch.randn(1, PROMPT_TOKENS, embed_dim) * 0.02)

    def forward(
        self,
        boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Prompt tokens (B, 2, C).

        Args:
            boxes: (B, 4) x0, y0, x1, y1 in model-input pixels; used where `box_mask` (B,) is True.
            points: (B, 2) x, y in model-input pixels; used where `point_mask` (B,) is True.
            batch_size: B when neither boxes nor points are given.
        """
        b = _batch_size(boxes, points, batch_size)
        out = self.no_prompt.expand(b, -1, -1).clone()
        mask = _where(box_mask, boxes, b)
        if mask is not None and mask.any():
            sparse, _ = self.sam(points=None, boxes=boxes[mask], masks=None)
            out[mask] = sparse.to(out.dtype)
        mask = _where(point_mask, points, b)
        if mask is not None and mask.any():
            coords = points[mask].unsqueeze(1)
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
            sparse, _ = self.sam(points=(coords, labels), boxes=None, masks=None)
            out[mask] = sparse.to(out.dtype)
        return out

    def anchor_boxes(
        self,
        point_box_size: float,
        boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """The box (B, 4) in model-input pixels each prompt's anchored queries tile: the box prompt; a square of
        `point_box_size` x the image side centred on a point prompt; the whole image without a prompt (the
        paper's global box)."""
        b = _batch_size(boxes, points, batch_size)
        size = self.sam.input_image_size[0]
        ref = boxes if boxes is not None else points
        device = ref.device if ref is not None else self.no_prompt.device
        out = torch.tensor([0.0, 0.0, size, size], device=device).repeat(b, 1)
        mask = _where(box_mask, boxes, b)
        if mask is not None:
            out[mask] = boxes[mask].float()
        mask = _where(point_mask, points, b)
        if mask is not None:
            half = point_box_size * size / 2
            out[mask] = torch.cat([points[mask] - half, points[mask] + half], dim=-1).float()
        return out

    def box_prompt_for_masks(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM (sparse (B, 2, C), dense (B, C, h, w)) embeddings of boxes (B, 4), for the mask decoder."""
        return self.sam(points=None, boxes=boxes, masks=None)

    def dense_pe(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of SAM's feature grid."""
        return self.sam.get_dense_pe()

    @property
    def pe_layer(self) -> nn.Module:
        """SAM's Fourier position encoding of the prompts, shared with the feature extractor."""
        return self.sam.pe_layer


def _batch_size(boxes: torch.Tensor | None, points: torch.Tensor | None, batch_size: int | None) -> int:
    ref = boxes if boxes is not None else points
    return ref.shape[0] if ref is not None else batch_size


def _where(mask: torch.Tensor | None, values: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Which rows of `values` hold a prompt (all of them when `mask` is None); None without `values`."""
    if values is None:
        return None
    return mask if mask is not None else torch.ones(b, dtype=torch.bool, device=values.device)
