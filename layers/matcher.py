"""Anchor-to-ground-truth matching for the whole batch at once.

Ground truth is padded to [N, G_max] (``pad_targets``) so that one set of tensor operations labels the
anchors of every image (``match_anchors``). Result per anchor: the index of its gt box (>= 0), or
``BACKGROUND`` (-1), or ``IGNORE`` (-2: neither positive nor negative in the loss).
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from utils.box_ops import box_iou_xyxy_batched

BACKGROUND = -1
IGNORE = -2
# How each gt box claims its best anchor(s) (rule 2 of match_anchors).
BEST_ANCHOR_MATCHES = ("ties", "one")


def pad_targets(targets: List[Dict], device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack the per-image gt of a batch into padded tensors.

    Args:
        targets: per image a dict with boxes (Tensor[G_i, 4], xyxy input px), labels (Tensor[G_i], -1 for
            boxes of classes outside the training subset), optional difficult / iscrowd (Tensor[G_i] bool).

    Returns:
        gt_boxes (Tensor[N, G, 4] float32, xyxy; zeros in padding), gt_labels (Tensor[N, G] int64, -1 in
        padding), gt_valid (Tensor[N, G] bool: a real box), gt_ignore (Tensor[N, G] bool: a real box that is
        difficult, crowd or has label < 0; it may only make anchors IGNORE). G = max G_i (0 if no boxes).
    """
    num_images = len(targets)
    counts = [int(t["boxes"].shape[0]) for t in targets]
    g_max = max(counts, default=0)
    gt_boxes = torch.zeros(num_images, g_max, 4, dtype=torch.float32, device=device)
    gt_labels = torch.full((num_images, g_max), -1, dtype=torch.int64, device=device)
    gt_valid = torch.zeros(num_images, g_max, dtype=torch.bool, device=device)
    gt_ignore = torch.zeros(num_images, g_max, dtype=torch.bool, device=device)
    if g_max == 0:
        return gt_boxes, gt_labels, gt_valid, gt_ignore
    # One copy per field instead of one per image: concatenate, then scatter into the padded layout.
    image_idx = torch.cat([torch.full((c,), i, dtype=torch.int64) for i, c in enumerate(counts)]).to(device)
    slot_idx = torch.cat([torch.arange(c) for c in counts]).to(device)

    def cat(key: str, dtype: torch.dtype) -> Tensor:
        values = []
        for i, (t, c) in enumerate(zip(targets, counts)):
            v = torch.as_tensor(t[key]).reshape(-1) if key in t else torch.zeros(c, dtype=dtype)
            if v.shape[0] != c:
                raise ValueError(f"target {i} ({t.get('file_name', '?')}): {v.shape[0]} {key} for {c} boxes")
            values.append(v.to(device=device, dtype=dtype))
        return torch.cat(values)

    gt_boxes[image_idx, slot_idx] = torch.cat(
        [torch.as_tensor(t["boxes"]).to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets]
    )
    labels = cat("labels", torch.int64)
    gt_labels[image_idx, slot_idx] = labels
    gt_valid[image_idx, slot_idx] = True
    gt_ignore[image_idx, slot_idx] = cat("difficult", torch.bool) | cat("iscrowd", torch.bool) | (labels < 0)
    return gt_boxes, gt_labels, gt_valid, gt_ignore


