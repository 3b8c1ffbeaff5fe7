"""Open Images detection challenge metric.

Semantics are those of the reference implementation, the TensorFlow Object Detection API's
``OpenImagesDetectionChallengeEvaluator`` (object_detection_evaluation.py, per_image_evaluation.py,
metrics.py) together with its label expansion (dataset_tools/oid_hierarchical_labels_expansion.py):

- Hierarchy. Ground-truth boxes and verified-present image labels are expanded to every ancestor class,
  verified-absent labels to every descendant; detections are not expanded. Only ``Subcategory`` links
  count (``Part`` links are not an is-a relation; the reference ignores them too) and the tree's root
  (the virtual "Entity") is skipped. A class reachable through two paths gets each ancestor once: the
  reference's parent lists can then repeat an ancestor, which would duplicate that box in its expanded
  ground truth. An expanded box that coincides with a box annotated for the ancestor itself is kept, as
  the reference keeps it (it is a second object to find). Pass ``hierarchy`` only for ground truth that
  is not expanded yet (prep/openimages.py writes it unexpanded).
- Which classes count in an image. A class is evaluated in an image when it is a verified label there,
  present or absent, after expansion, or when the image has a ground-truth box of it (the reference takes
  the union of the image-level labels and the box labels). Detections of any other class in that image
  are ignored: neither true nor false positives.
- Per image and class, detections in descending score are matched to non-group-of boxes first: the box
  with the largest IoU (first in file order on ties); IoU >= iou_thresh and box not yet taken -> TP;
  box already taken -> not a TP, and the detection goes on to the group-of stage; below the threshold
  -> goes on too. A detection whose best box is ``difficult`` is ignored (Open Images has none; the
  reference's generic evaluator does this and so do we).
- Group-of boxes (``iscrowd=1``). Detections left over are matched to the group-of box with the largest
  intersection over the detection's area (IoA) >= iou_thresh. Each group-of box that is hit yields one
  true positive worth ``group_of_weight`` w (the reference ``OpenImagesChallengeEvaluator``'s argument;
  1 in the challenge's ``OpenImagesDetectionChallengeEvaluator`` and our default) carrying the highest
  score among its detections, and the detections themselves are ignored. Like the reference, the
  highest score has to be > 0, and w > 0, for the true positive to be added (w = 0 makes group-of boxes
  pure ignore regions). Everything else is a false positive. Each group-of box counts as w positives.
- Precision and recall with weighted true positives, as the reference's ``compute_precision_recall``:
  after each ranked entry, precision = cum_tp / (cum_tp + cum_fp) and recall = cum_tp / num_positives,
  where a group-of true positive adds w to cum_tp, an ordinary one 1, and a false positive 1 to cum_fp;
  num_positives = #ordinary non-difficult boxes + w * #group-of non-difficult boxes. With w = 1 this is
  the plain count (entries / position).
- AP per class is the all-point area under the precision/recall curve (the reference's
  ``compute_average_precision``, which is the VOC2010+ definition); mAP is the mean over classes that
  have positives (num_positives > 0); other classes get NaN.
- Detections with zero width or height are removed (as the reference's ``_remove_invalid_boxes``) and
  counted.

Differences from the reference, none of which changes a number on well-formed input: detections of image
ids that are not in the ground truth raise ValueError (the reference ignores them), detections of unknown
categories raise too, score ties are broken by input order (the reference's quicksort order is
arbitrary), and there is no cap at 10,000 detections per image and class (the reference's disabled NMS
keeps the top 10,000).

IoU and IoA do not change when x and y are scaled by different factors, so they are computed in absolute
pixels, while the reference uses normalised coordinates.
"""

import logging
from collections.abc import Iterable

import numpy as np

from metrics.oid.arrays import oid_gt_arrays
from metrics.oid.hierarchy import load_hierarchy
from metrics.voc import (
    PR_RECALL_THRESHOLDS,
    best_match_per_detection,
    detections_to_arrays,
    first_occurrence_mask,
    lookup_or_fill,
    map_detections,
    pairs_within_groups,
    pr_envelope,
    rank_by_class_and_score,
    voc_ap,
)
from utils.box_ops import paired_box_ioa_xyxy_np, paired_box_iou_xyxy_np
from utils.errors import UserError

