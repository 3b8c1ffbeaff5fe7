"""The original codebase's anchor k-means and its anchor measure (gurkirt/FPN.pytorch1.0, MIT).

Both work on box SHAPES only: every box (w, h) and every anchor (w, h) is moved to a common origin
(the original zeroes x1, y1 of both and takes ``jaccard``), so IoU = min(w) * min(h) / union; that is
``utils.box_ops.box_iou_wh_np`` (a common centre and a common corner give the same overlap).

The shape measure (:func:`shape_quality`) is the one of the original README's anchor table
(``get_priors_recall.py``'s ``just_whs``): per box the best IoU with any shape of the set (all levels'
shapes pooled, positions ignored); average IoU = the mean of those, recall = the share of boxes whose
best IoU is STRICTLY above 0.5. The original computed the recall as ``100.0 * torch.sum(iou > 0.5) /
count`` in PyTorch 1.0, where that arithmetic on integer tensors truncates: its table's recall figures
are whole percents, rounded down. Ours is not truncated. The other measure of our report
(``layers.kmeans.anchor_quality``: the real anchor grid, positions included, IoU >= 0.5) is not the
original's; its average IoU is never higher (a common centre is the best position for each shape).

The clustering (:func:`original_kmeans`, ``kmeans_for_anchors.py --method original``) is its
``kmeans_for_anchors.py``: ONE k-means over all 15 centres of the five levels, seeded with the
``default`` set's 15 shapes (3 per level); each box goes to the centre of highest IoU, each centre
moves to the MEAN (w, h) of its boxes, 10 iterations. Centre i stays the anchor of seed i, i.e. level
i // 3, slot i % 3: the order of the original's shipped sets. It runs in the original's units and
float32 arithmetic, so that the many exact IoU ties of the first step (a level's seeds share one area)
go where the original's went. Where ours differs: an empty cluster keeps its previous centre (the
original's mean of no boxes is NaN); the means are accumulated in float64 (the original's float32 sums
can differ in the last bit); and we stop early once the assignments no longer change, which gives the
same centres.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from layers.anchor_sets import original_anchor_fractions
from layers.anchors import DEFAULT_STRIDES
from utils.box_ops import box_iou_wh_np
from utils.errors import UserError

logger = logging.getLogger(__name__)


def best_shape_iou(whs: np.ndarray, shape_whs: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
    """Best IoU at a common origin of each box with any of the shapes.

    Args:
        whs (ndarray[N, 2]): box (w, h), > 0. shape_whs (ndarray[K, 2]): anchor shapes (w, h), > 0.

    Returns:
        ndarray[N] float64 (chunks of ``chunk_size`` boxes keep memory at chunk_size x K).
    """
    whs = np.asarray(whs, dtype=np.float64).reshape(-1, 2)
    shape_whs = np.asarray(shape_whs, dtype=np.float64).reshape(-1, 2)
    best = np.empty(whs.shape[0], dtype=np.float64)
    for start in range(0, whs.shape[0], chunk_size):
        chunk = whs[start : start + chunk_size]
        best[start : start + chunk_size] = box_iou_wh_np(chunk, shape_whs).max(axis=1)
    return best


def shape_quality(whs: np.ndarray, anchor_whs_per_level: Sequence, threshold: float = 0.5) -> Dict:
    """The original's measure of an anchor set on box shapes (see the module docstring).

    Args:
        whs (ndarray[N, 2]): box (w, h) in the units of the anchors (input pixels).
        anchor_whs_per_level (list of Tensor / ndarray [k, 2]): the set; all levels are pooled.
        threshold: a box counts as recalled when its best IoU is > threshold (strictly).

    Returns:
        dict: average_iou_shape (mean best IoU), recall_pct_shape (in %); both None without boxes.
    """
    shapes = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1, 2) for w in anchor_whs_per_level])
    if len(whs) == 0:
        return {"average_iou_shape": None, "recall_pct_shape": None}
    best = best_shape_iou(whs, shapes)
    return {
        "average_iou_shape": float(best.mean()),
        "recall_pct_shape": 100.0 * float((best > threshold).mean()),
    }


@dataclass
class OriginalKMeansResult:
    """Outcome of :func:`original_kmeans`.

    centres (ndarray[K, 2]): final (w, h), in seed order. assignments (ndarray[N]): centre of each box
    (for the final centres). num_iters: update steps run. converged: the last step changed no
    assignment. num_empty: centres with no box at the end. mean_iou: mean IoU of the boxes with their
    centre (the original's "average" line). history (list of dict): per step, the mean IoU and the
    recall (% of boxes with IoU > 0.5 to their centre) of the assignment that step started from, as the
    original prints them.
    """

    centres: np.ndarray
    assignments: np.ndarray
    num_iters: int
    converged: bool
    num_empty: int
    mean_iou: float
    history: list


def original_kmeans(
    whs: np.ndarray, init_centres: np.ndarray, max_iter: int = 10, dtype: type = np.float32
) -> OriginalKMeansResult:
    """The original's IoU k-means with the mean update (see the module docstring).

    One step: assign every box to its centre of highest IoU (ties: lower index), then move every centre
    to the mean (w, h) of its boxes (an empty one stays). At most ``max_iter`` steps; stops early when a
    step's assignment equals the previous one (the centres would not move again).

    Exact ties are common at the start: the seeds of a level have the same area, so a box that fits
    inside several of them has the same IoU (box area / seed area) with each. The original breaks them
    by float32 rounding; ``dtype=np.float32`` (the default) computes the IoU in float32 as it does, so
    with boxes and seeds in its units (fractions of the input side, see
    :func:`cluster_anchor_whs_original`) the assignments are its assignments. The means are
    accumulated in float64.

    Args:
        whs (ndarray[N, 2]): box (w, h), > 0. init_centres (ndarray[K, 2]): seeds (w, h), > 0.
        dtype: the IoU arithmetic (np.float32 as the original, or np.float64).

    Returns:
        OriginalKMeansResult (centres in float64).
    """
    whs = np.asarray(whs, dtype=dtype).reshape(-1, 2)
    centres = np.array(init_centres, dtype=dtype).reshape(-1, 2)
    k = centres.shape[0]
    if k == 0:
        raise UserError("original_kmeans needs at least one initial centre")
    if max_iter < 1:
        raise UserError(f"max_iter must be >= 1, got {max_iter}")
    if whs.shape[0] == 0:
        return OriginalKMeansResult(
            centres.astype(np.float64), np.zeros(0, dtype=np.int64), 0, True, k, float("nan"), []
        )
    rows = np.arange(whs.shape[0])
    history = []
    previous = None
    num_iters, converged = 0, False
    while num_iters < max_iter:
        # dtype=None: in ``dtype`` (float32), bit for bit the original's torch ``jaccard``.
        iou = box_iou_wh_np(whs, centres, dtype=None)  # [N, K]
        assignments = iou.argmax(axis=1)  # first maximum, as torch's max
        own = iou[rows, assignments].astype(np.float64)
        history.append({"mean_iou": float(own.mean()), "recall_pct": 100.0 * float((own > 0.5).mean())})
        if previous is not None and np.array_equal(assignments, previous):
            converged = True
            break
        num_iters += 1
        counts = np.bincount(assignments, minlength=k)  # [K]
        sums = np.stack([np.bincount(assignments, weights=whs[:, d], minlength=k) for d in range(2)], 1)
        filled = counts > 0
        centres = centres.copy()
        centres[filled] = (sums[filled] / counts[filled, None]).astype(dtype)
        previous = assignments
    iou = box_iou_wh_np(whs, centres, dtype=None)
    assignments = iou.argmax(axis=1)
    own = iou[rows, assignments].astype(np.float64)
    converged = converged or (previous is not None and np.array_equal(assignments, previous))
    num_empty = int((np.bincount(assignments, minlength=k) == 0).sum())
    return OriginalKMeansResult(
        centres.astype(np.float64), assignments, num_iters, converged, num_empty, float(own.mean()), history
    )


def cluster_anchor_whs_original(
    gt_boxes: np.ndarray, input_side: int, max_iter: int = 10, strides: Sequence[int] = DEFAULT_STRIDES
) -> Tuple[List[np.ndarray], List[Dict]]:
    """The original's clustering of a box set into 3 anchors per level (``--method original``).

    It runs in the original's units and arithmetic: boxes as float32 fractions of the input side (its
    annotations hold x1, y1, x2, y2 as fractions of the image, and w = x2 - x1 in float32; on our square
    input, pixels / input_side are those fractions), seeds as float32 fractions, seeds in its order
    (``np.unique``: sorted by w, then h) so that float32 ties go where they went; the result is returned
    in seed order and in pixels.

    Args:
        gt_boxes (ndarray[N, 4]): xyxy input pixels. input_side: the square input side; the seeds are
            the ``default`` set (``layers.anchor_sets``) at that side.

    Returns:
        (anchor_whs_per_level: list of ndarray[3, 2] input pixels, centre i of the joint k-means at level
         i // 3, slot i % 3; summary_per_level: list of dicts as ``layers.kmeans.cluster_anchor_whs``'s,
         where num_boxes counts the boxes assigned to the level's centres and mean_iou_init is their best
         IoU with any seed).
    """
    seeds_per_level = original_anchor_fractions("default", input_side, strides)
    k = seeds_per_level[0].shape[0]
    seeds = np.concatenate(seeds_per_level).astype(np.float32)  # [L * k, 2] level-major, fractions
    unique_order = np.lexsort((seeds[:, 1], seeds[:, 0]))  # np.unique's row order: w, then h
    fractions = (np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4) / input_side).astype(np.float32)
    whs = fractions[:, 2:] - fractions[:, :2]  # float32, as the original subtracts
    result = original_kmeans(whs, seeds[unique_order], max_iter=max_iter)
    if whs.shape[0] and result.num_empty:
        logger.warning("original k-means: %d centre(s) without boxes kept their seed", result.num_empty)
    centres = np.empty_like(result.centres)
    centres[unique_order] = result.centres * input_side  # back to seed order, pixels
    assignments = unique_order[result.assignments]
    level_of_box = assignments // k
    counts = np.bincount(assignments, minlength=seeds.shape[0]).reshape(-1, k)  # [L, k]
    init_iou = best_shape_iou(whs, seeds)  # [N]
    own_iou = box_iou_wh_np(whs, centres / input_side)[np.arange(whs.shape[0]), assignments]  # [N]
    summaries = []
    for level in range(len(seeds_per_level)):
        members = level_of_box == level
        summaries.append(
            {
                "level": level,
                "num_boxes": int(counts[level].sum()),
                "num_iters": result.num_iters,
                "converged": result.converged,
                "num_reseeded": 0,
                "num_empty": int((counts[level] == 0).sum()),
                "mean_iou_init": float(init_iou[members].mean()) if members.any() else None,
                "mean_iou": float(own_iou[members].mean()) if members.any() else None,
            }
        )
    return list(centres.reshape(len(seeds_per_level), k, 2)), summaries