@torch.no_grad()
def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    gt_ignore: Tensor,
    positive_threshold: float,
    negative_threshold: float,
    allow_low_quality: bool = True,
    best_anchor_match: str = "ties",
) -> Tensor:
    """Label every anchor of every image as matched gt index, BACKGROUND or IGNORE.

    Args:
        anchors (Tensor[A, 4]): xyxy input pixels.
        gt_boxes (Tensor[N, G, 4]), gt_valid (Tensor[N, G] bool), gt_ignore (Tensor[N, G] bool): from
            ``pad_targets``. Padded (invalid) slots never match anything.
        positive_threshold, negative_threshold: IoU thresholds, negative <= positive.
        allow_low_quality: also make each usable gt's best anchor(s) positive (SSD), see below.
        best_anchor_match: "ties" (rule 2 as below) or "one": each usable gt with best IoU > 0 claims only
            its first best anchor (lowest index), and when several gts claim one anchor the gt of highest
            index wins, whatever the IoUs: the original codebase's (and ssd.pytorch's) ``match``, whose
            loop over gts lets a later gt overwrite an earlier one's claim.

    Returns:
        matched_idxs (Tensor[N, A] int64): >= 0 index into G of the matched gt, -1 BACKGROUND, -2 IGNORE.

    Rules (a "usable" gt is valid and not ignore; only usable gts make positives):
      1. IoU >= positive_threshold with a usable gt -> positive, matched to the usable gt of highest IoU.
      2. allow_low_quality: every usable gt with best IoU > 0 claims all anchors reaching that best IoU
         (ties included). The claim overrides rule 1 (as in SSD, so that a gt whose best anchor prefers
         another gt still gets an anchor); when several gts claim one anchor, the gt with the higher IoU
         with that anchor wins (first gt on exact ties). A gt with no overlap at all claims nothing
         (otherwise every anchor would tie at IoU 0).
      3. Not positive and max IoU over usable gts in [negative_threshold, positive_threshold) -> IGNORE.
      4. Not positive and IoU >= negative_threshold with any ignore gt -> IGNORE.
      5. Everything else (including every anchor of an image without gt) -> BACKGROUND.
    """
    if negative_threshold > positive_threshold:
        raise ValueError(f"negative_threshold {negative_threshold} > positive_threshold {positive_threshold}")
    if best_anchor_match not in BEST_ANCHOR_MATCHES:
        raise ValueError(f"best_anchor_match must be one of {BEST_ANCHOR_MATCHES}, got {best_anchor_match!r}")
    num_images, num_gt = gt_valid.shape
    num_anchors = anchors.shape[0]
    matched_idxs = torch.full((num_images, num_anchors), BACKGROUND, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched_idxs

    usable = gt_valid & ~gt_ignore  # [N, G]
    ignore = gt_valid & gt_ignore
    iou = box_iou_xyxy_batched(gt_boxes, anchors)  # [N, G, A]; N * G * A floats, the largest tensor here
    # Max IoU with ignore regions first, then reuse the IoU buffer in place for the usable gts.
    # Most batches have no ignore box: skip an [N, G, A] pass then (a host sync, cheap next to the IoU).
    max_iou_ignore = iou.masked_fill(~ignore[:, :, None], -1.0).amax(dim=1) if bool(ignore.any()) else None
    iou.masked_fill_(~usable[:, :, None], -1.0)
    max_iou, best_gt = iou.max(dim=1)  # [N, A]

    positive = max_iou >= positive_threshold
    matched_idxs = torch.where(positive, best_gt, matched_idxs)

    if allow_low_quality and best_anchor_match == "one":
        best_iou_per_gt, best_anchor = iou.max(dim=2)  # [N, G]: the first best anchor of each gt
        gt_idxs = torch.arange(num_gt, device=iou.device).expand(num_images, num_gt)
        claimer_idxs = torch.where(best_iou_per_gt > 0, gt_idxs, -1)  # [N, G]; -1: claims nothing
        claim_gt = torch.full_like(matched_idxs, -1).scatter_reduce_(1, best_anchor, claimer_idxs, "amax")
        claimed = claim_gt >= 0  # [N, A]; the highest claiming gt index won
        matched_idxs = torch.where(claimed, claim_gt, matched_idxs)
        positive |= claimed
    elif allow_low_quality:
        best_iou_per_gt = iou.amax(dim=2, keepdim=True)  # [N, G, 1]; -1 for unusable slots
        claims = (iou == best_iou_per_gt).logical_and_(best_iou_per_gt > 0)  # [N, G, A]
        claim_iou, claim_gt = iou.masked_fill_(claims.logical_not_(), -1.0).max(dim=1)  # [N, A]
        claimed = claim_iou > 0
        matched_idxs = torch.where(claimed, claim_gt, matched_idxs)
        positive |= claimed

    ignored = (max_iou >= negative_threshold) & (max_iou < positive_threshold)
    if max_iou_ignore is not None:
        ignored |= max_iou_ignore >= negative_threshold
    ignored &= ~positive
    return matched_idxs.masked_fill_(ignored, IGNORE)
