"""Point head: an MLP parallel to the vocabulary head, on every decoder hidden state.

Per token it predicts two points, the word box's corners (x0, y0) and (x1, y1) in [0, 1] of the model
input (the word's point is their mean), and a confidence logit that the token has a location.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PointHeadConfig


class Float32Module(nn.Module):
    """A module that stays float32 when the model is cast (`.to(torch.bfloat16)`, `.half()`; moves still apply). The
    heads that draw coordinates are: in bfloat16 a coordinate in [0.5, 1] of the input snaps to 1/512 of it (8 px of
    a 4000 px photo)."""

    def _apply(self, fn, recurse=True):
        def move_only(t: torch.Tensor) -> torch.Tensor:  # the float32 weights as they are, not rounded to the cast
            out = fn(t)
            return t.to(out.device) if out.is_floating_point() and out.dtype != t.dtype else out

        return super()._apply(move_only, recurse)


class PointHead(Float32Module):
    """Decoder states (B, T, D), any float dtype -> corners (B, T, 2, 2) in [0, 1] and confidence logits (B, T),
    float32."""

    def __init__(self, cfg: PointHeadConfig, in_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim, eps=1e-6)]
        dim = in_dim
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(dim, cfg.hidden_dim), nn.GELU()]
            dim = cfg.hidden_dim
        layers.append(nn.Linear(dim, 5))
        self.mlp = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 under a caller's autocast too
            out = self.mlp(hidden.float())
        corners = ((out[..., :4] + 1) / 2).unflatten(-1, (2, 2))
        return corners, out[..., 4]
