"""Training targets and loss terms of the two-stage detector (``models/faster_rcnn.py``).

torchvision's RegionProposalNetwork and RoIHeads sample anchors and RoIs against the targets inside the
forward pass, so they compute the four losses there. What is ours: ``convert_targets`` turns our
targets into torchvision's (labels shifted for its background 0, and without the ignore-label,
difficult and crowd boxes it has no way to ignore, counted), and ``FasterRCNNCriterion`` names and
weights the terms the model returns, as ``layers/losses.py``'s criteria do for the single-stage model.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn


def convert_targets(targets: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Tensor]], Dict[str, int]]:
    """Our training targets -> torchvision's, without the boxes torchvision cannot ignore.

    Args:
        targets: per image boxes (Tensor[G, 4], xyxy input px), labels (Tensor[G] int64, 0..K-1 or -1),
            optional difficult / iscrowd (Tensor[G] bool).

    Returns:
        (list of {"boxes": Tensor[G', 4] float32, "labels": Tensor[G'] int64 in 1..K}, counts) where
        counts = {"dropped": boxes removed, "ignore_label": label -1, "difficult": ..., "crowd": ...}
        (a box can have several reasons; "dropped" counts it once). Raises ValueError naming the image
        when a kept box has zero or negative width or height (its regression target would be infinite).
    """
    converted: List[Dict[str, Tensor]] = []
    counts = {"dropped": 0, "ignore_label": 0, "difficult": 0, "crowd": 0}
    for target in targets:
        boxes, labels = target["boxes"], target["labels"]
        ignore_label = labels < 0
        difficult = target.get("difficult", torch.zeros_like(ignore_label)).bool()
        crowd = target.get("iscrowd", torch.zeros_like(ignore_label)).bool()
        drop = ignore_label | difficult | crowd
        keep = ~drop
        kept_boxes = boxes[keep].float()
        degenerate = (kept_boxes[:, 2:] <= kept_boxes[:, :2]).any(dim=1)
        if degenerate.any():
            raise ValueError(
                f"image {target.get('image_id', '?')} ({target.get('file_name', '?')}): degenerate "
                f"training boxes (x2 <= x1 or y2 <= y1): {kept_boxes[degenerate][:3].tolist()}"
            )
        # torchvision reserves label 0 for background.
        converted.append({"boxes": kept_boxes, "labels": labels[keep].long() + 1})
        for name, mask in (
            ("dropped", drop),
            ("ignore_label", ignore_label),
            ("difficult", difficult),
            ("crowd", crowd),
        ):
            counts[name] += int(mask.sum())
    return converted, counts


class FasterRCNNCriterion(nn.Module):
    """The four loss terms of the model's training output, optionally weighted.

    torchvision's RPN and RoIHeads sample anchors and RoIs against the targets inside the forward pass,
    so the losses are computed there; this module only names and weights them.
    ``forward(outputs, targets) -> {loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg}``.
    """

    LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")

    def __init__(self, weights: Dict[str, float] | None = None):
        super().__init__()
        weights = dict(weights or {})
        unknown = set(weights) - set(self.LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; expected some of {self.LOSS_NAMES}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.LOSS_NAMES}

    def forward(self, outputs: Dict[str, Any], targets: List[Dict[str, Any]]) -> Dict[str, Tensor]:
        losses = outputs.get("losses")
        if losses is None:
            raise ValueError("outputs hold no losses: call the model in training mode, with targets")
        return {name: losses[name] * self.weights[name] for name in self.LOSS_NAMES}
