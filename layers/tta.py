"""Horizontal-flip test-time augmentation for the single-stage detector, merged before NMS.

The flipped image's predictions are turned into predictions for extra anchors of the original image:
an anchor ``(x1, y1, x2, y2)`` of the flipped image is the anchor ``(W - x2, y1, W - x1, y2)`` of the
original, and its centre delta ``dx`` changes sign (the coding is relative to the anchor's centre and
size, so sizes and ``dy`` are unchanged). The post-processor then sees, per level, the original
anchors followed by the mirrored ones, and its per-level top-k and NMS merge both passes exactly as
one pass over twice the anchors: no second NMS and no box voting.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn


def _interleave_levels(a: Tensor, b: Tensor, num_anchors_per_level: List[int]) -> Tensor:
    """Per level, ``a``'s anchors then ``b``'s: (..., A, C) x 2 -> (..., 2A, C) along dim -2."""
    parts = []
    for a_l, b_l in zip(a.split(num_anchors_per_level, dim=-2), b.split(num_anchors_per_level, dim=-2)):
        parts += [a_l, b_l]
    return torch.cat(parts, dim=-2)


def merge_flip_outputs(outputs: Dict, flipped_outputs: Dict, image_width: int) -> Dict:
    """Merge the model outputs for images and their horizontal flips into one set of anchors.

    Args:
        outputs, flipped_outputs: FPNDetector outputs for images (Tensor[N, 3, H, W]) and for
            ``images.flip(-1)``: pred_logits (Tensor[N, A, C]), pred_box_deltas (Tensor[N, A, 4], the
            (dx, dy, dw, dh) coding of layers/box_coder.py), anchors (Tensor[A, 4], xyxy input px),
            num_anchors_per_level (list of int).
        image_width: W of the (padded) input tensor the flip was taken over.

    Returns:
        the same keys with 2A anchors: per level, the original anchors then the mirrored ones;
        ``num_anchors_per_level`` doubled. Other keys of ``outputs`` are kept as they are.
    """
    per_level = list(outputs.get("num_anchors_per_level") or [outputs["anchors"].shape[0]])
    anchors = outputs["anchors"]
    mirrored_anchors = torch.stack(
        [image_width - anchors[:, 2], anchors[:, 1], image_width - anchors[:, 0], anchors[:, 3]], dim=1
    )
    sign = torch.tensor([-1.0, 1.0, 1.0, 1.0], device=anchors.device)
    flipped_deltas = flipped_outputs["pred_box_deltas"] * sign.to(flipped_outputs["pred_box_deltas"].dtype)
    return {
        **outputs,
        "pred_logits": _interleave_levels(outputs["pred_logits"], flipped_outputs["pred_logits"], per_level),
        "pred_box_deltas": _interleave_levels(outputs["pred_box_deltas"], flipped_deltas, per_level),
        "anchors": _interleave_levels(anchors, mirrored_anchors, per_level),
        "num_anchors_per_level": [2 * n for n in per_level],
    }


def flip_tta_forward(model: nn.Module, images: Tensor) -> Dict:
    """Run ``model`` on images (Tensor[N, 3, H, W]) and their horizontal flips; merged outputs.

    In a padded batch (``--resize_mode keep_aspect``) the flip is over the padded width, so the
    flipped pass sees its padding on the left; boxes are mapped back exactly all the same.
    """
    outputs = model(images)
    flipped = model(images.flip(-1))
    return merge_flip_outputs(outputs, flipped, images.shape[-1])


class FlipTTA(nn.Module):
    """Wraps a single-stage detector so that ``forward(images)`` returns flip-merged outputs.

    Use it in place of the model for inference (evaluate.py ``--tta flip``); the post-processor needs
    no change. Feature extraction (``return_features``) is passed through without the flip.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, targets: List[Dict] | None = None, return_features: bool = False):
        if return_features:
            return self.model(images, targets, return_features=True)
        return flip_tta_forward(self.model, images)
