"""Detections from head outputs: per-level threshold and top-k, decode, clip, NMS, back to original pixels."""

import logging
from typing import Dict, List

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms

from layers.box_coder import BoxCoder

logger = logging.getLogger(__name__)


class PostProcess(nn.Module):
    """Turn pred_logits / pred_box_deltas into per-image detections, for the whole batch at once.

    Steps: per level, scores above ``conf_thresh`` (strictly), the ``pre_nms_topk`` best (anchor, class)
    pairs per image; decode those boxes and clip them to the image's valid (unpadded) size; NMS per image
    and class (or per image with ``class_agnostic``) as ONE ``batched_nms`` call over the batch; keep the
    ``max_detections`` best per image; map to original image pixels.

    Args:
        box_coder: decodes the deltas (same variances as in training).
        score_type: "softmax" (K + 1 columns, column 0 = background, dropped) or "sigmoid" (K columns).
        conf_thresh, pre_nms_topk, nms_thresh, max_detections, class_agnostic: as named.

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
        max_detections: int = 100,
        class_agnostic: bool = False,
    ):
        super().__init__()
        if score_type not in ("softmax", "sigmoid"):
            raise ValueError(f"score_type must be 'softmax' or 'sigmoid', got {score_type!r}")
        if pre_nms_topk < 1 or max_detections < 1:
            raise ValueError(
                f"pre_nms_topk ({pre_nms_topk}) and max_detections ({max_detections}) must be >= 1"
            )
        self.box_coder = box_coder
        self.score_type = score_type
        self.conf_thresh = conf_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.class_agnostic = class_agnostic

    def extra_repr(self) -> str:
        return (
            f"score_type={self.score_type}, conf_thresh={self.conf_thresh}, "
            f"pre_nms_topk={self.pre_nms_topk}, nms_thresh={self.nms_thresh}, "
            f"max_detections={self.max_detections}, class_agnostic={self.class_agnostic}"
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

        # 1. Per level, the pre_nms_topk best (anchor, class) pairs above conf_thresh, per image.
        # They lie within the pre_nms_topk anchors of highest best-class score (each better anchor has a
        # pair at least as good), so only those anchors' K scores are computed: one max-reduction over
        # the level instead of scores, a mask and a top-k over all A_l * K pairs.
        cand_scores, cand_anchor_idxs, cand_labels = [], [], []
        flat_logits = pred_logits.reshape(num_images * num_anchors, num_columns)
        image_offsets = torch.arange(num_images, device=device)[:, None] * num_anchors  # [N, 1]
        if softmax:  # log of the best class probability, for every anchor at once
            best_all = _softmax_best(flat_logits).reshape(num_images, num_anchors)
        start = 0
        for num_level in num_anchors_per_level:
            logits = pred_logits[:, start : start + num_level]  # [N, A_l, C]
            if softmax:
                best = best_all[:, start : start + num_level]  # [N, A_l]
            else:
                best = logits.amax(dim=2)  # sigmoid is monotonic: rank by logit
            k = min(self.pre_nms_topk, num_level)
            top_anchors = best.topk(k, dim=1).indices  # [N, k]
            # Whole rows of C scores by index_select (a gather with an expanded index reads one index per
            # element): flat row of image i, anchor a is i * A + a.
            flat_rows = (top_anchors + (image_offsets + start)).reshape(-1)
            sel = flat_logits.index_select(0, flat_rows).reshape(num_images, k, num_columns).float()
            if softmax:  # the selected rows again: the same log_softmax values as the ranking's
                scores = torch.log_softmax(sel, dim=2)[..., 1:].exp_()
            else:
                scores = sel.sigmoid_()
            scores = scores.reshape(num_images, -1)  # [N, k * K], anchor-major
            scores.masked_fill_(scores <= self.conf_thresh, -1.0)
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
        boxes = self.box_coder.decode(pred_box_deltas[image_idxs, anchor_idxs], anchors[anchor_idxs])
        boxes = _clip_xyxy(boxes, sizes[image_idxs].float())

        # 3. NMS per image and class (or per image); see _nms_top_candidates.
        nms_groups = image_idxs if self.class_agnostic else image_idxs * num_classes + labels
        keep = _nms_top_candidates(
            boxes, scores, image_idxs, nms_groups, num_images, self.nms_thresh, self.max_detections
        )

        # 4. The max_detections best per image: stable sort by image keeps the score order within each.
        keep = keep[torch.sort(image_idxs[keep], stable=True).indices]
        kept_image_idxs = image_idxs[keep]
        counts = torch.bincount(kept_image_idxs, minlength=num_images)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=device) - first[kept_image_idxs]
        keep = keep[rank < self.max_detections]
        counts = counts.clamp(max=self.max_detections)

        # 5. Back to original image pixels.
        scales, orig_sizes = _scales_and_orig_sizes(targets, sizes)
        image_idxs = image_idxs[keep]
        boxes = boxes[keep] / scales.to(device)[image_idxs].repeat(1, 2)
        boxes = _clip_xyxy(boxes, orig_sizes.to(device)[image_idxs].float())
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


def _clip_xyxy(boxes: Tensor, sizes_hw: Tensor) -> Tensor:
    """Clip boxes (Tensor[M, 4] xyxy) to [0, w] x [0, h], with sizes_hw (Tensor[M, 2]) per box."""
    upper = sizes_hw.flip(-1).repeat(1, 2)  # (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), upper)


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


# Elements per chunk of the softmax scores: one reused [N, a, C] buffer of 1 MB (it stays in cache)
# instead of [N, A_l, C] temporaries (130 MB for P3 at 600 px, batch 8, 81 columns), which pay
# first-touch page faults on the CPU on every call.
_CHUNK_ELEMENTS = 1 << 18
# Pass 1 of the NMS keeps the best max_detections * this many candidates of each image (see below).
_NMS_PREFIX_FACTOR = 8


def _softmax_best(logits: Tensor) -> Tensor:
    """Log-probability of the best foreground class per row, without [M, C] temporaries.

    Args:
        logits (Tensor[M, C]): column 0 = background.

    Returns:
        Tensor[M] float32: max_{c >= 1} log_softmax(logits)_c.

    Chunked over contiguous rows on CPU: log_softmax (one fused pass: max, exp, sum, log) into a reused
    cache-sized buffer, then the foreground max of the hot buffer, where a logsumexp makes four passes
    and [M, C] temporaries that pay first-touch page faults on every call.
    """
    num_rows, num_columns = logits.shape
    if logits.device.type != "cpu":  # no page faults to avoid; one kernel per op
        return torch.log_softmax(logits.float(), dim=1)[:, 1:].amax(dim=1)
    logits = logits.contiguous()
    step = max(1, _CHUNK_ELEMENTS // max(1, num_columns))
    buffer = torch.empty((min(step, num_rows), num_columns), dtype=torch.float32)
    best = torch.empty(num_rows, dtype=torch.float32)
    for start in range(0, num_rows, step):
        chunk = logits[start : start + step].float()  # [m, C], contiguous
        out = buffer[: chunk.shape[0]]
        torch.log_softmax(chunk, dim=1, out=out)
        torch.amax(out[:, 1:], dim=1, out=best[start : start + step])
    return best


def _offset_nms(boxes: Tensor, scores: Tensor, groups: Tensor, nms_thresh: float) -> Tensor:
    """One ``nms`` over several groups: each group's boxes are shifted by group * (max coordinate + 1),
    so boxes of different groups never overlap (torchvision's batched_nms "coordinate trick").

    In float64: a float32 coordinate >= 1e-3 plus an integer multiple of a float32 offset is exact, so
    the IoUs within a group are exactly those of the unshifted float64 boxes (the reference per-group
    ``nms(boxes.double(), ...)``). boxes (Tensor[M, 4] xyxy, >= 0), scores, groups (Tensor[M]).
    Returns indices into M, by decreasing score.
    """
    boxes = boxes.double()
    offsets = groups.double() * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores.double(), nms_thresh)


def _group_nms(boxes: Tensor, scores: Tensor, groups: Tensor, nms_thresh: float) -> Tensor:
    """NMS within each group, every candidate against the others of its group only.

    On CPU: one ``nms`` per group on contiguous slices after one sort (batched_nms would scan all boxes
    once per group above 1000 boxes); on GPU: one ``batched_nms``. Returns indices by decreasing score.
    """
    if boxes.device.type != "cpu":
        return batched_nms(boxes.double(), scores.double(), groups, nms_thresh)
    # Sort once by group, then score: every group is a contiguous, already sorted slice (views).
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_boxes, sorted_scores = boxes[order].double(), scores[order].double()
    group_sizes = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    keep, start = [], 0
    for size in group_sizes:
        keep.append(nms(sorted_boxes[start : start + size], sorted_scores[start : start + size], nms_thresh))
        keep[-1] += start
        start += size
    keep = order[torch.cat(keep)] if keep else order
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _nms_top_candidates(
    boxes: Tensor,
    scores: Tensor,
    image_idxs: Tensor,
    groups: Tensor,
    num_images: int,
    nms_thresh: float,
    max_detections: int,
) -> Tensor:
    """Greedy NMS within groups (image, or image and class), exact for the max_detections best per image.

    Greedy NMS decides a candidate from the higher-scored candidates of its group alone. So the survivors
    among an image's best T candidates are exactly the full run's survivors of score >= the T-th score,
    and when at least ``max_detections`` of them survive, they include the image's ``max_detections``
    best detections. Pass 1 runs NMS on each image's T = ``_NMS_PREFIX_FACTOR * max_detections`` best
    candidates (ties with the T-th kept, so no tie is split) with one offset ``nms`` per image on CPU
    (its cost is kept x candidates, so per image it stays small) or one for the batch on GPU; only the
    images with fewer survivors than max_detections and more candidates than T get pass 2, NMS over all
    their candidates (``_group_nms``). With 5,000 candidates per image and 80 classes this replaces 80
    small ``nms`` calls per image by one.

    Args:
        boxes (Tensor[M, 4] xyxy, >= 0), scores (Tensor[M]), image_idxs (Tensor[M] int64), groups
        (Tensor[M] int64, within-image groups already distinct across images), num_images, nms_thresh,
        max_detections.

    Returns:
        Tensor[D] int64: indices into M of the survivors (all of them in pass-2 images, at least the
        max_detections best elsewhere), sorted by decreasing score.
    """
    device = scores.device
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    # Candidates by image, then decreasing score; rank within the image.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.sort(image_idxs[order], stable=True).indices]
    sorted_images, sorted_scores = image_idxs[order], scores[order]
    counts = torch.bincount(image_idxs, minlength=num_images)  # [N]
    first = torch.cumsum(counts, 0) - counts
    prefix = _NMS_PREFIX_FACTOR * max_detections
    # The T-th best score of each image (-inf when the image has at most T candidates).
    cut_index = (first + prefix - 1).clamp(max=order.numel() - 1)
    cut_score = torch.where(counts > prefix, sorted_scores[cut_index], float("-inf"))
    in_prefix = sorted_scores >= cut_score[sorted_images]
    cand = order[in_prefix]  # by image, then score
    cand_counts = torch.bincount(sorted_images[in_prefix], minlength=num_images)  # [N]
    if device.type == "cpu":
        keep, start = [], 0
        for count in cand_counts.tolist():
            if count:
                idx = cand[start : start + count]
                keep.append(idx[_offset_nms(boxes[idx], scores[idx], groups[idx], nms_thresh)])
            start += count
        keep = torch.cat(keep)
    else:
        keep = cand[_offset_nms(boxes[cand], scores[cand], groups[cand], nms_thresh)]
    survivors = torch.bincount(image_idxs[keep], minlength=num_images)
    incomplete = (survivors < max_detections) & (counts > cand_counts)
    if bool(incomplete.any()):  # pass 2 (a host sync, as the nms calls above)
        redo = incomplete[image_idxs]
        keep = keep[~incomplete[image_idxs[keep]]]
        redo_idxs = redo.nonzero().squeeze(1)
        keep = torch.cat(
            [keep, redo_idxs[_group_nms(boxes[redo_idxs], scores[redo_idxs], groups[redo_idxs], nms_thresh)]]
        )
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]
