"""IoU k-means for anchor shapes, and the anchor-quality numbers of the kmeans_for_anchors.py report.

Clustering (numpy, float64). Boxes are (w, h) pairs in network-input pixels; the distance between a box
and a cluster centre is ``1 - IoU`` of the two boxes aligned at a common centre (YOLOv2's k-means
distance), so big boxes do not dominate as they would with a Euclidean distance.

- Level assignment. Each box is given to ONE pyramid level before clustering: the level whose
  predefined one-scale anchors (the initial centres) give it the highest centred IoU (ties: the lower
  level). This is the first assignment step of a single IoU k-means over all ``L * k`` initial anchors,
  then frozen. Freezing it keeps every level in the scale band its stride was designed for (a free
  k-means over 15 centres would let centres drift to other levels' scales and leave a level empty), and
  it is close to where the matcher puts the box during training with the predefined anchors. It also
  uses the clustering's own distance, so the two steps cannot disagree about what "close" means.
- Initial centres. The predefined one-scale anchors of each level, ``predefined_anchor_whs(num_scales=1,
  aspect_ratios=...)`` with ``k`` ratios spread log-uniformly over [0.5, 2] (``kmeans_aspect_ratios``;
  k = 3 gives exactly (0.5, 1, 2), k = 1 gives (1,)), as the original codebase did. ``init="random"``
  draws k distinct boxes of the level with a seeded generator instead (YOLO's initialisation).
- Update. Centre = per-coordinate MEDIAN of the (w, h) of its boxes (as in YOLO's anchor k-means):
  box sizes are heavy-tailed and the median is not pulled by the few huge or tiny boxes of a level.
- Empty clusters are re-seeded from the boxes with the lowest IoU to their own centre (the worst-fitted
  boxes, ties by index), so the result is deterministic.
- Stop when the assignments no longer change, or after ``max_iter`` iterations (reported).

Anchor quality (torch). For every gt box, the best IoU with any anchor of the real anchor grid at the
training input size, positions included, with the same code training uses: anchors from
``AnchorGenerator.anchors_for_input`` and IoU from ``torchvision.ops.box_iou`` (the matcher's IoU).
Comparing each box with all ~68K anchors of a 600 x 600 input costs hours for COCO's 860K boxes, so
each box is compared with a candidate set that provably contains its best anchor: on every level and
for every anchor type, the anchor of the cell whose centre is nearest to the box centre (per axis,
clamped to the grid). Why that is exact: for a fixed anchor size, the intersection is the product of
the x- and y-overlaps of intervals of fixed lengths, each non-increasing in the distance between the
interval centres, and IoU = I / (area_gt + area_anchor - I) increases with I; so the nearest cell per
axis maximises it. tests/test_kmeans_for_anchors.py checks it against the exhaustive box_iou.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from layers.anchors import AnchorGenerator

logger = logging.getLogger(__name__)

INIT_MODES = ("predefined", "random")


def kmeans_aspect_ratios(k: int) -> Tuple[float, ...]:
    """k aspect ratios (h / w) spread log-uniformly over [0.5, 2]; k = 3 -> (0.5, 1, 2), k = 1 -> (1,)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return (1.0,)
    return tuple(float(2.0 ** (-1.0 + 2.0 * i / (k - 1))) for i in range(k))


def centred_iou(whs: np.ndarray, centre_whs: np.ndarray) -> np.ndarray:
    """IoU of boxes and centres aligned at a common centre.

    Args:
        whs (ndarray[N, 2]): (w, h) of the boxes, > 0.
        centre_whs (ndarray[K, 2]): (w, h) of the cluster centres / anchors, > 0.

    Returns:
        ndarray[N, K] float64.
    """
    whs = np.asarray(whs, dtype=np.float64)
    centre_whs = np.asarray(centre_whs, dtype=np.float64)
    inter = np.minimum(whs[:, None, 0], centre_whs[None, :, 0]) * np.minimum(
        whs[:, None, 1], centre_whs[None, :, 1]
    )  # [N, K]
    union = (whs[:, 0] * whs[:, 1])[:, None] + (centre_whs[:, 0] * centre_whs[:, 1])[None, :] - inter
    return inter / union


