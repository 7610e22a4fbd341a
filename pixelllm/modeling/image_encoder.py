"""Dual image encoder: SAM ViT (encoder A, frozen in the paper) and EVA02 (encoder B, trainable).

SAM's neck output is resized (bicubic) to EVA's patch grid and the two maps are concatenated on
channels, as in PixelLLM: for the paper preset at 384 px, 27x27x(256 + 1024).
"""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from ..config import EvaEncoderConfig, SamEncoderConfig

SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
EVA_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


class RelPosAttention(Attention):
    """SAM's `Attention` through `scaled_dot_product_attention`, its relative position terms the additive mask,
    built for a block of query rows at a time (at most `MASK_BYTES`).

    SAM's own writes the whole attention map (B * heads, N, N) three times (scores, scores plus position terms,
    softmax): for the tiny preset's 36x36 global block and 8 images, 107 MB each, on fresh pages every call. Same
    parameters and arithmetic; `build_sam_image_encoder` switches the ViT's blocks to it.
    """

    MASK_BYTES = 8 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        # q, k, v (B, heads, H * W, C / heads)
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            r_q = q.reshape(b * self.num_heads, h, w, -1)
            # contiguous (einsum's are not), so each block's mask below is summed into the layout its flattening
            # views rather than after the operands' strides, to be copied once more by the flattening
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h)).unflatten(0, (b, -1))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w)).unflatten(0, (b, -1))
            rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
            rows = max(1, self.MASK_BYTES // (q.element_size() * b * self.num_heads * w * h * w))
            blocks = []
            for r in range(0, h, rows):
                # (B, heads, rows, W, H, W) -> (B, heads, rows * W, H * W): query cell (row, col), key cell
                mask = rel_h[:, :, r : r + rows, :, :, None] + rel_w[:, :, r : r + rows, :, None, :]
                queries = q[:, :, r * w : (r + rows) * w]
                blocks.append(
                    F.scaled_dot_product_attention(queries, k, v, mask.flatten(2, 3).flatten(3), scale=self.scale)
                )
            out = torch.cat(blocks, dim=2)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def build_sam_image_encoder(cfg: SamEncoderConfig, image_size: int) -> ImageEncoderViT:
    """SAM's `ImageEncoderViT` with the arguments `segment_anything.build_sam` uses, at `image_size`, its
    attention computed by `RelPosAttention`."""
    vit = ImageEncoderViT(
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
        window_size=cfg.window_size,
        out_chans=cfg.out_chans,
    )
    for block in vit.blocks:
        block.attn.__class__ = RelPosAttention  # the same module and parameters; building anew would draw new ones
    return vit


def build_eva_encoder(cfg: EvaEncoderConfig, image_size: int) -> nn.Module:
    """A timm EVA02 trunk without classifier head, at `image_size`."""
    kwargs = {"img_size": image_size, **cfg.overrides, "num_classes": 0}
    if "ref_feat_shape" in kwargs:
        kwargs["ref_feat_shape"] = tuple(kwargs["ref_feat_shape"])
    return timm.create_model(cfg.model_name, pretrained=False, **kwargs)


class ImageEncoder(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> fused features (B, C_sam + C_eva, h, w) and SAM features (B, C_sam, h', w')."""

    def __init__(self, sam_cfg: SamEncoderConfig, eva_cfg: EvaEncoderConfig, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.sam = build_sam_image_encoder(sam_cfg, image_size)
        self.eva = build_eva_encoder(eva_cfg, image_size)
        self.eva_final_norm = eva_cfg.final_norm
        self.sam_grid = image_size // sam_cfg.patch_size
        self.eva_grid = tuple(self.eva.patch_embed.grid_size)
        self.grid = (max(self.sam_grid, self.eva_grid[0]), max(self.sam_grid, self.eva_grid[1]))
        self.out_dim = sam_cfg.out_chans + self.eva.embed_dim
        for name, mean, std in (
            ("sam", SAM_PIXEL_MEAN, SAM_PIXEL_STD),
            ("eva", EVA_PIXEL_MEAN, EVA_PIXEL_STD),
        ):
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def encode_sam(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> SAM neck features (B, C_sam, S/p, S/p)."""
        return self.sam((images - self.sam_mean) / self.sam_std)

    def encode_eva(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> EVA patch features (B, C_eva, h, w), prefix tokens dropped."""
        tokens = self.eva.forward_features((images - self.eva_mean) / self.eva_std)
        if self.eva_final_norm:  # `fc_norm` is the final norm of an avg-pooled EVA02, an Identity otherwise
            tokens = self.eva.fc_norm(tokens)
        tokens = tokens[:, self.eva.num_prefix_tokens :]
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.eva_grid)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sam_feats = self.encode_sam(images)
        eva_feats = self.encode_eva(images)
        fused = torch.cat([_resize(sam_feats, self.grid), _resize(eva_feats, self.grid)], dim=1)
        return fused, sam_feats


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