logger = logging.getLogger(__name__)


def evaluate_oid(
    gt: dict,
    detections: list[dict],
    hierarchy: str | dict | None = None,
    iou_thresh: float = 0.5,
    category_ids: Iterable[int] | None = None,
    group_of_weight: float = 1.0,
) -> dict:
    """Open Images detection challenge AP per class and mAP (see the module docstring for the rules).

    Args:
        gt (dict): common-format ground truth: images with ``verified_present`` / ``verified_absent``
            (category ids; missing = none), annotations (``iscrowd=1`` = group-of), categories with ``mid``.
        detections (list[dict]): COCO results {"image_id", "category_id", "bbox" [x, y, w, h] abs px,
            "score"}.
        hierarchy (str | dict | None): anything ``load_hierarchy`` accepts; when given, ``gt`` is expanded
            first (it must not be expanded already). None: no expansion.
        iou_thresh (float): in (0, 1]; IoU for ordinary boxes and IoA for group-of boxes.
        category_ids (Iterable[int] | None): evaluate only these categories of ``gt`` (a model trained on a
            class subset), kept after the expansion, so a parent class gets the boxes and labels of children
            outside the subset; detections must be of these categories. None: every category of ``gt``.
        group_of_weight (float): w in [0, 1], what one group-of box counts as (positives) and what its
            one true positive is worth. 1: the challenge metric.

    Returns:
        dict with ap {class name: AP, NaN without positives}, map, num_classes_evaluated, class_names,
        mids, iou_thresh, group_of_weight, per-class counts: num_gt (non-difficult boxes, group-of
        included), num_gt_group_of, num_gt_difficult, num_positives (float: ordinary + w * group-of),
        num_det (input), num_tp (entries: ordinary and group-of true positives), num_tp_group_of,
        num_fp, num_ignored_unverified (class not verified in that image), num_ignored_group_of
        (absorbed by a group-of box), num_ignored_difficult, num_invalid (zero width or height); and
        the curves: recall_thresholds [101] and pr_curves {class name: precision [101]} (the precision
        envelope at those recalls, 0 beyond the last recall; see ``metrics.voc.pr_envelope``).
    """
    if not 0.0 < iou_thresh <= 1.0:
        raise UserError(f"evaluate_oid: iou_thresh must be in (0, 1], got {iou_thresh}")
    if not 0.0 <= group_of_weight <= 1.0:
        raise UserError(f"evaluate_oid: group_of_weight must be in [0, 1], got {group_of_weight}")
    ancestors = None
    if hierarchy is not None:
        mids = [c.get("mid") for c in gt["categories"]]
        if not all(mids):
            raise UserError("evaluate_oid: a hierarchy needs a 'mid' for every category")
        ancestors = load_hierarchy(hierarchy, mids)
    # = gt_to_arrays(select_categories(expand_ground_truth(gt, ancestors), category_ids)), vectorised
    # (that dict path is the reference in tests/test_oid_eval_reference.py).
    num_boxes = len(gt["annotations"])
    gta, evaluatable_keys, categories = oid_gt_arrays(gt, ancestors, category_ids)
    if ancestors is not None:
        logger.info("OID hierarchy expansion: %d boxes -> %d", num_boxes, len(gta["cls"]))
    det = detections_to_arrays(detections)
    det_img, det_cls = map_detections(gta, det, "evaluate_oid")
    class_names = gta["class_names"]
    num_classes = len(class_names)
    scores, boxes = det["scores"], det["boxes"]

    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    det_keys = det_img * num_classes + det_cls
    evaluatable = np.isin(det_keys, evaluatable_keys)
    unverified = valid & ~evaluatable
    kept = np.flatnonzero(valid & evaluatable)
    if (~valid).any():
        logger.warning("evaluate_oid: %d detections with zero width or height removed", int((~valid).sum()))

    # Everything below works on the kept detections, indexed 0..N-1.
    k_keys, k_scores, k_boxes = det_keys[kept], scores[kept], boxes[kept]
    ranking = rank_by_class_and_score(det_cls[kept], k_scores)
    num_kept = len(kept)
    gt_keys = gta["img"] * num_classes + gta["cls"]
    group_of, difficult = gta["iscrowd"], gta["difficult"]

    # Stage 1: ordinary boxes, IoU.
    normal_idx = np.flatnonzero(~group_of)
    d_idx, g_idx = pairs_within_groups(k_keys, gt_keys[normal_idx])
    ious = paired_box_iou_xyxy_np(k_boxes[d_idx], gta["boxes"][normal_idx[g_idx]])
    max_iou, best = best_match_per_detection(num_kept, d_idx, g_idx, ious)
    best_gt = lookup_or_fill(normal_idx, best, -1)
    matched = max_iou >= iou_thresh
    ignored_difficult = matched & lookup_or_fill(difficult, best_gt, False)
    candidates = matched & ~ignored_difficult
    is_tp = np.zeros(num_kept, dtype=bool)
    is_tp[ranking[first_occurrence_mask(best_gt[ranking], candidates[ranking])]] = True

    # Stage 2: left-over detections against group-of boxes, IoA.
    left = ~is_tp & ~ignored_difficult
    group_idx = np.flatnonzero(group_of)
    d_idx, g_idx = pairs_within_groups(k_keys, gt_keys[group_idx])
    ioas = paired_box_ioa_xyxy_np(k_boxes[d_idx], gta["boxes"][group_idx[g_idx]])
    max_ioa, best = best_match_per_detection(num_kept, d_idx, g_idx, ioas)
    best_group = lookup_or_fill(group_idx, best, -1)
    in_group = left & (max_ioa >= iou_thresh)
    in_difficult_group = in_group & lookup_or_fill(difficult, best_group, False)
    hits_group = in_group & ~in_difficult_group
    # One true positive per group-of box, represented by its first detection in ranking order, which has
    # the highest score among the box's detections (ranking is score-descending within a class).
    first_hit = ranking[first_occurrence_mask(best_group[ranking], hits_group[ranking])]
    # The reference keeps max scores > 0 and weights > 0 only.
    group_tp = first_hit[k_scores[first_hit] > 0] if group_of_weight > 0 else first_hit[:0]
    is_fp = left & ~in_group

    # Ranked entries: true positives, false positives and one entry per hit group-of box, each at the
    # ranking position of its detection (class-major, score descending, stable).
    entry = np.zeros(num_kept, dtype=np.int8)  # 0 = none, 1 = TP, 2 = FP
    entry[is_tp] = 1
    entry[group_tp] = 1
    entry[is_fp] = 2
    ranked = ranking[entry[ranking] > 0]
    ranked_cls = det_cls[kept][ranked]
    is_group_tp = np.zeros(num_kept, dtype=bool)
    is_group_tp[group_tp] = True
    tp_weight = np.where(is_group_tp, group_of_weight, 1.0)
    ranked_tp = np.where(entry[ranked] == 1, tp_weight[ranked], 0.0)
    ranked_fp = (entry[ranked] == 2).astype(np.float64)
    run_bounds = np.searchsorted(ranked_cls, np.arange(num_classes + 1))

    positives = ~difficult
    num_gt = np.bincount(gta["cls"][positives], minlength=num_classes)
    num_gt_group_of = np.bincount(gta["cls"][positives & group_of], minlength=num_classes)
    num_pos = (num_gt - num_gt_group_of) + group_of_weight * num_gt_group_of
    ap, curves = {}, {}
    for k, name in enumerate(class_names):
        if num_pos[k] == 0:
            ap[name] = float("nan")
            continue
        cum_tp = np.cumsum(ranked_tp[run_bounds[k] : run_bounds[k + 1]])
        cum_fp = np.cumsum(ranked_fp[run_bounds[k] : run_bounds[k + 1]])
        recall = cum_tp / num_pos[k]
        precision = cum_tp / np.maximum(cum_tp + cum_fp, np.finfo(np.float64).tiny)
        ap[name] = voc_ap(recall, precision, use_07_metric=False)
        curves[name] = pr_envelope(recall, precision)
    evaluated = [name for k, name in enumerate(class_names) if num_pos[k] > 0]
    if not evaluated:
        logger.warning("evaluate_oid: no class has ground truth; mAP is NaN")

    def per_class(counts: np.ndarray) -> dict[str, int]:
        return {name: int(counts[k]) for k, name in enumerate(class_names)}

    def kept_counts(mask: np.ndarray) -> dict[str, int]:
        return per_class(np.bincount(det_cls[kept][mask], minlength=num_classes))

    group_ignored = hits_group.copy()
    group_ignored[group_tp] = False
    return {
        "iou_thresh": iou_thresh,
        "class_names": class_names,
        "mids": [c.get("mid", "") for c in categories],
        "ap": ap,
        "map": float(np.mean([ap[n] for n in evaluated])) if evaluated else float("nan"),
        "num_classes_evaluated": len(evaluated),
        "group_of_weight": group_of_weight,
        "num_gt": per_class(num_gt),
        "num_gt_group_of": per_class(num_gt_group_of),
        "num_gt_difficult": per_class(np.bincount(gta["cls"][difficult], minlength=num_classes)),
        "num_positives": {name: float(num_pos[k]) for k, name in enumerate(class_names)},
        "num_det": per_class(np.bincount(det_cls, minlength=num_classes)),
        "num_tp": kept_counts(entry == 1),
        "num_tp_group_of": kept_counts(is_group_tp),
        "num_fp": kept_counts(is_fp),
        "num_ignored_unverified": per_class(np.bincount(det_cls[unverified], minlength=num_classes)),
        "num_ignored_group_of": kept_counts(group_ignored | in_difficult_group),
        "num_ignored_difficult": kept_counts(ignored_difficult),
        "num_invalid": per_class(np.bincount(det_cls[~valid], minlength=num_classes)),
        "recall_thresholds": PR_RECALL_THRESHOLDS.tolist(),
        "pr_curves": curves,
    }