def assign_levels(whs: np.ndarray, init_whs_per_level: Sequence[np.ndarray]) -> np.ndarray:
    """Level of each box: the level whose initial anchors give it the highest centred IoU (ties: lower level).

    Args:
        whs (ndarray[N, 2]): box (w, h).
        init_whs_per_level (list of ndarray[k, 2]): initial anchors (w, h), one entry per level.

    Returns:
        ndarray[N] int64 level index.
    """
    whs = np.asarray(whs, dtype=np.float64)
    if whs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    # [N, L]: per-level best IoU; keeps memory at N x k per step instead of N x (L * k).
    best_per_level = np.stack([centred_iou(whs, init).max(axis=1) for init in init_whs_per_level], axis=1)
    return best_per_level.argmax(axis=1)


@dataclass
class KMeansResult:
    """Outcome of :func:`iou_kmeans`.

    centres (ndarray[K, 2]): (w, h) of the clusters. assignments (ndarray[N]): cluster of each box.
    num_iters: update steps run. converged: assignments stopped changing before ``max_iter``.
    num_reseeded: empty clusters re-seeded over the run. num_empty: clusters with no box at the end.
    mean_iou: mean over boxes of the centred IoU with their centre (nan without boxes).
    """

    centres: np.ndarray
    assignments: np.ndarray
    num_iters: int
    converged: bool
    num_reseeded: int
    num_empty: int
    mean_iou: float


