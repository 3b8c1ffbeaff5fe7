"""Adaptive Training Sample Selection (ATSS; Zhang et al., CVPR 2020), for the whole batch at once.

IoU thresholds fixed for all boxes suit large objects and starve small ones: on a stride-8 grid a
12-px box's nearest anchor may overlap it by IoU 0.3, so a fixed 0.5 leaves it one forced positive
(the best-anchor rule) surrounded by negatives that overlap it almost as well, and OHEM then mines
exactly those as hard negatives. ATSS picks each box's positives from its own IoU statistics:

  1. candidates: on every level, the ``topk`` anchors whose centres are nearest the box centre;
  2. threshold: mean + standard deviation (unbiased, as the paper's code) of the candidates' IoUs;
  3. positives: candidates with IoU >= that threshold whose centre lies inside the box;
  4. an anchor chosen by several boxes goes to the box it overlaps most.

Two additions keep the rules of ``layers.matcher.match_anchors`` where ATSS is silent: a usable box
that gets no positive (possible when most candidates overlap it equally well) claims its best
candidate, so no box is left without a training signal; and anchors that are not positive but overlap
an ignore box (difficult, crowd, or outside the class subset) by IoU >= ``ignore_threshold`` are
IGNORE. Everything else is BACKGROUND: ATSS has no ignore band.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from layers.matcher import BACKGROUND, IGNORE
from utils.box_ops import box_iou_xyxy_batched


def atss_match(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    gt_ignore: Tensor,
    topk: int = 9,
    ignore_threshold: float = 0.5,
) -> Tensor:
    """Label every anchor of every image as matched gt index, BACKGROUND or IGNORE.

    Args:
        anchors (Tensor[A, 4]): xyxy input pixels, level after level (P3 first).
        num_anchors_per_level: A_l per level, summing to A.
        gt_boxes (Tensor[N, G, 4]), gt_valid (Tensor[N, G] bool), gt_ignore (Tensor[N, G] bool): from
            ``layers.matcher.pad_targets``.
        topk: candidates per level and box (fewer on a level with fewer anchors).
        ignore_threshold: IoU with an ignore box that makes a non-positive anchor IGNORE.

    Returns:
        matched_idxs (Tensor[N, A] int64): >= 0 index into G of the matched gt, -1 BACKGROUND, -2 IGNORE.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    num_images, num_gt = gt_valid.shape
    num_anchors = anchors.shape[0]
    if sum(num_anchors_per_level) != num_anchors:
        raise ValueError(f"num_anchors_per_level {list(num_anchors_per_level)} does not sum to {num_anchors}")
    matched_idxs = torch.full((num_images, num_anchors), BACKGROUND, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched_idxs

    usable = gt_valid & ~gt_ignore  # [N, G]
    iou = box_iou_xyxy_batched(gt_boxes, anchors)  # [N, G, A]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    gt_centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [N, G, 2]
    # Squared distance orders like the distance; [N, G, A], one pass per level below.
    dist = (gt_centres[:, :, None, :] - anchor_centres[None, None]).square_().sum(dim=-1)

    candidates = []  # per level Tensor[N, G, k_l] of anchor indices
    start = 0
    for count in num_anchors_per_level:  # a handful of levels, not a loop over anchors
        k = min(topk, count)
        if k > 0:
            # A stable sort, not topk: boxes centred between grid cells tie in distance, and the
            # candidates (hence the threshold) must not depend on how topk happens to break ties.
            order = dist[:, :, start : start + count].argsort(dim=2, stable=True)
            candidates.append(order[:, :, :k] + start)
        start += count
    cand_idx = torch.cat(candidates, dim=2)  # [N, G, K]
    cand_iou = iou.gather(2, cand_idx)  # [N, G, K]
    std = cand_iou.std(dim=2, keepdim=True) if cand_idx.shape[2] > 1 else torch.zeros_like(cand_iou[..., :1])
    threshold = cand_iou.mean(dim=2, keepdim=True) + std  # [N, G, 1]

    cand_centres = anchor_centres[cand_idx]  # [N, G, K, 2]
    inside = ((cand_centres > gt_boxes[:, :, None, :2]) & (cand_centres < gt_boxes[:, :, None, 2:])).all(
        dim=-1
    )  # [N, G, K]
    chosen = (cand_iou >= threshold) & inside & (cand_iou > 0) & usable[:, :, None]
    # A usable box with no chosen candidate claims its best-overlapping one.
    best_cand = cand_iou.argmax(dim=2, keepdim=True)  # [N, G, 1]
    orphan = usable & ~chosen.any(dim=2) & (cand_iou.gather(2, best_cand)[..., 0] > 0)  # [N, G]
    chosen.scatter_(2, best_cand, orphan[:, :, None] | chosen.gather(2, best_cand))

    positive_pairs = torch.zeros_like(iou, dtype=torch.bool).scatter_(2, cand_idx, chosen)  # [N, G, A]
    pair_iou = iou.masked_fill(~positive_pairs, -1.0)
    best_iou, best_gt = pair_iou.max(dim=1)  # [N, A]: the box each anchor overlaps most among its choosers
    positive = best_iou > 0  # chosen pairs overlap (IoU > 0); the rest are -1
    matched_idxs = torch.where(positive, best_gt, matched_idxs)

    ignore = gt_valid & gt_ignore
    if bool(ignore.any()):
        max_iou_ignore = iou.masked_fill(~ignore[:, :, None], -1.0).amax(dim=1)  # [N, A]
        matched_idxs.masked_fill_((max_iou_ignore >= ignore_threshold) & ~positive, IGNORE)
    return matched_idxs
