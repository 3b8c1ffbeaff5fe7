"""Detections from head outputs: per-level threshold and top-k, decode, clip, NMS, back to original pixels."""

import logging
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms

from layers.box_coder import BoxCoder
from utils.box_ops import clip_xyxy

logger = logging.getLogger(__name__)


class PostProcess(nn.Module):
    """Turn pred_logits / pred_box_deltas into per-image detections, for the whole batch at once.

    Steps: per level, scores above ``conf_thresh`` (strictly), the ``pre_nms_topk`` best (anchor, class)
    pairs per image; decode those boxes and clip them to the image's valid (unpadded) size; NMS per image
    and class (or per image with ``class_agnostic``) for the whole batch at once (CUDA: one
    ``batched_nms``; CPU: ``_nms_sorted_groups``, the same result); keep the ``max_detections`` best per
    image; map to original image pixels.

    Args:
        box_coder: decodes the deltas (same variances as in training).
        score_type: "softmax" (K + 1 columns, column 0 = background, dropped) or "sigmoid" (K columns).
        conf_thresh, pre_nms_topk, nms_thresh, max_detections, class_agnostic: as named; max_detections 0
            (or None) keeps every detection.
        per_class_topk: step 1 keeps, per image and class, the ``pre_nms_topk`` best anchors above
            ``conf_thresh`` over all levels, instead of the best (anchor, class) pairs per level.
        max_per_class: after NMS keep at most this many per image and class (0: no cap).
        clip_before_nms: clip the decoded boxes before NMS (False: NMS on unclipped boxes, clip after).
        The original codebase's evaluation (``--protocol original``) is per_class_topk=True with
        pre_nms_topk 200, conf_thresh 0.001, nms_thresh 0.45, max_per_class 50 (VOC) or 20 (COCO),
        max_detections 0 and clip_before_nms=False.

    Inputs (forward):
        outputs: pred_logits (Tensor[N, A, C]), pred_box_deltas (Tensor[N, A, 4]), anchors (Tensor[A, 4],
            xyxy input px), num_anchors_per_level (list of int; one level with all anchors if absent).
        targets: per image size (Tensor[2], h, w of the valid resized image), scale (Tensor[2], sx, sy:
            input = original * scale; 1 if absent), orig_size (Tensor[2], h, w; ``size / scale`` if absent).

    Returns:
        list (per image) of dicts: boxes (Tensor[D, 4] float32, xyxy ORIGINAL image px), scores (Tensor[D]),
        labels (Tensor[D] int64, 0..K-1), anchor_idxs (Tensor[D] int64, index into the A anchors); D <=
        max_detections, sorted by decreasing score.
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        score_type: str = "softmax",
        conf_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.5,
        max_detections: int | None = 100,
        class_agnostic: bool = False,
        per_class_topk: bool = False,
        max_per_class: int = 0,
        clip_before_nms: bool = True,
    ):
        super().__init__()
        if score_type not in ("softmax", "sigmoid"):
            raise ValueError(f"score_type must be 'softmax' or 'sigmoid', got {score_type!r}")
        if pre_nms_topk < 1 or (max_detections or 0) < 0 or max_per_class < 0:
            raise ValueError(
                f"pre_nms_topk ({pre_nms_topk}) must be >= 1, max_detections ({max_detections}) and "
                f"max_per_class ({max_per_class}) >= 0"
            )
        self.box_coder = box_coder
        self.score_type = score_type
        self.conf_thresh = conf_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.class_agnostic = class_agnostic
        self.per_class_topk = per_class_topk
        self.max_per_class = max_per_class
        self.clip_before_nms = clip_before_nms

    def extra_repr(self) -> str:
        return (
            f"score_type={self.score_type}, conf_thresh={self.conf_thresh}, "
            f"pre_nms_topk={self.pre_nms_topk}, nms_thresh={self.nms_thresh}, "
            f"max_detections={self.max_detections}, class_agnostic={self.class_agnostic}, "
            f"per_class_topk={self.per_class_topk}, max_per_class={self.max_per_class}, "
            f"clip_before_nms={self.clip_before_nms}"
        )

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict]) -> List[Dict[str, Tensor]]:
        pred_logits, pred_box_deltas, anchors = (
            outputs["pred_logits"],
            outputs["pred_box_deltas"],
            outputs["anchors"],
        )
        num_images, num_anchors, num_columns = pred_logits.shape
        device = pred_logits.device
        if len(targets) != num_images:
            raise ValueError(f"{len(targets)} targets for {num_images} images")
        num_anchors_per_level = outputs.get("num_anchors_per_level") or [num_anchors]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(
                f"num_anchors_per_level sums to {sum(num_anchors_per_level)}, "
                f"pred_logits has {num_anchors} anchors"
            )
        softmax = self.score_type == "softmax"
        num_classes = num_columns - 1 if softmax else num_columns
        if num_images == 0:  # (the reshapes below cannot infer a size from 0 elements)
            return []

        # 1. Per level, the pre_nms_topk best (anchor, class) pairs above conf_thresh, per image.
        # They lie within the pre_nms_topk anchors of highest best-class score (each better anchor has a
        # pair at least as good), so only those anchors' K scores are computed: one max-reduction over
        # the level instead of scores, a mask and a top-k over all A_l * K pairs.
        cand_scores, cand_anchor_idxs, cand_labels = [], [], []
        if self.per_class_topk:  # instead: per class, the best anchors over all levels
            cand_scores, cand_anchor_idxs, cand_labels = _per_class_candidates(
                pred_logits, softmax, self.pre_nms_topk, self.conf_thresh
            )
        image_range = torch.arange(num_images, device=device)
        flat_logits = pred_logits.reshape(-1, num_columns)  # [N * A, C], a view
        start = 0
        for num_level in [] if self.per_class_topk else num_anchors_per_level:
            logits = pred_logits[:, start : start + num_level]  # [N, A_l, C]
            if softmax:
                log_norm = _logsumexp_last(logits.float())  # [N, A_l]
                best = logits[..., 1:].amax(dim=2).float() - log_norm  # log of the best class probability
            else:
                best = logits.amax(dim=2)  # sigmoid is monotonic: rank by logit
            k = min(self.pre_nms_topk, num_level)
            top_anchors = best.topk(k, dim=1).indices  # [N, k]
            # [N, k, C]: whole rows copied (index_select on rows, much faster than gather or logits[i, j])
            rows = (top_anchors + (image_range * num_anchors + start)[:, None]).flatten()
            sel = flat_logits.index_select(0, rows).view(num_images, k, -1).float()
            if softmax:
                scores = (sel[..., 1:] - log_norm.gather(1, top_anchors)[..., None]).exp()
            else:
                scores = sel.sigmoid()
            scores = scores.reshape(num_images, -1)  # [N, k * K], anchor-major
            scores = scores.masked_fill(scores <= self.conf_thresh, -1.0)
            top_scores, top_idxs = scores.topk(min(self.pre_nms_topk, scores.shape[1]), dim=1)
            cand_scores.append(top_scores)
            cand_anchor_idxs.append(top_anchors.gather(1, top_idxs // num_classes) + start)
            cand_labels.append(top_idxs % num_classes)
            start += num_level
        scores = torch.cat(cand_scores, dim=1)  # [N, M]
        keep = scores > self.conf_thresh  # -1: below threshold
        image_idxs = torch.arange(num_images, device=device)[:, None].expand_as(scores)[keep]
        scores = scores[keep]
        anchor_idxs = torch.cat(cand_anchor_idxs, dim=1)[keep]
        labels = torch.cat(cand_labels, dim=1)[keep]

        # 2. Decode and clip to the valid (unpadded) image area.
        sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device)  # [N, 2] (h, w)
        # index_select (row copies): several times faster than advanced indexing for thousands of rows
        boxes = self.box_coder.decode(
            pred_box_deltas.reshape(-1, 4).index_select(0, image_idxs * num_anchors + anchor_idxs),
            anchors.index_select(0, anchor_idxs),
        )
        if self.clip_before_nms:
            boxes = clip_xyxy(boxes, sizes[image_idxs].float())

        # 3. NMS per image and class (or per image). On CPU: one sort makes every group a contiguous
        # slice, then _nms_sorted_groups (batched_nms would scan all boxes once per group); on GPU: one
        # batched_nms.
        nms_groups = image_idxs if self.class_agnostic else image_idxs * num_classes + labels
        if device.type == "cpu":
            # Sort once by group, then score: every group is a contiguous, already sorted slice.
            order = torch.argsort(scores, descending=True, stable=True)
            order = order[torch.argsort(nms_groups[order], stable=True)]
            group_sizes = torch.unique_consecutive(nms_groups[order], return_counts=True)[1]
            keep = order[
                _nms_sorted_groups(
                    boxes.index_select(0, order), scores.index_select(0, order), group_sizes, self.nms_thresh
                )
            ]
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
        else:
            keep = batched_nms(boxes.double(), scores.double(), nms_groups, self.nms_thresh)

        if self.max_per_class:  # keep is sorted by decreasing score: the first of each group are its best
            keep = keep[_first_k_per_group(image_idxs[keep] * num_classes + labels[keep], self.max_per_class)]

        # 4. The max_detections best per image: stable sort by image keeps the score order within each.
        keep = keep[torch.sort(image_idxs[keep], stable=True).indices]
        kept_image_idxs = image_idxs[keep]
        counts = torch.bincount(kept_image_idxs, minlength=num_images)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=device) - first[kept_image_idxs]
        if self.max_detections:
            keep = keep[rank < self.max_detections]
            counts = counts.clamp(max=self.max_detections)

        # 5. Back to original image pixels.
        scales, orig_sizes = _scales_and_orig_sizes(targets, sizes)
        image_idxs = image_idxs[keep]
        boxes = boxes[keep] / scales.to(device)[image_idxs].repeat(1, 2)
        boxes = clip_xyxy(boxes, orig_sizes.to(device)[image_idxs].float())
        split = counts.tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab, "anchor_idxs": a}
            for b, s, lab, a in zip(
                boxes.split(split),
                scores[keep].split(split),
                labels[keep].split(split),
                anchor_idxs[keep].split(split),
            )
        ]


# CPU row chunks of the softmax normaliser: [rows, C] temporaries of about 1 MB, served from the
# allocator's free memory (a level-wide temporary would be fresh pages, whose first touch costs more
# than the arithmetic on CPU).
_LOGSUMEXP_ROWS = 4096
# _nms_sorted_groups resolves groups of up to this many boxes with vectorised pairwise IoUs (at most
# 128 * 127 / 2 pairs per group) and calls torchvision's nms for larger ones.
_NMS_VECTOR_MAX = 128
_NMS_PAIRS_PER_CHUNK = 1 << 15


def _logsumexp_last(x: Tensor) -> Tensor:
    """torch.logsumexp(x, dim=2) for x (Tensor[N, R, C]), by chunks of rows on CPU (the same values: each
    row is reduced on its own). Returns Tensor[N, R]."""
    if x.device.type != "cpu":
        return torch.logsumexp(x, dim=2)
    out = x.new_empty(x.shape[:2])
    for i in range(x.shape[0]):
        for begin in range(0, x.shape[1], _LOGSUMEXP_ROWS):
            rows = slice(begin, begin + _LOGSUMEXP_ROWS)
            torch.logsumexp(x[i, rows], dim=1, out=out[i, rows])
    return out


def _nms_sorted_groups(boxes: Tensor, scores: Tensor, group_sizes: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's nms within each group, on CPU, for boxes already sorted by group then score.

    Args:
        boxes (Tensor[M, 4] float, xyxy), scores (Tensor[M]): group after group, each group by decreasing
            score (ties in a stable order, which is the order torchvision's CPU nms keeps them in).
        group_sizes (Tensor[G] int64): boxes per group, summing to M.

    Returns:
        Tensor[D] int64: the positions kept, increasing (so group by group, each by decreasing score).

    A box is kept iff no kept box before it in its group overlaps it by IoU > iou_threshold (greedy NMS).
    Groups of up to _NMS_VECTOR_MAX boxes are resolved together: the IoU of every pair within a group,
    computed with the same float operations as torchvision's kernel (so the same comparisons at the
    threshold), then the rule above iterated to its fixed point (the greedy result is its unique
    solution, reached after at most one pass per box of the longest suppression chain). Larger groups
    call torchvision's nms each.
    """
    num_boxes = boxes.shape[0]
    keep = torch.ones(num_boxes, dtype=torch.bool)
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    large = group_sizes > _NMS_VECTOR_MAX
    for start, size in zip(starts[large].tolist(), group_sizes[large].tolist()):
        kept = nms(boxes[start : start + size], scores[start : start + size], iou_threshold)
        keep[start : start + size] = False
        keep[kept + start] = True

    # Pairs (i, j), i before j, within the small groups: position p pairs with the rest of its group.
    size_per_box = torch.repeat_interleave(group_sizes, group_sizes)
    rank = torch.arange(num_boxes) - torch.repeat_interleave(starts, group_sizes)
    partners = torch.where(size_per_box <= _NMS_VECTOR_MAX, size_per_box - 1 - rank, 0)  # [M]
    x1, y1, x2, y2 = (c.contiguous() for c in boxes.unbind(1))
    areas = (x2 - x1) * (y2 - y1)
    # The pairs of a run of positions at a time, about _NMS_PAIRS_PER_CHUNK: [pairs] temporaries of a few
    # hundred kB, reused, where all pairs at once (a million on bench_components' batch) would be fresh
    # pages for each of the twenty operations below.
    pairs_before = torch.cumsum(partners, 0) - partners
    bounds = torch.searchsorted(pairs_before, torch.arange(0, int(partners.sum()), _NMS_PAIRS_PER_CHUNK))
    overlapping_pairs = []
    for lo, hi in zip(bounds.tolist(), bounds[1:].tolist() + [num_boxes]):
        count = partners[lo:hi]
        first = torch.repeat_interleave(torch.arange(lo, hi), count)
        second = first + 1 + torch.arange(first.numel()) - torch.repeat_interleave(pairs_before[lo:hi], count)
        second += pairs_before[lo]  # (pairs_before counts from position 0, the chunk's arange from 0)
        # index_select: much faster than values[first] for many indices
        pair = lambda values, first=first, second=second: (  # noqa: E731
            values.index_select(0, first),
            values.index_select(0, second),
        )
        # As torchvision's nms_kernel: areas (x2 - x1) * (y2 - y1); w, h = max(0, min(x2) - max(x1)), ...;
        # ovr = inter / (area_i + area_j - inter) in the boxes' dtype; suppress if ovr > threshold (double).
        w = torch.minimum(*pair(x2)).sub_(torch.maximum(*pair(x1))).clamp_(min=0)
        h = torch.minimum(*pair(y2)).sub_(torch.maximum(*pair(y1))).clamp_(min=0)
        inter = w.mul_(h)
        area_first, area_second = pair(areas)
        iou = inter / area_first.add_(area_second).sub_(inter)
        overlapping = iou.double() > iou_threshold
        overlapping_pairs.append((first[overlapping], second[overlapping]))
    first = (
        torch.cat([f for f, _ in overlapping_pairs])
        if overlapping_pairs
        else torch.zeros(0, dtype=torch.int64)
    )
    second = torch.cat([s for _, s in overlapping_pairs]) if overlapping_pairs else first

    small_keep = torch.ones(num_boxes, dtype=torch.bool)
    while True:
        suppressed = torch.zeros(num_boxes, dtype=torch.bool)
        suppressed[second[small_keep[first]]] = True
        if torch.equal(suppressed, ~small_keep):
            break
        small_keep = ~suppressed
    return (keep & small_keep).nonzero().flatten()


