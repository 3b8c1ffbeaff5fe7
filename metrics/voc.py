"""PASCAL VOC detection AP, computed in memory from the common annotation format.

Semantics follow the official VOC devkit (``VOCevaldet.m``, ``VOCap.m``):

- Detections of one class are sorted by score, descending, over the whole test set. Each detection is
  assigned to the ground-truth box (same image, same class) with the largest IoU; on equal IoU the
  box that comes first in the annotation file wins (the devkit's ``if ov > ovmax``).
- If that IoU is ``>= iou_thresh`` (the devkit's ``ovmax >= VOCopts.minoverlap``; py-faster-rcnn's
  ``voc_eval.py`` uses ``>``, which only differs when an IoU is exactly the threshold) then:
  difficult box -> the detection is ignored (neither TP nor FP); box not yet detected -> TP;
  box already detected (a duplicate) -> FP. Otherwise (IoU below the threshold, or no box of that
  class in the image) -> FP.
- Difficult boxes are not counted in the number of positives. Crowd boxes (``iscrowd=1``, VOC has
  none) are treated exactly like difficult ones: they neither count as positives nor make a matching
  detection false.
- Ignored detections are removed from the ranked list before precision/recall are computed. The devkit
  keeps them as (0, 0) entries, which only repeats a (recall, precision) point (or gives a 0/0
  precision that MATLAB's ``max`` skips), so both AP definitions come out the same.

IoU is continuous (no "+1", ``utils.box_ops.paired_box_iou_xyxy_np`` in float64): by the common format's
box convention (x1 = xmin - 1, x2 = xmax for VOC's 1-based inclusive pixel indices) it equals the devkit's
"+1" IoU on the original VOC coordinates exactly, term by term: the overlap width min(x2) - max(x1) is the
devkit's min(xmax) - max(xmin) + 1 and each box's width x2 - x1 is xmax - xmin + 1 (the same for y).

Ties in score are broken by input order (the detection that comes first in ``detections`` is ranked
first): a stable sort (``kind="mergesort"``). The devkit's MATLAB ``sort`` is stable too;
py-faster-rcnn's quicksort ``np.argsort`` is not.

Matching is vectorised: each detection's best box does not depend on the order of processing (the devkit
does not fall back to the second-best box when the best one is taken), so the only order-dependent part
is "which detection reaches a box first", which is a first-occurrence lookup in score order.
"""

import logging
from typing import Any

import numpy as np

from metrics.arrays import (  # noqa: F401 - detections/gt column helpers, importable from here too
    box_column,
    column,
    detections_to_arrays,
    gt_to_arrays,
    map_detections,
    positions_of,
    unique_sorted,
)
from utils.box_ops import paired_box_iou_xyxy_np
from utils.errors import UserError

logger = logging.getLogger(__name__)

# Statuses of a detection after matching.
STATUS_FP = 0
STATUS_TP = 1
STATUS_IGNORED = -1


