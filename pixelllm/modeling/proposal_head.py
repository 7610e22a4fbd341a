"""Proposal head for dense captioning: object boxes from the fused image features (CenterNet-style).

Every cell of the feature grid predicts an objectness logit (is an object's center here?) and the distances
from the cell's center to the object's four edges. Peaks of the objectness map are the proposals; each is
then captioned as a region (`"an object of "` prompt), as the paper does after its detection head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..config import MAX_PROPOSALS, PROPOSAL_NMS_IOU, PROPOSAL_SCORE_THRESHOLD, ProposalHeadConfig
from .point_head import Float32Module

PRIOR = 0.01  # initial objectness, as in focal-loss detectors


class ProposalHead(Float32Module):
    def __init__(self, cfg: ProposalHeadConfig, in_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trunk = nn.Sequential(
            nn.Conv2d(in_dim, cfg.hidden_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(cfg.hidden_dim, cfg.hidden_dim, 3, padding=1),
            nn.GELU(),
        )
        self.objectness = nn.Conv2d(cfg.hidden_dim, 1, 1)
        self.edges = nn.Conv2d(cfg.hidden_dim, 4, 1)
        nn.init.constant_(self.objectness.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused features (B, C, h, w), any float dtype -> objectness logits (B, h, w) and edge distances (B, 4, h, w),
        float32.

        Distances (left, top, right, bottom) from each cell's center are fractions of the model input side.
        """
        with torch.autocast(fused.device.type, enabled=False):  # float32 under a caller's autocast too
            x = self.trunk(fused.float())
            return self.objectness(x)[:, 0], F.softplus(self.edges(x))

    def loss(self, fused: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Focal loss on Gaussian center heatmaps + L1 and GIoU on the boxes at object centers.

        boxes: per image (N_i, 4) x0, y0, x1, y1 in [0, 1] of the model input square.
        """
        logits, edges = self(fused)
        b, h, w = logits.shape
        heat = torch.zeros_like(logits)
        box_loss = logits.new_zeros(())
        num_objects = 0
        centers = _cell_centers(h, w, logits.device)  # (h, w, 2) in [0, 1]
        for i, obj in enumerate(boxes):
            if len(obj) == 0:
                continue
            obj = obj.to(logits)
            cx, cy = (obj[:, 0] + obj[:, 2]) / 2, (obj[:, 1] + obj[:, 3]) / 2
            col = (cx * w).long().clamp(0, w - 1)
            row = (cy * h).long().clamp(0, h - 1)
            sigma = ((obj[:, 2] - obj[:, 0]) * w + (obj[:, 3] - obj[:, 1]) * h).clamp(min=1) / 12
            gx = torch.arange(w, device=logits.device).view(1, 1, w) - col.view(-1, 1, 1)
            gy = torch.arange(h, device=logits.device).view(1, h, 1) - row.view(-1, 1, 1)
            gauss = torch.exp(-(gx**2 + gy**2) / (2 * sigma.view(-1, 1, 1) ** 2))
            heat[i] = gauss.amax(0)
            center = centers[row, col]
            pred = _to_boxes(center, edges[i, :, row, col].T)
            box_loss = (
                box_loss + (pred - obj).abs().sum() + (1 - torchvision.ops.generalized_box_iou(pred, obj).diag()).sum()
            )
            num_objects += len(obj)
        heat = heat.detach()
        prob = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
        positive = heat == 1
        pos_loss = -(torch.log(prob) * (1 - prob) ** 2)[positive].sum()
        neg_loss = -(torch.log(1 - prob) * prob**2 * (1 - heat) ** 4)[~positive].sum()
        n = max(num_objects, 1)
        return (pos_loss + neg_loss) / n + self.cfg.box_weight * box_loss / n

    @torch.no_grad()
    def propose(
        self,
        fused: torch.Tensor,
        score_threshold: float = PROPOSAL_SCORE_THRESHOLD,
        nms_iou: float = PROPOSAL_NMS_IOU,
        max_proposals: int = MAX_PROPOSALS,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fused features (B, C, h, w) -> per image (boxes (N, 4) in [0, 1], scores (N,)), best first."""
        logits, edges = self(fused)
        b, h, w = logits.shape
        prob = torch.sigmoid(logits.float())
        peaks = prob == F.max_pool2d(prob[:, None], 3, stride=1, padding=1)[:, 0]
        centers = _cell_centers(h, w, logits.device).view(-1, 2)
        out = []
        for i in range(b):
            keep = (peaks[i] & (prob[i] >= score_threshold)).flatten()
            scores = prob[i].flatten()[keep]
            boxes = _to_boxes(centers[keep], edges[i].flatten(1).T[keep].float()).clamp(0, 1)
            kept = torchvision.ops.nms(boxes, scores, nms_iou)[:max_proposals]
            out.append((boxes[kept], scores[kept]))
        return out


def _cell_centers(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w, 2) x, y of each cell's center in [0, 1]."""
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def _to_boxes(centers: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Centers (N, 2) and distances (N, 4) left, top, right, bottom -> boxes (N, 4) x0, y0, x1, y1."""
    return torch.cat([centers - edges[:, :2], centers + edges[:, 2:]], dim=1)