def format_oid_table(result: dict) -> str:
    """Per-class AP table of an ``evaluate_oid`` result and the mean.

    Columns: #gt (non-difficult boxes after the expansion, group-of included), #group (group-of boxes
    among them), #diff (difficult boxes), #det (detections given), #tp (ordinary and group-of true
    positives), #fp, #unverif (detections ignored: class not verified in the image), AP.
    """
    names, mids = result["class_names"], result["mids"]
    width = max([len("class")] + [len(n) for n in names]) + 2
    mid_width = max([len("mid")] + [len(m) for m in mids]) + 2
    columns = (
        ("#gt", "num_gt", 7),
        ("#group", "num_gt_group_of", 8),
        ("#diff", "num_gt_difficult", 7),
        ("#det", "num_det", 8),
        ("#tp", "num_tp", 7),
        ("#fp", "num_fp", 7),
        ("#unverif", "num_ignored_unverified", 10),
    )
    header = (
        f"{'class':<{width}}{'mid':<{mid_width}}"
        + "".join(f"{t:>{w}}" for t, _, w in columns)
        + f"   {'AP':>8}"
    )
    weight = result.get("group_of_weight", 1.0)
    title = f"Open Images challenge AP (all-point, IoU/IoA >= {result['iou_thresh']:g}"
    title += ")" if weight == 1.0 else f", group-of weight {weight:g})"
    lines = [title, header, "-" * len(header)]
    for name, mid in zip(names, mids):
        ap = result["ap"][name]
        lines.append(
            f"{name:<{width}}{mid:<{mid_width}}"
            + "".join(f"{result.get(key, {}).get(name, 0):>{w}}" for _, key, w in columns)
            + f"   {'n/a' if np.isnan(ap) else f'{ap:.4f}':>8}"
        )
    lines.append("-" * len(header))
    label = f"mAP ({result['num_classes_evaluated']} classes with ground truth)"
    lines.append(f"{label:<{len(header) - 11}}   {result['map']:>8.4f}")
    return "\n".join(lines)