def pairs_within_groups(det_keys: np.ndarray, gt_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (detection, gt) index pairs that share a group key (e.g. image index * K + class index).

    Args:
        det_keys (np.ndarray[D] int64): group key of each detection.
        gt_keys (np.ndarray[G] int64): group key of each ground-truth box.

    Returns:
        (det_idx, gt_idx), each np.ndarray[P] int64. Pairs are ordered by detection index, then by gt
        index (so the first maximum within a detection's pairs is the earliest gt in file order).
    """
    det_keys = np.asarray(det_keys, dtype=np.int64)
    gt_keys = np.asarray(gt_keys, dtype=np.int64)
    if len(det_keys) == 0 or len(gt_keys) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    gt_order = np.argsort(gt_keys, kind="mergesort")
    uniq_keys, group_starts, group_counts = np.unique(
        gt_keys[gt_order], return_index=True, return_counts=True
    )
    pos = np.minimum(np.searchsorted(uniq_keys, det_keys), len(uniq_keys) - 1)
    found = uniq_keys[pos] == det_keys
    counts = np.where(found, group_counts[pos], 0).astype(np.int64)
    starts = np.where(found, group_starts[pos], 0).astype(np.int64)
    det_idx = np.repeat(np.arange(len(det_keys), dtype=np.int64), counts)
    # Offset of each pair inside its detection's run of pairs.
    run_starts = np.cumsum(counts) - counts
    offsets = np.arange(len(det_idx), dtype=np.int64) - np.repeat(run_starts, counts)
    gt_idx = gt_order[np.repeat(starts, counts) + offsets]
    return det_idx, gt_idx


def best_match_per_detection(
    num_det: int, det_idx: np.ndarray, gt_idx: np.ndarray, overlaps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, its largest overlap and the first gt (in pair order) that reaches it.

    Args:
        num_det (int): number of detections D.
        det_idx, gt_idx (np.ndarray[P] int64): pairs from ``pairs_within_groups`` (sorted by det_idx).
        overlaps (np.ndarray[P] float): IoU (or IoA) of each pair.

    Returns:
        max_overlap (np.ndarray[D] float64, -inf where the detection has no pair),
        best_gt (np.ndarray[D] int64, -1 where the detection has no pair).
    """
    max_overlap = np.full(num_det, -np.inf)
    best_gt = np.full(num_det, -1, dtype=np.int64)
    if len(det_idx) == 0:
        return max_overlap, best_gt
    np.maximum.at(max_overlap, det_idx, overlaps)
    is_max = overlaps == max_overlap[det_idx]
    max_pairs = np.flatnonzero(is_max)
    # Pairs are sorted by detection, so the first maximal pair of each detection is its first occurrence.
    dets_with_max, first = np.unique(det_idx[max_pairs], return_index=True)
    best_gt[dets_with_max] = gt_idx[max_pairs[first]]
    return max_overlap, best_gt


def lookup_or_fill(values: np.ndarray, idx: np.ndarray, fill: Any) -> np.ndarray:
    """values[idx] where idx >= 0, else fill (-1 marks "no match"); works when values is empty."""
    out = np.full(len(idx), fill, dtype=values.dtype)
    hit = idx >= 0
    out[hit] = values[idx[hit]]
    return out


def first_occurrence_mask(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Boolean mask of the candidates whose value appears for the first time (in array order).

    Args:
        values (np.ndarray[N] int64): e.g. the gt index each detection matched, in ranking order.
        candidates (np.ndarray[N] bool): which entries take part.

    Returns:
        np.ndarray[N] bool.
    """
    mask = np.zeros(len(values), dtype=bool)
    cand_idx = np.flatnonzero(candidates)
    if len(cand_idx):
        _, first = np.unique(values[cand_idx], return_index=True)
        mask[cand_idx[first]] = True
    return mask


def rank_by_class_and_score(cls: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Order grouping detections by class, then score descending; ties keep input order (stable)."""
    order = np.argsort(-scores, kind="mergesort")
    return order[np.argsort(cls[order], kind="mergesort")]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision from a ranked list's cumulative recall and precision.

    Args:
        recall (np.ndarray[N]): recall after each ranked detection.
        precision (np.ndarray[N]): precision after each ranked detection.
        use_07_metric (bool): True: VOC2007 11-point interpolation, the mean over t in {0, 0.1, ..., 1}
            of the maximum precision at recall >= t (0 if none). False: area under the curve as in
            VOC2010+ (``VOCap.m``): precision is replaced by its monotone envelope (max precision at any
            higher recall) and summed over the recall steps, with sentinels (0, 0) and (1, 0).

    Returns:
        float AP. An empty list gives 0.

    The 11 thresholds are computed as k / 10, the doubles nearest to 0.0, 0.1, ..., 1.0, so a recall of
    exactly 3/10 counts for t = 0.3. py-faster-rcnn's ``np.arange(0., 1.1, 0.1)`` gives
    0.30000000000000004 there and would not count it.
    """
    recall = np.asarray(recall, dtype=np.float64).ravel()
    precision = np.asarray(precision, dtype=np.float64).ravel()
    if recall.shape != precision.shape:
        raise UserError(f"voc_ap: recall {recall.shape} and precision {precision.shape} differ in length")
    if use_07_metric:
        thresholds = np.arange(11, dtype=np.float64) / 10.0
        reached = recall[None, :] >= thresholds[:, None]  # [11, N]
        best = np.where(reached, precision[None, :], -np.inf).max(axis=1, initial=-np.inf)
        return float(np.where(np.isfinite(best), best, 0.0).sum() / 11.0)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# Recall points of the stored precision/recall curves: COCO's 101 (0, 0.01, ..., 1).
PR_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def pr_envelope(
    recall: np.ndarray, precision: np.ndarray, thresholds: np.ndarray = PR_RECALL_THRESHOLDS
) -> list[float]:
    """Interpolated precision at fixed recalls, as COCOeval.accumulate samples its curves.

    Args:
        recall (np.ndarray[N]): non-decreasing recall after each ranked detection.
        precision (np.ndarray[N]): precision after each ranked detection.
        thresholds (np.ndarray[R]): recall points.

    Returns:
        list[float] of R values: at each threshold t, the largest precision at any recall >= t (the
        monotone envelope that both VOC APs use), 0 where the recall never reaches t; 6 decimals.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if len(recall) == 0:
        return [0.0] * len(thresholds)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, thresholds, side="left")
    values = np.where(idx < len(recall), envelope[np.minimum(idx, len(recall) - 1)], 0.0)
    return np.round(values, 6).tolist()


def match_detections_voc(
    gt_arrays: dict,
    det_img: np.ndarray,
    det_cls: np.ndarray,
    det_boxes: np.ndarray,
    ranking: np.ndarray,
    iou_thresh: float,
) -> np.ndarray:
    """Devkit matching of all detections at once.

    Args:
        gt_arrays (dict): from ``gt_to_arrays``.
        det_img, det_cls (np.ndarray[D] int64): image and class positions of the detections.
        det_boxes (np.ndarray[D, 4]): xyxy abs px.
        ranking (np.ndarray[D] int64): processing order (class-major, score descending).
        iou_thresh (float): a match needs IoU >= iou_thresh.

    Returns:
        np.ndarray[D] int8 status in input order: STATUS_TP, STATUS_FP or STATUS_IGNORED.
    """
    num_det = len(det_img)
    num_classes = len(gt_arrays["class_names"])
    det_keys = det_img * num_classes + det_cls
    gt_keys = gt_arrays["img"] * num_classes + gt_arrays["cls"]
    det_idx, gt_idx = pairs_within_groups(det_keys, gt_keys)
    ious = paired_box_iou_xyxy_np(det_boxes[det_idx], gt_arrays["boxes"][gt_idx])  # float64
    max_iou, best_gt = best_match_per_detection(num_det, det_idx, gt_idx, ious)
    # The devkit only considers boxes that overlap (iw > 0 and ih > 0).
    matched = (max_iou >= iou_thresh) & (max_iou > 0)
    gt_ignored = gt_arrays["difficult"] | gt_arrays["iscrowd"]
    ignored = matched & lookup_or_fill(gt_ignored, best_gt, False)
    candidates = matched & ~ignored
    # Which candidate reaches its box first, in processing order.
    is_first = first_occurrence_mask(best_gt[ranking], candidates[ranking])
    status = np.full(num_det, STATUS_FP, dtype=np.int8)
    status[ranking[is_first]] = STATUS_TP
    status[ignored] = STATUS_IGNORED
    return status


def evaluate_voc(gt: dict, detections: list[dict], iou_thresh: float = 0.5) -> dict:
    """PASCAL VOC AP per class, both VOC07 11-point and area under the curve (VOC2010+).

    Args:
        gt (dict): common-format ground truth (images, annotations with bbox [x, y, w, h] abs px,
            difficult, iscrowd; categories).
        detections (list[dict]): COCO results {"image_id", "category_id" (original id),
            "bbox" [x, y, w, h] abs px, "score"}.
        iou_thresh (float): in (0, 1]; a detection matches a box when IoU >= iou_thresh.

    Returns:
        dict with
          ap_07_11pt, ap_area: {class name: AP}, NaN for classes without non-difficult ground truth;
          map_07_11pt, map_area: mean over the classes that have at least one non-difficult,
            non-crowd box (the devkit averages its fixed 20 classes; a class with no positives has no
            defined recall, so it is left out here rather than counted as 0 or 1);
          num_gt {name: non-difficult non-crowd boxes}, num_gt_ignored {name: difficult or crowd boxes},
          of which num_gt_difficult (difficult) and num_gt_crowd (crowd, not difficult),
          num_det, num_tp, num_fp, num_det_ignored {name: count}; class_names, iou_thresh,
          num_classes_evaluated;
          recall_thresholds [101] and pr_curves {name: precision [101]} for the classes with positives
            (``pr_envelope``: the precision envelope at those recalls, 0 beyond the last recall).

    Raises:
        ValueError: detections with category ids or image ids that are not in ``gt`` (named), or
            malformed records.
    """
    if not 0.0 < iou_thresh <= 1.0:
        raise UserError(f"evaluate_voc: iou_thresh must be in (0, 1], got {iou_thresh}")
    gta = gt_to_arrays(gt)
    det = detections_to_arrays(detections)
    det_img, det_cls = map_detections(gta, det, "evaluate_voc")
    class_names = gta["class_names"]
    num_classes = len(class_names)

    ranking = rank_by_class_and_score(det_cls, det["scores"])
    status = match_detections_voc(gta, det_img, det_cls, det["boxes"], ranking, iou_thresh)

    gt_ignored = gta["difficult"] | gta["iscrowd"]
    num_pos = np.bincount(gta["cls"][~gt_ignored], minlength=num_classes)
    num_gt_ignored = np.bincount(gta["cls"][gt_ignored], minlength=num_classes)

    # Ranked list without ignored detections; class-major, so each class is one contiguous run.
    ranked = ranking[status[ranking] != STATUS_IGNORED]
    ranked_cls = det_cls[ranked]
    ranked_tp = (status[ranked] == STATUS_TP).astype(np.float64)
    run_bounds = np.searchsorted(ranked_cls, np.arange(num_classes + 1))

    ap_07, ap_area, curves = {}, {}, {}
    for k, name in enumerate(class_names):
        tp = ranked_tp[run_bounds[k] : run_bounds[k + 1]]
        if num_pos[k] == 0:
            ap_07[name] = ap_area[name] = float("nan")
            continue
        cum_tp = np.cumsum(tp)
        cum_fp = np.cumsum(1.0 - tp)
        recall = cum_tp / num_pos[k]
        precision = cum_tp / (cum_tp + cum_fp)
        ap_07[name] = voc_ap(recall, precision, use_07_metric=True)
        ap_area[name] = voc_ap(recall, precision, use_07_metric=False)
        curves[name] = pr_envelope(recall, precision)

    evaluated = [name for k, name in enumerate(class_names) if num_pos[k] > 0]
    if not evaluated:
        logger.warning("evaluate_voc: no class has non-difficult ground truth; mAP is NaN")
    skipped = [name for k, name in enumerate(class_names) if num_pos[k] == 0]
    if skipped:
        logger.info(
            "evaluate_voc: %d classes without ground truth left out of the mean: %s",
            len(skipped),
            ", ".join(skipped[:20]),
        )

    def per_class(counts: np.ndarray) -> dict[str, int]:
        return {name: int(counts[k]) for k, name in enumerate(class_names)}

    def class_counts(mask: np.ndarray) -> dict[str, int]:
        return per_class(np.bincount(det_cls[mask], minlength=num_classes))

    return {
        "iou_thresh": iou_thresh,
        "class_names": class_names,
        "ap_07_11pt": ap_07,
        "ap_area": ap_area,
        "map_07_11pt": float(np.mean([ap_07[n] for n in evaluated])) if evaluated else float("nan"),
        "map_area": float(np.mean([ap_area[n] for n in evaluated])) if evaluated else float("nan"),
        "num_classes_evaluated": len(evaluated),
        "num_gt": per_class(num_pos),
        "num_gt_ignored": per_class(num_gt_ignored),
        "num_gt_difficult": per_class(np.bincount(gta["cls"][gta["difficult"]], minlength=num_classes)),
        "num_gt_crowd": per_class(
            np.bincount(gta["cls"][gta["iscrowd"] & ~gta["difficult"]], minlength=num_classes)
        ),
        "num_det": per_class(np.bincount(det_cls, minlength=num_classes)),
        "num_tp": class_counts(status == STATUS_TP),
        "num_fp": class_counts(status == STATUS_FP),
        "num_det_ignored": class_counts(status == STATUS_IGNORED),
        "recall_thresholds": PR_RECALL_THRESHOLDS.tolist(),
        "pr_curves": curves,
    }


def format_voc_table(result: dict) -> str:
    """Per-class AP table of an ``evaluate_voc`` result, with both AP definitions and their means."""
    names = result["class_names"]
    width = max([len("class")] + [len(n) for n in names] + [len("mean")]) + 2
    counts = ("num_gt", "num_gt_difficult", "num_gt_crowd", "num_det", "num_tp", "num_fp")
    titles = ("#gt", "#diff", "#crowd", "#det", "#tp", "#fp")
    header = (
        f"{'class':<{width}}"
        + "".join(f"{t:>8}" for t in titles)
        + f"   {'VOC07 11-point':>14}   {'area (VOC2010+)':>15}"
    )
    lines = [
        f"VOC AP at IoU >= {result['iou_thresh']:g} (#gt: positives; #diff, #crowd: ignored boxes; "
        "#tp, #fp: detections, the rest of #det matched an ignored box)",
        header,
        "-" * len(header),
    ]
    for name in names:
        ap07, apa = result["ap_07_11pt"][name], result["ap_area"][name]
        cells = ("n/a (no gt)", "n/a (no gt)") if np.isnan(apa) else (f"{ap07:.4f}", f"{apa:.4f}")
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{result.get(c, {}).get(name, 0):>8}" for c in counts)
            + f"   {cells[0]:>14}   {cells[1]:>15}"
        )
    lines.append("-" * len(header))
    mean_label = f"mean ({result['num_classes_evaluated']} classes)"
    pad = width + 8 * len(titles)
    lines.append(f"{mean_label:<{pad}}   {result['map_07_11pt']:>14.4f}   {result['map_area']:>15.4f}")
    return "\n".join(lines)
