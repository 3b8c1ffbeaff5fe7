"""Detections from head outputs: per-level threshold and top-k, decode, clip, NMS, back to original pixels."""

import logging
import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from layers.box_coder import BoxCoder
from layers.grouped_nms import first_k_per_group, nms_sorted_groups
from utils.box_ops import clip_xyxy

logger = logging.getLogger(__name__)


class PostProcess(nn.Module):
    """Turn pred_logits / pred_box_deltas into per-image detections, for the whole batch at once.

    Steps: per level, scores above ``conf_thresh`` (strictly), the ``pre_nms_topk`` best (anchor, class)
    pairs per image; decode those boxes and clip them to the image's valid (unpadded) size; NMS per image
    and class (or per image with ``class_agnostic``) for the whole batch at once (CUDA: one
    ``batched_nms``; CPU: ``grouped_nms.nms_sorted_groups``, the same result); keep the ``max_detections``
    best per image; map to original image pixels.

    With max_detections set, the same detections usually come from far fewer pairs: the best few hundred
    per image over all levels, widened until NMS leaves max_detections (``_detections_from_prefix``; the
    per-level steps above decide wherever it cannot show that it gives their result).

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
        pred_logits = outputs["pred_logits"]
        num_images, num_anchors, num_columns = pred_logits.shape
        if len(targets) != num_images:
            raise ValueError(f"{len(targets)} targets for {num_images} images")
        num_anchors_per_level = outputs.get("num_anchors_per_level") or [num_anchors]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(
                f"num_anchors_per_level sums to {sum(num_anchors_per_level)}, "
                f"pred_logits has {num_anchors} anchors"
            )
        if num_images == 0:  # (the reshapes below cannot infer a size from 0 elements)
            return []
        softmax = self.score_type == "softmax"
        if self.per_class_topk:  # per class, the best anchors over all levels
            candidates = _per_class_candidates(pred_logits, softmax, self.pre_nms_topk, self.conf_thresh)
            return self._detections(*self._nms(candidates, outputs, targets), targets)

        # Each anchor's best class score: sigmoid is monotonic, so the logit ranks; softmax ranks by the
        # log of the best class probability, which needs the normaliser of every anchor.
        if softmax:
            best, log_norm = _softmax_best(pred_logits)  # [N, A] each
        else:
            log_norm, best = None, pred_logits.amax(dim=2)
        if self.max_detections and self.pre_nms_topk >= self.max_detections:
            detections = self._detections_from_prefix(best, log_norm, outputs, targets)
            if detections is not None:
                return detections
        candidates = self._per_level_candidates(best, log_norm, pred_logits, num_anchors_per_level)
        return self._detections(*self._nms(candidates, outputs, targets), targets)

    def _num_classes(self, pred_logits: Tensor) -> int:
        """K: the score columns of pred_logits (Tensor[N, A, C]) less softmax's background column."""
        return pred_logits.shape[2] - (self.score_type == "softmax")

    def _pair_scores(self, pred_logits: Tensor, log_norm: Tensor | None, top_anchors: Tensor) -> Tensor:
        """Scores of every class of the given anchors, those not above conf_thresh set to -1.

        pred_logits (Tensor[N, A, C]), log_norm (Tensor[N, A] or None for sigmoid), top_anchors (Tensor[N,
        k] int64). Returns Tensor[N, k * K] float32, anchor-major (pair j is anchor j // K, class j % K).
        """
        num_images, num_anchors, num_columns = pred_logits.shape
        image_range = torch.arange(num_images, device=pred_logits.device)
        # [N, k, C]: whole rows copied (index_select on rows, much faster than gather or logits[i, j])
        rows = (top_anchors + (image_range * num_anchors)[:, None]).flatten()
        sel = pred_logits.reshape(-1, num_columns).index_select(0, rows).view(num_images, -1, num_columns)
        if log_norm is not None:
            sel_log_norm = log_norm.flatten().index_select(0, rows).view(num_images, -1, 1)
            scores = (sel[..., 1:].float() - sel_log_norm).exp()
        else:
            scores = sel.float().sigmoid()
        scores = scores.reshape(num_images, -1)
        return scores.masked_fill(scores <= self.conf_thresh, -1.0)

    def _per_level_candidates(
        self, best: Tensor, log_norm: Tensor | None, pred_logits: Tensor, num_anchors_per_level: List[int]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Per level, the pre_nms_topk best (anchor, class) pairs above conf_thresh, per image.

        They lie within the pre_nms_topk anchors of highest best-class score (each better anchor has a pair
        at least as good), so only those anchors' K scores are computed: one max-reduction over the level
        instead of scores, a mask and a top-k over all A_l * K pairs. Returns scores (Tensor[N, M], -1
        where not above conf_thresh), anchor indices and labels (Tensor[N, M] int64), level after level.
        """
        num_classes = self._num_classes(pred_logits)
        cand_scores, cand_anchor_idxs, cand_labels = [], [], []
        start = 0
        for num_level in num_anchors_per_level:
            k = min(self.pre_nms_topk, num_level)
            top_anchors = best[:, start : start + num_level].topk(k, dim=1).indices + start  # [N, k]
            scores = self._pair_scores(pred_logits, log_norm, top_anchors)  # [N, k * K]
            top_scores, top_idxs = scores.topk(min(self.pre_nms_topk, scores.shape[1]), dim=1)
            cand_scores.append(top_scores)
            cand_anchor_idxs.append(top_anchors.gather(1, top_idxs // num_classes))
            cand_labels.append(top_idxs % num_classes)
            start += num_level
        return tuple(torch.cat(c, dim=1) for c in (cand_scores, cand_anchor_idxs, cand_labels))

    def _detections_from_prefix(
        self, best: Tensor, log_norm: Tensor | None, outputs: Dict[str, Tensor], targets: List[Dict]
    ) -> List[Dict[str, Tensor]] | None:
        """The per-level path's detections, from each image's best pairs only; None (for the per-level
        path to decide) with a NaN score, or where max_detections do not survive within pre_nms_topk pairs.

        Greedy NMS keeps or drops a pair by looking only at the pairs before it in its group (by score,
        ties by anchor then class: see _nms), so the pairs of an image scoring above some value decide
        their own fate; if at least max_detections of them survive NMS (and max_per_class), they are the
        image's detections. With at most pre_nms_topk such pairs, each is among the pre_nms_topk best of
        its level, so among the per-level path's candidates. The prefix of an image is its pairs scoring
        above its (T + 1)-th best score (at most T pairs: ties at the cut all stay out); they come from its
        T + 1 best anchors, as in the per-level path. T starts at _PREFIX_START * max_detections and grows
        by _PREFIX_GROWTH, up to pre_nms_topk, while an image is short and has more pairs above
        conf_thresh. (On CUDA, batched_nms orders pairs of exactly equal score its own way, so there the
        two paths can keep different ones of two tied, overlapping pairs.)
        """
        pred_logits = outputs["pred_logits"]
        num_images, num_anchors, num_columns = pred_logits.shape
        num_classes = self._num_classes(pred_logits)
        prefix = min(self.pre_nms_topk, _PREFIX_START * self.max_detections)
        while True:
            top_best, top_anchors = best.topk(min(prefix + 1, num_anchors), dim=1)  # [N, k]
            scores = self._pair_scores(pred_logits, log_norm, top_anchors)  # [N, k * K]
            top_scores, top_idxs = scores.topk(min(prefix + 1, scores.shape[1]), dim=1)  # [N, T + 1], sorted
            if top_best.isnan().any() or top_scores.isnan().any():
                return None  # (NaN ranks above everything in topk: the argument above does not hold)
            if top_anchors.shape[1] * num_classes > prefix + 1:
                cut = top_scores[:, prefix:]  # [N, 1]: the (T + 1)-th best, -1 if not above conf_thresh
                in_prefix, complete = top_scores > cut, cut[:, 0] <= self.conf_thresh
            else:  # every pair of the image is here
                in_prefix, complete = (
                    top_scores > self.conf_thresh,
                    torch.ones_like(top_scores[:, 0], dtype=torch.bool),
                )
            candidates = (
                top_scores.masked_fill(~in_prefix, -1.0),
                top_anchors.gather(1, top_idxs // num_classes),
                top_idxs % num_classes,
            )
            flat, keep = self._nms(candidates, outputs, targets)
            counts = torch.bincount(flat[0][keep], minlength=num_images)
            if bool(((counts >= self.max_detections) | complete).all()):
                return self._detections(flat, keep, targets)
            if prefix >= self.pre_nms_topk:
                return None
            prefix = min(self.pre_nms_topk, prefix * _PREFIX_GROWTH)

    def _nms(
        self, candidates: Tuple[Tensor, Tensor, Tensor], outputs: Dict[str, Tensor], targets: List[Dict]
    ) -> Tuple[Tuple[Tensor, ...], Tensor]:
        """Decode and clip the candidates above conf_thresh, NMS them, apply max_per_class.

        candidates: scores (Tensor[N, M], -1 where not above conf_thresh), anchor indices and labels
        (Tensor[N, M] int64). Returns the flat candidates (image_idxs, scores, anchor_idxs, labels, boxes:
        Tensor[D] each, boxes Tensor[D, 4] xyxy input px) and keep (Tensor[D'] int64 into them, by
        decreasing score).
        """
        pred_box_deltas, anchors = outputs["pred_box_deltas"], outputs["anchors"]
        num_images, num_anchors = pred_box_deltas.shape[:2]
        num_classes = self._num_classes(outputs["pred_logits"])
        device = pred_box_deltas.device
        scores, anchor_idxs, labels = candidates
        keep = scores > self.conf_thresh  # -1: below threshold
        image_idxs = torch.arange(num_images, device=device)[:, None].expand_as(scores)[keep]
        scores, anchor_idxs, labels = scores[keep], anchor_idxs[keep], labels[keep]
        # In (image, anchor, class) order, so that the stable sorts below break ties in score by anchor then
        # class, whichever way the candidates were selected.
        canonical = torch.argsort((image_idxs * num_anchors + anchor_idxs) * num_classes + labels)
        image_idxs, scores, anchor_idxs, labels = (
            t[canonical] for t in (image_idxs, scores, anchor_idxs, labels)
        )

        # Decode and clip to the valid (unpadded) image area. index_select (row copies): several times
        # faster than advanced indexing for thousands of rows.
        boxes = self.box_coder.decode(
            pred_box_deltas.reshape(-1, 4).index_select(0, image_idxs * num_anchors + anchor_idxs),
            anchors.index_select(0, anchor_idxs),
        )
        if self.clip_before_nms:
            boxes = clip_xyxy(boxes, _sizes(targets, device)[image_idxs].float())

        # NMS per image and class (or per image). On CPU: one sort makes every group a contiguous slice,
        # then nms_sorted_groups (batched_nms would scan all boxes once per group); on GPU: one batched_nms.
        nms_groups = image_idxs if self.class_agnostic else image_idxs * num_classes + labels
        if device.type == "cpu":
            # Sort once by group, then score: every group is a contiguous, already sorted slice.
            order = torch.argsort(scores, descending=True, stable=True)
            order = order[torch.argsort(nms_groups[order], stable=True)]
            group_sizes = torch.unique_consecutive(nms_groups[order], return_counts=True)[1]
            sorted_boxes, sorted_scores = boxes.index_select(0, order), scores.index_select(0, order)
            keep = order[nms_sorted_groups(sorted_boxes, sorted_scores, group_sizes, self.nms_thresh)]
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
        else:
            keep = batched_nms(boxes.double(), scores.double(), nms_groups, self.nms_thresh)

        if self.max_per_class:  # keep is sorted by decreasing score: the first of each group are its best
            keep = keep[first_k_per_group(image_idxs[keep] * num_classes + labels[keep], self.max_per_class)]
        return (image_idxs, scores, anchor_idxs, labels, boxes), keep

    def _detections(
        self, flat: Tuple[Tensor, ...], keep: Tensor, targets: List[Dict]
    ) -> List[Dict[str, Tensor]]:
        """The max_detections best kept per image, mapped to original image pixels (see forward)."""
        image_idxs, scores, anchor_idxs, labels, boxes = flat
        device, num_images = boxes.device, len(targets)
        # Stable sort by image keeps the score order within each.
        keep = keep[torch.sort(image_idxs[keep], stable=True).indices]
        kept_image_idxs = image_idxs[keep]
        counts = torch.bincount(kept_image_idxs, minlength=num_images)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=device) - first[kept_image_idxs]
        if self.max_detections:
            keep = keep[rank < self.max_detections]
            counts = counts.clamp(max=self.max_detections)

        scales, orig_sizes = _scales_and_orig_sizes(targets, _sizes(targets, device))
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


def _sizes(targets: List[Dict], device: torch.device) -> Tensor:
    """Tensor[N, 2] (h, w): each image's valid (unpadded) size in input pixels."""
    return torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device)


# CPU row chunks of the softmax ranking, per intra-op thread: [rows, C] temporaries of about 1 MB per
# thread that stay in its cache between the passes (one read of the logits from memory), reused chunk
# after chunk (a level-wide temporary would be fresh pages, whose first touch costs more than the
# arithmetic on CPU). Per thread, so that the number of parallel ops, each waiting for its slowest
# thread (long waits on a loaded machine), does not grow with the thread count.
_SOFTMAX_ROWS_PER_THREAD = 4096
# The prefix path starts with the best _PREFIX_START * max_detections pairs per image and widens by
# _PREFIX_GROWTH while an image has too few detections left after NMS (up to pre_nms_topk).
_PREFIX_START = 4
_PREFIX_GROWTH = 4
_LOG2_E = 1.0 / math.log(2.0)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _softmax_best(pred_logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Each anchor's best class log-probability, and its softmax normaliser.

    pred_logits (Tensor[N, A, C], column 0 background). Returns best (Tensor[N, A] float32: the largest of
    columns 1.. minus log_norm) and log_norm (Tensor[N, A] float32: logsumexp over all C columns).

    On CPU, chunk by chunk of rows: the class max, the row max m (class max or background), then
    log(sum(exp2((x - m) * log2(e)))) + m. exp2 is about 3x cheaper than exp in torch's CPU kernels; the
    normaliser differs from torch.logsumexp's by about 1e-7 (tests/test_postprocess_prefix.py).
    """
    if pred_logits.device.type != "cpu":
        log_norm = torch.logsumexp(pred_logits.float(), dim=2)
        return pred_logits[..., 1:].amax(dim=2).float() - log_norm, log_norm
    rows = pred_logits.reshape(-1, pred_logits.shape[2])  # [N * A, C], a view
    num_rows, num_columns = rows.shape
    class_max, row_max, log_norm = (torch.empty(num_rows) for _ in range(3))
    chunk_rows = _SOFTMAX_ROWS_PER_THREAD * torch.get_num_threads()
    buffer = torch.empty(min(chunk_rows, num_rows), num_columns)
    for begin in range(0, num_rows, chunk_rows):
        end = min(begin + chunk_rows, num_rows)
        chunk = rows[begin:end].float()
        torch.amax(chunk[:, 1:], dim=1, out=class_max[begin:end])
        shift = torch.maximum(class_max[begin:end], chunk[:, 0], out=row_max[begin:end])
        # A finite shift where the row max is infinite: the normaliser is then +-inf, as torch's.
        shift.clamp_(-_FLOAT32_MAX, _FLOAT32_MAX)
        shifted = torch.sub(chunk, shift[:, None], out=buffer[: end - begin])
        torch.sum(shifted.mul_(_LOG2_E).exp2_(), dim=1, out=log_norm[begin:end])
    log_norm = log_norm.log_().add_(row_max).view(pred_logits.shape[:2])
    return class_max.view(pred_logits.shape[:2]) - log_norm, log_norm


def _per_class_candidates(
    pred_logits: Tensor, softmax: bool, topk: int, conf_thresh: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per image and class, the ``topk`` best anchors over all levels (the original's selection).

    pred_logits (Tensor[N, A, C]). Returns scores (Tensor[N, K * k], -1 where not above ``conf_thresh``),
    anchor indices and labels (Tensor[N, K * k] int64), k = min(topk, A), class-major.
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
        top_scores.reshape(num_images, -1),
        top_anchors.reshape(num_images, -1),
        labels.reshape(num_images, -1),
    )


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
