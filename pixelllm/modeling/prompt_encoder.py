"""Location prompts: SAM's `PromptEncoder` for boxes and points, a learned embedding for "no prompt".

Every prompt becomes exactly two tokens (a box: its two corners; a point: the point and SAM's padding
point; none: two learned tokens), so captions, region captions and point prompts batch together.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import PromptEncoder
from torch import nn

PROMPT_TOKENS = 2


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
        ref = boxes if boxes is not None else points
        b = ref.shape[0] if ref is not None else batch_size
        out = self.no_prompt.expand(b, -1, -1).clone()
        if boxes is not None:
            mask = box_mask if box_mask is not None else torch.ones(b, dtype=torch.bool, device=boxes.device)
            if mask.any():
                sparse, _ = self.sam(points=None, boxes=boxes[mask], masks=None)
                out[mask] = sparse.to(out.dtype)
        if points is not None:
            mask = point_mask if point_mask is not None else torch.ones(b, dtype=torch.bool, device=points.device)
            if mask.any():
                coords = points[mask].unsqueeze(1)
                labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
                sparse, _ = self.sam(points=(coords, labels), boxes=None, masks=None)
                out[mask] = sparse.to(out.dtype)
        return out

    def box_prompt_for_masks(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM (sparse (B, 2, C), dense (B, C, h, w)) embeddings of boxes (B, 4), for the mask decoder."""
        return self.sam(points=None, boxes=boxes, masks=None)

    def dense_pe(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of SAM's feature grid."""
        return self.sam.get_dense_pe()
