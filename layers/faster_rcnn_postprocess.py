"""Detections of the two-stage detector (``models/faster_rcnn.py``) from its RoI head outputs.

The single-stage model's post-processor is ``layers/postprocess.py``; this one replaces torchvision's
``RoIHeads.postprocess_detections`` with a version batched over images that keeps each detection's RoI
(for the feature rows of extract_features.py) and maps boxes back to original pixels.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms

from utils.box_ops import clip_xyxy

# The RoI head's box coding weights (the original's target stds 0.1, 0.1, 0.2, 0.2).
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MIN_BOX_SIZE = 1e-2  # torchvision's RoIHeads: detections narrower than this (input px) are dropped


class FasterRCNNPostProcess(nn.Module):
    """Per-image detections from the RoI head outputs of a whole batch, in original image pixels.

    The steps of torchvision's ``RoIHeads.postprocess_detections``, batched over images: decode the
    class-specific boxes, softmax scores, clip to each image's valid size (target["size"]), drop the
    background column, keep (RoI, class) pairs with score > ``score_thresh`` and both sides >= 0.01 px,
    NMS per image and class (per image with ``class_agnostic``) in one ``batched_nms`` call, keep the
    ``detections_per_img`` best per image. Then map to original pixels (divide by target["scale"],
    clip to target["orig_size"]).

    Args:
        score_thresh, nms_thresh, detections_per_img, class_agnostic: as named.
        box_coder_weights: must be the RoI head's (torchvision's (10, 10, 5, 5)).

    Inputs (forward): outputs of ``FasterRCNNFPN`` in evaluation mode; targets per image: size (Tensor[2],
    h, w valid), scale (Tensor[2], sx, sy; 1 if absent), orig_size (Tensor[2], h, w; size / scale if
    absent).

    Returns: per image {boxes (Tensor[D, 4] float32 xyxy original px), scores (Tensor[D]), labels
    (Tensor[D] int64, 0..K-1), roi_idxs (Tensor[D] int64, index of the detection's RoI in the image's
    proposals)} sorted by decreasing score, plus roi_features (Tensor[D, 1 + 4 + K + 1 + F], see
    ``models/faster_rcnn.py``'s module docstring) when the outputs hold "box_features".
    """

    def __init__(
        self,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        class_agnostic: bool = False,
        box_coder_weights: Tuple[float, float, float, float] = BOX_CODER_WEIGHTS,
    ):
        super().__init__()
        if detections_per_img < 1:
            raise ValueError(f"detections_per_img must be >= 1, got {detections_per_img}")
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.class_agnostic = class_agnostic
        self.box_coder = det_utils.BoxCoder(box_coder_weights)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Any], targets: List[Dict[str, Any]]) -> List[Dict[str, Tensor]]:
        proposals: List[Tensor] = outputs["proposals"]
        num_images = len(proposals)
        if len(targets) != num_images:
            raise ValueError(f"{num_images} images in the outputs but {len(targets)} targets")
        class_logits = outputs["class_logits"].float()
        device = class_logits.device
        num_rois, num_columns = class_logits.shape
        num_classes = num_columns - 1
        num_rois_per_image = torch.tensor([len(p) for p in proposals], device=device)
        image_idxs = torch.repeat_interleave(torch.arange(num_images, device=device), num_rois_per_image)
        first_roi = torch.cumsum(num_rois_per_image, 0) - num_rois_per_image
        rois = torch.cat(proposals).float() if num_rois else class_logits.new_zeros(0, 4)

        sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device).float()  # [N, 2] h, w
        probs = F.softmax(class_logits, -1)  # [R, K+1]
        pred_boxes = self.box_coder.decode_single(outputs["box_regression"].float(), rois)
        pred_boxes = clip_xyxy(pred_boxes.reshape(num_rois, num_columns, 4), sizes[image_idxs][:, None, :])

        # Every (RoI, foreground class) pair is a candidate: [R, K] flattened RoI-major.
        scores = probs[:, 1:].reshape(-1)
        boxes = pred_boxes[:, 1:].reshape(-1, 4)
        labels = torch.arange(num_classes, device=device).repeat(num_rois)
        roi_idxs = torch.arange(num_rois, device=device).repeat_interleave(num_classes)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = torch.where(
            (scores > self.score_thresh) & (widths >= MIN_BOX_SIZE) & (heights >= MIN_BOX_SIZE)
        )[0]
        cand_images = image_idxs[roi_idxs[keep]]
        groups = cand_images if self.class_agnostic else cand_images * num_classes + labels[keep]
        kept = batched_nms(boxes[keep], scores[keep], groups, self.nms_thresh)  # decreasing score
        keep = keep[kept]

        # The best detections_per_img of each image: a stable sort by image keeps the score order.
        cand_images = image_idxs[roi_idxs[keep]]
        order = torch.sort(cand_images, stable=True).indices
        keep, cand_images = keep[order], cand_images[order]
        counts = torch.bincount(cand_images, minlength=num_images)
        rank = torch.arange(len(keep), device=device) - (torch.cumsum(counts, 0) - counts)[cand_images]
        in_top = rank < self.detections_per_img
        keep, cand_images = keep[in_top], cand_images[in_top]
        counts = counts.clamp(max=self.detections_per_img)

        scales, orig_sizes = _scales_and_orig_sizes(targets, sizes)
        scales, orig_sizes = scales.to(device), orig_sizes.to(device)
        det_boxes = clip_xyxy(boxes[keep] / scales[cand_images].repeat(1, 2), orig_sizes[cand_images])
        det_rois = roi_idxs[keep]
        columns = {
            "boxes": det_boxes,
            "scores": scores[keep],
            "labels": labels[keep],
            "roi_idxs": det_rois - first_roi[cand_images],
        }
        if "box_features" in outputs:
            orig_wh = orig_sizes[cand_images].flip(-1)
            normalised = det_boxes / torch.cat([orig_wh, orig_wh], dim=1)
            det_probs = probs[det_rois]
            columns["roi_features"] = torch.cat(
                [1 - det_probs[:, :1], normalised, det_probs, outputs["box_features"][det_rois].float()],
                dim=1,
            )
        split = counts.tolist()
        per_column = {name: value.split(split) for name, value in columns.items()}
        return [{name: per_column[name][i] for name in columns} for i in range(num_images)]


def _scales_and_orig_sizes(targets: List[Dict[str, Any]], sizes: Tensor) -> Tuple[Tensor, Tensor]:
    """(Tensor[N, 2] sx, sy; Tensor[N, 2] original h, w) with the defaults of the docstring."""
    scales = torch.stack(
        [
            torch.as_tensor(t["scale"], dtype=torch.float32).cpu() if "scale" in t else torch.ones(2)
            for t in targets
        ]
    )
    orig_sizes = torch.stack(
        [
            torch.as_tensor(t["orig_size"]).float().cpu()
            if "orig_size" in t
            else sizes[i].cpu() / scales[i].flip(0)  # (h / sy, w / sx)
            for i, t in enumerate(targets)
        ]
    )
    return scales, orig_sizes
