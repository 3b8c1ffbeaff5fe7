"""Encoding of xyxy boxes as regression targets relative to anchors (SSD/Faster R-CNN parametrisation)."""

import math
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_CLAMP_DWDH = math.log(1000.0 / 16)


def _upcast(t: Tensor) -> Tensor:
    # exp() and log() of box sizes overflow or lose precision in fp16/bf16: compute in fp32 (as torchvision).
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class BoxCoder:
    """Encode xyxy boxes as deltas against anchors, and decode deltas back to boxes.

    deltas = ((cx - cx_a) / w_a / v0, (cy - cy_a) / h_a / v0, log(w / w_a) / v1, log(h / h_a) / v1)

    Args:
        variances (v0, v1): divide the centre and size deltas (SSD's "variances"), (0.1, 0.2) by default.
        clamp_dwdh: upper bound on the decoded log size ratio, ``dw * v1`` and ``dh * v1``, so that a wild
            prediction gives at most ``anchor size * exp(clamp_dwdh)`` (1000 / 16 by default) instead of inf.

    Both directions compute in float32 (float64 stays float64) whatever the input dtype and return that
    dtype.
    """

    def __init__(self, variances: Sequence[float] = (0.1, 0.2), clamp_dwdh: float = DEFAULT_CLAMP_DWDH):
        if len(variances) != 2 or any(not v > 0 for v in variances):
            raise ValueError(f"box variances must be two positive numbers, got {list(variances)}")
        self.variances = (float(variances[0]), float(variances[1]))
        self.clamp_dwdh = float(clamp_dwdh)

    def __repr__(self) -> str:
        return f"BoxCoder(variances={self.variances}, clamp_dwdh={self.clamp_dwdh:.4f})"

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """
        Args:
            gt_boxes (Tensor[..., 4]): xyxy, absolute pixels, positive width and height.
            anchors (Tensor[..., 4]): xyxy, broadcastable against gt_boxes.

        Returns:
            deltas (Tensor[..., 4]): (dx, dy, dw, dh), float32 (float64 if an input is float64).
        """
        gt_boxes, anchors = _upcast(gt_boxes), _upcast(anchors)
        v0, v1 = self.variances
        wa = anchors[..., 2] - anchors[..., 0]
        ha = anchors[..., 3] - anchors[..., 1]
        cxa = anchors[..., 0] + 0.5 * wa
        cya = anchors[..., 1] + 0.5 * ha
        w = gt_boxes[..., 2] - gt_boxes[..., 0]
        h = gt_boxes[..., 3] - gt_boxes[..., 1]
        cx = gt_boxes[..., 0] + 0.5 * w
        cy = gt_boxes[..., 1] + 0.5 * h
        dx = (cx - cxa) / wa / v0
        dy = (cy - cya) / ha / v0
        dw = torch.log(w / wa) / v1
        dh = torch.log(h / ha) / v1
        return torch.stack([dx, dy, dw, dh], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """
        Args:
            deltas (Tensor[..., 4]): (dx, dy, dw, dh) as produced by ``encode`` (or by the box head).
            anchors (Tensor[..., 4]): xyxy, broadcastable against deltas.

        Returns:
            boxes (Tensor[..., 4]): xyxy, absolute pixels, float32 (float64 if an input is float64).
        """
        deltas, anchors = _upcast(deltas), _upcast(anchors)
        v0, v1 = self.variances
        wa = anchors[..., 2] - anchors[..., 0]
        ha = anchors[..., 3] - anchors[..., 1]
        cxa = anchors[..., 0] + 0.5 * wa
        cya = anchors[..., 1] + 0.5 * ha
        cx = deltas[..., 0] * v0 * wa + cxa
        cy = deltas[..., 1] * v0 * ha + cya
        w = torch.exp((deltas[..., 2] * v1).clamp(max=self.clamp_dwdh)) * wa
        h = torch.exp((deltas[..., 3] * v1).clamp(max=self.clamp_dwdh)) * ha
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
