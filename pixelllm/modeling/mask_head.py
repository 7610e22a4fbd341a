"""Mask output: SAM's `MaskDecoder` on SAM's image features, prompted by a (predicted) box."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch import nn

from ..config import MaskDecoderConfig
from .prompt_encoder import LocationPromptEncoder


class MaskHead(nn.Module):
    """SAM features (B, C, h, w) + boxes (B, 4) in model-input pixels -> mask logits (B, 4h, 4w)."""

    def __init__(self, cfg: MaskDecoderConfig, dim: int):
        super().__init__()
        self.decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=cfg.depth, embedding_dim=dim, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads
            ),
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        )

    def forward(
        self, sam_features: torch.Tensor, boxes: torch.Tensor, prompt_encoder: LocationPromptEncoder
    ) -> torch.Tensor:
        sparse, dense = prompt_encoder.box_prompt_for_masks(boxes)
        pe = prompt_encoder.dense_pe().to(sam_features.dtype)
        # SAM's decoder repeats one image over its prompts, so each image is decoded with its own box.
        masks = [
            self.decoder(
                image_embeddings=sam_features[i : i + 1],
                image_pe=pe,
                sparse_prompt_embeddings=sparse[i : i + 1].to(sam_features.dtype),
                dense_prompt_embeddings=dense[i : i + 1].to(sam_features.dtype),
                multimask_output=False,
            )[0]
            for i in range(sam_features.shape[0])
        ]
        return torch.cat(masks, dim=0)[:, 0]


def upsample_masks(mask_logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """Low-res logits (B, h, w) -> logits (B, S, S) of the model input."""
    return F.interpolate(mask_logits[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)[
        :, 0
    ]