def _per_class_candidates(
    pred_logits: Tensor, softmax: bool, topk: int, conf_thresh: float
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Per image and class, the ``topk`` best anchors over all levels (the original's selection).

    pred_logits (Tensor[N, A, C]). Returns one-element lists (the layout of the per-level selection) of
    scores (Tensor[N, K * k], -1 where not above ``conf_thresh``), anchor indices and labels (Tensor[N,
    K * k] int64), k = min(topk, A), class-major.
    """
    num_images = pred_logits.shape[0]
    if softmax:
        scores = pred_logits.float().softmax(dim=2)[..., 1:]  # [N, A, K]
    else:
        scores = pred_logits.float().sigmoid()
    num_classes = scores.shape[2]
    top_scores, top_anchors = scores.transpose(1, 2).topk(min(topk, scores.shape[1]), dim=2)  # [N, K, k]
    top_scores = top_scores.masked_fill(top_scores <= conf_thresh, -1.0)
    labels = torch.arange(num_classes, device=pred_logits.device)[None, :, None].expand_as(top_anchors)
    return (
        [top_scores.reshape(num_images, -1)],
        [top_anchors.reshape(num_images, -1)],
        [labels.reshape(num_images, -1)],
    )


def _first_k_per_group(groups: Tensor, k: int) -> Tensor:
    """Bool mask [M]: the first ``k`` elements of each group value in ``groups`` (Tensor[M] int64)."""
    order = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1]
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    mask = torch.empty_like(groups, dtype=torch.bool)
    mask[order] = torch.arange(groups.numel(), device=groups.device) - first < k
    return mask


def _scales_and_orig_sizes(targets: List[Dict], sizes: Tensor):
    scales = torch.stack(
        [torch.as_tensor(t["scale"], dtype=torch.float32) if "scale" in t else torch.ones(2) for t in targets]
    )  # [N, 2] (sx, sy)
    orig_sizes = torch.stack(
        [
            torch.as_tensor(t["orig_size"]).float()
            if "orig_size" in t
            else sizes[i].cpu().float() / scales[i].flip(0)  # (h / sy, w / sx)
            for i, t in enumerate(targets)
        ]
    )  # [N, 2] (h, w)
    return scales, orig_sizes