def _assign(whs: np.ndarray, centres: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    iou = centred_iou(whs, centres)  # [N, K]
    assignments = iou.argmax(axis=1)
    return assignments, iou[np.arange(whs.shape[0]), assignments]


def _reseed_empty(
    whs: np.ndarray, centres: np.ndarray, assignments: np.ndarray, own_iou: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Moves each empty cluster onto one of the worst-fitted boxes (lowest IoU to own centre, ties: index)."""
    empty = np.flatnonzero(np.bincount(assignments, minlength=centres.shape[0]) == 0)
    if empty.size == 0:
        return centres, assignments, own_iou, 0
    worst = np.argsort(own_iou, kind="stable")[: empty.size]
    centres = centres.copy()
    centres[empty[: worst.size]] = whs[worst]
    assignments, own_iou = _assign(whs, centres)
    return centres, assignments, own_iou, int(worst.size)


def _median_centres(whs: np.ndarray, assignments: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per-coordinate median of each cluster's boxes; an empty cluster keeps its centre."""
    new_centres = centres.copy()
    for j in range(centres.shape[0]):  # k clusters (a handful); each step is vectorised over the boxes
        members = whs[assignments == j]
        if members.shape[0]:
            new_centres[j] = np.median(members, axis=0)
    return new_centres


def iou_kmeans(whs: np.ndarray, init_centres: np.ndarray, max_iter: int = 300) -> KMeansResult:
    """k-means on box shapes with the distance 1 - centred IoU and the median update.

    Deterministic: no randomness inside (argmax ties go to the lower cluster index, empty clusters are
    re-seeded from the worst-fitted boxes in index order).

    Args:
        whs (ndarray[N, 2]): box (w, h), > 0.
        init_centres (ndarray[K, 2]): initial centres (w, h), > 0.
        max_iter: cap on the update steps.

    Returns:
        KMeansResult; centres are the medians of the final assignment (when converged).
    """
    whs = np.asarray(whs, dtype=np.float64).reshape(-1, 2)
    centres = np.array(init_centres, dtype=np.float64).reshape(-1, 2)
    if centres.shape[0] == 0:
        raise ValueError("iou_kmeans needs at least one initial centre")
    if whs.shape[0] == 0:
        empty = np.zeros(0, dtype=np.int64)
        return KMeansResult(centres, empty, 0, True, 0, centres.shape[0], float("nan"))
    assignments, own_iou = _assign(whs, centres)
    centres, assignments, own_iou, num_reseeded = _reseed_empty(whs, centres, assignments, own_iou)
    num_iters = 0
    converged = False
    while num_iters < max_iter:
        num_iters += 1
        centres = _median_centres(whs, assignments, centres)
        new_assignments, own_iou = _assign(whs, centres)
        # Re-seed before the convergence test: a cluster emptied by this step must get its chance.
        centres, new_assignments, own_iou, reseeded = _reseed_empty(whs, centres, new_assignments, own_iou)
        num_reseeded += reseeded
        if np.array_equal(new_assignments, assignments):
            converged = True
            break
        assignments = new_assignments
    num_empty = int((np.bincount(assignments, minlength=centres.shape[0]) == 0).sum())
    return KMeansResult(
        centres, assignments, num_iters, converged, num_reseeded, num_empty, float(own_iou.mean())
    )


def cluster_anchor_whs(
    whs: np.ndarray,
    init_whs_per_level: Sequence[np.ndarray],
    max_iter: int = 300,
    init: str = "predefined",
    seed: int = 0,
) -> Tuple[List[np.ndarray], List[Dict]]:
    """Per-level anchor shapes: assign boxes to levels, then IoU k-means within each level.

    Args:
        whs (ndarray[N, 2]): (w, h) of the training boxes in network-input pixels, > 0.
        init_whs_per_level (list of ndarray[k, 2]): predefined one-scale anchors per level; they decide
            the level of each box (:func:`assign_levels`) and, with ``init="predefined"``, start the k-means.
        max_iter: k-means cap per level.
        init: "predefined" or "random" (k distinct boxes of the level drawn with ``seed``; levels with
            fewer than k boxes fall back to the predefined anchors).
        seed: seed of the random initialisation (the predefined one does not depend on it).

    Returns:
        (anchor_whs_per_level: list of ndarray[k, 2] sorted by aspect ratio h / w then area,
         summary_per_level: list of dicts with num_boxes, num_iters, converged, num_reseeded, num_empty,
         mean_iou_init (mean best centred IoU with the initial anchors), mean_iou (with the clusters)).
        A level without boxes keeps its initial anchors (num_boxes 0 in its summary).
    """
    if init not in INIT_MODES:
        raise ValueError(f"unknown k-means init {init!r} (expected one of {INIT_MODES})")
    whs = np.asarray(whs, dtype=np.float64).reshape(-1, 2)
    init_whs_per_level = [np.asarray(w, dtype=np.float64).reshape(-1, 2) for w in init_whs_per_level]
    levels = assign_levels(whs, init_whs_per_level)
    rng = np.random.default_rng(seed)
    anchor_whs_per_level, summaries = [], []
    for level, level_init in enumerate(init_whs_per_level):
        level_whs = whs[levels == level]
        k = level_init.shape[0]
        start = level_init
        if init == "random" and level_whs.shape[0] >= k:
            start = level_whs[rng.choice(level_whs.shape[0], size=k, replace=False)]
        result = iou_kmeans(level_whs, start, max_iter=max_iter)
        centres = result.centres
        # Canonical order (aspect ratio, then area) so files from different runs compare line by line.
        centres = centres[np.lexsort((centres[:, 0] * centres[:, 1], centres[:, 1] / centres[:, 0]))]
        mean_iou_init = (
            float(centred_iou(level_whs, level_init).max(axis=1).mean()) if level_whs.shape[0] else None
        )
        if level_whs.shape[0] and not result.converged:
            logger.warning("level %d: k-means stopped at max_iter=%d before converging", level, max_iter)
        if level_whs.shape[0] and result.num_empty:
            logger.warning("level %d: %d empty cluster(s) remain", level, result.num_empty)
        anchor_whs_per_level.append(centres)
        summaries.append(
            {
                "level": level,
                "num_boxes": int(level_whs.shape[0]),
                "num_iters": result.num_iters,
                "converged": result.converged,
                "num_reseeded": result.num_reseeded,
                "num_empty": result.num_empty,
                "mean_iou_init": mean_iou_init,
                "mean_iou": result.mean_iou if level_whs.shape[0] else None,
            }
        )
    return anchor_whs_per_level, summaries


def candidate_anchor_idxs(
    gt_boxes: Tensor, anchor_generator: AnchorGenerator, input_h: int, input_w: int
) -> Tensor:
    """Indices of the anchors that can be the best match of each box (see the module docstring).

    Args:
        gt_boxes (Tensor[G, 4]): xyxy input pixels.
        anchor_generator: the generator whose ``anchors_for_input(input_h, input_w)`` is indexed.

    Returns:
        Tensor[G, L * k] int64: per level, the k anchors of the cell nearest to the box centre (per axis,
        clamped to the grid), in the generator's order (level-major, cell row-major, then anchor type).
    """
    grid_sizes = anchor_generator.grid_sizes_for_input(input_h, input_w)
    num_per_level = anchor_generator.num_anchors_per_level(grid_sizes)
    k = anchor_generator.num_anchors_per_location
    centres = 0.5 * (gt_boxes[:, :2] + gt_boxes[:, 2:])  # [G, 2] (cx, cy)
    type_offsets = torch.arange(k, device=gt_boxes.device)
    level_start = 0
    idxs_per_level = []
    for (grid_h, grid_w), stride, num in zip(grid_sizes, anchor_generator.strides, num_per_level):
        # Cell centres are (j + 0.5) * stride, so the nearest one to c is j = floor(c / stride).
        cell_x = torch.floor(centres[:, 0] / stride).long().clamp_(0, grid_w - 1)
        cell_y = torch.floor(centres[:, 1] / stride).long().clamp_(0, grid_h - 1)
        first = level_start + (cell_y * grid_w + cell_x) * k  # [G]
        idxs_per_level.append(first[:, None] + type_offsets[None, :])  # [G, k]
        level_start += num
    return torch.cat(idxs_per_level, dim=1)


def best_anchor_iou(
    gt_boxes: Tensor,
    anchor_generator: AnchorGenerator,
    input_h: int,
    input_w: int,
    chunk_size: int = 65536,
) -> Tensor:
    """Best IoU of each gt box with any anchor of the grid for an input of input_h x input_w.

    Equal to ``box_iou(gt_boxes, anchor_generator.anchors_for_input(input_h, input_w)).max(1)`` but
    computed on the candidate anchors only (exact, see the module docstring), ``chunk_size`` boxes at a time.

    Args:
        gt_boxes (Tensor[G, 4]): xyxy input pixels (float32, as in training).

    Returns:
        Tensor[G] float32.
    """
    anchors = anchor_generator.anchors_for_input(input_h, input_w, gt_boxes.device)  # [A, 4]
    gt_boxes = gt_boxes.to(anchors.dtype)
    best = torch.empty(gt_boxes.shape[0], dtype=anchors.dtype, device=gt_boxes.device)
    for start in range(0, gt_boxes.shape[0], chunk_size):
        boxes = gt_boxes[start : start + chunk_size]
        candidates = anchors[candidate_anchor_idxs(boxes, anchor_generator, input_h, input_w)]  # [C, T, 4]
        # box_iou broadcasts leading dims: [C, 1, 4] x [C, T, 4] -> [C, 1, T].
        best[start : start + chunk_size] = box_iou(boxes[:, None, :], candidates).amax(dim=(1, 2))
    return best


def anchor_quality(
    gt_boxes: Tensor,
    gt_input_size_idxs: Tensor,
    input_sizes: Sequence[Tuple[int, int]],
    num_images_per_size: Sequence[int],
    anchor_whs_per_level: Sequence[Tensor],
    strides: Sequence[int],
    positive_threshold: float = 0.5,
) -> Dict:
    """Average best IoU and recall of an anchor set on gt boxes, at their training input sizes.

    Args:
        gt_boxes (Tensor[G, 4]): xyxy network-input pixels; only the boxes to count (no difficult/crowd).
        gt_input_size_idxs (Tensor[G] int64): index into ``input_sizes`` of the image of each box.
        input_sizes (list of (h, w)): distinct network input sizes (one grid each).
        num_images_per_size (list of int): images with each input size (for the anchors-per-image mean).
        anchor_whs_per_level (list of Tensor[k, 2]): the anchor set.
        strides: level strides, P3 first.
        positive_threshold: IoU a box needs with some anchor to count as recalled (the matcher's).

    Returns:
        dict: num_anchors_per_location, total_anchors (mean anchors per image over the images),
        num_gt, average_iou (mean over boxes of the best anchor IoU), recall_pct (share of boxes whose
        best IoU >= positive_threshold, in %); average_iou and recall_pct are None without boxes.
    """
    generator = AnchorGenerator(anchor_whs_per_level, strides)
    gt_input_size_idxs = torch.as_tensor(gt_input_size_idxs, dtype=torch.int64)
    best = torch.zeros(gt_boxes.shape[0], dtype=torch.float32)
    order = torch.argsort(gt_input_size_idxs, stable=True)
    counts = torch.bincount(gt_input_size_idxs, minlength=len(input_sizes)).tolist()
    total_anchors = 0
    start = 0
    for (h, w), num_boxes, num_images in zip(input_sizes, counts, num_images_per_size):
        # One grid per distinct input size (a handful), boxes of that size in one vectorised call.
        grid_sizes = generator.grid_sizes_for_input(h, w)
        total_anchors += num_images * sum(generator.num_anchors_per_level(grid_sizes))
        if num_boxes:
            idxs = order[start : start + num_boxes]
            best[idxs] = best_anchor_iou(gt_boxes[idxs].float(), generator, int(h), int(w))
            generator.clear_cache()
        start += num_boxes
    num_images = int(sum(num_images_per_size))
    num_gt = int(gt_boxes.shape[0])
    return {
        "num_anchors_per_location": generator.num_anchors_per_location,
        "total_anchors": round(total_anchors / num_images) if num_images else 0,
        "num_gt": num_gt,
        "average_iou": float(best.mean()) if num_gt else None,
        "recall_pct": 100.0 * float((best >= positive_threshold).float().mean()) if num_gt else None,
    }
