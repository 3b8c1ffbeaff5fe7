"""Per-level IoU k-means for anchor shapes (``--method per_level``), and the grid anchor-quality measure.

The original codebase's joint k-means and its shape measure are in ``layers/kmeans_original.py``.

Clustering (numpy, float64). Boxes are (w, h) pairs in network-input pixels; the distance between a box
and a cluster centre is ``1 - IoU`` of the two boxes aligned at a common centre (YOLOv2's k-means
distance; ``utils.box_ops.box_iou_wh_np``), so big boxes do not dominate as they would with a Euclidean
distance.

- Level assignment. Each box is given to ONE pyramid level before clustering: the level whose
  predefined one-scale anchors (the initial centres) give it the highest centred IoU (ties: the lower
  level). This is the first assignment step of a single IoU k-means over all ``L * k`` initial anchors,
  then frozen. Freezing it keeps every level in the scale band its stride was designed for (a free
  k-means over 15 centres would let centres drift to other levels' scales and leave a level empty), and
  it is close to where the matcher puts the box during training with the predefined anchors. It also
  uses the clustering's own distance, so the two steps cannot disagree about what "close" means.
- Initial centres. The predefined one-scale anchors of each level, ``predefined_anchor_whs(num_scales=1,
  aspect_ratios=...)`` with ``k`` ratios spread log-uniformly over [0.5, 2] (``kmeans_aspect_ratios``;
  k = 3 gives exactly (0.5, 1, 2), k = 1 gives (1,)). ``init="random"`` draws k distinct boxes of the
  level with a seeded generator instead (YOLO's initialisation). (The original codebase seeds one joint
  k-means with its own ``default`` set and updates with the mean: ``--method original``.)
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
clamped to the grid; the centres are evenly spaced in both of ``AnchorGenerator``'s layouts). Why that
is exact: for a fixed anchor size, the intersection is the product of the x- and y-overlaps of
intervals of fixed lengths, each non-increasing in the distance between the interval centres, and
IoU = I / (area_gt + area_anchor - I) increases with I; so the nearest cell per axis maximises it.
tests/test_kmeans.py checks it against the exhaustive box_iou.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from layers.anchors import AnchorGenerator
from utils.box_ops import box_iou_wh_np
from utils.errors import UserError

logger = logging.getLogger(__name__)

INIT_MODES = ("predefined", "random")


def kmeans_aspect_ratios(k: int) -> Tuple[float, ...]:
    """k aspect ratios (h / w) spread log-uniformly over [0.5, 2]; k = 3 -> (0.5, 1, 2), k = 1 -> (1,)."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    if k == 1:
        return (1.0,)
    return tuple(float(2.0 ** (-1.0 + 2.0 * i / (k - 1))) for i in range(k))


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
    best_per_level = np.stack([box_iou_wh_np(whs, init).max(axis=1) for init in init_whs_per_level], axis=1)
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


# Bounds slack: the triangle-inequality bounds are exact in real arithmetic; this margin keeps float
# rounding from ever skipping a box whose assignment could change.
_BOUND_SLACK = 1e-9


def _distances(whs: np.ndarray, centres: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(assignment, distance to it, distance to the second closest centre) with distance = 1 - centred IoU.

    Ties go to the lower centre index (argmax), as everywhere in the k-means.
    """
    iou = box_iou_wh_np(whs, centres)  # [N, K]
    rows = np.arange(whs.shape[0])
    assignments = iou.argmax(axis=1)
    best = iou[rows, assignments]
    if centres.shape[0] > 1:
        iou[rows, assignments] = -np.inf
        second = iou.max(axis=1)
    else:
        second = np.full(whs.shape[0], -np.inf)
    return assignments, 1.0 - best, 1.0 - second


class _ClusterMedians:
    """Exact per-cluster medians of one coordinate, updated in O(moved boxes) as boxes change cluster.

    The values are sorted once; per cluster, a histogram of its members over blocks of ``block`` ranks
    locates the block holding the median rank, and only that block is scanned. Equal to ``np.median``
    of the members (the mean of the two middle values for an even count).
    """

    def __init__(self, values: np.ndarray, assignments: np.ndarray, k: int, block: int = 512):
        num = values.shape[0]
        self.k, self.block = k, block
        self.order = np.argsort(values, kind="stable")
        self.sorted_values = values[self.order]
        rank = np.empty(num, dtype=np.int64)
        rank[self.order] = np.arange(num)
        self.block_of = rank // block
        self.num_blocks = -(-num // block)
        self.counts = self._histogram(np.arange(num), assignments)  # [K, num_blocks]

    def _histogram(self, idxs: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        flat = clusters * self.num_blocks + self.block_of[idxs]
        return np.bincount(flat, minlength=self.k * self.num_blocks).reshape(self.k, self.num_blocks)

    def move(self, idxs: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        self.counts += self._histogram(idxs, new) - self._histogram(idxs, old)

    def medians(self, assignments: np.ndarray, default: np.ndarray) -> np.ndarray:
        """ndarray[K]: median of each cluster; ``default[j]`` for an empty cluster."""
        out = default.copy()
        for j in range(self.k):  # a handful of clusters, each O(num_blocks + block)
            cum = np.cumsum(self.counts[j])
            num = int(cum[-1])
            if num == 0:
                continue
            middle = []
            for target in ((num - 1) // 2, num // 2):  # 0-based ranks among the members
                b = int(np.searchsorted(cum, target, side="right"))  # first block with cum > target
                before = int(cum[b] - self.counts[j, b])
                start = b * self.block
                in_block = np.flatnonzero(assignments[self.order[start : start + self.block]] == j)
                middle.append(self.sorted_values[start + in_block[target - before]])
            out[j] = 0.5 * (middle[0] + middle[1])
        return out


def _reseed_empty(whs: np.ndarray, centres: np.ndarray, assignments: np.ndarray) -> Tuple[np.ndarray, int]:
    """Centres with each empty cluster moved onto one of the worst-fitted boxes.

    Worst fitted = lowest IoU with its own centre; ties go to the lower box index.
    """
    empty = np.flatnonzero(np.bincount(assignments, minlength=centres.shape[0]) == 0)
    if empty.size == 0:
        return centres, 0
    own_iou = box_iou_wh_np(whs, centres)[np.arange(whs.shape[0]), assignments]
    worst = np.argsort(own_iou, kind="stable")[: empty.size]
    centres = centres.copy()
    centres[empty[: worst.size]] = whs[worst]
    return centres, int(worst.size)


def iou_kmeans(whs: np.ndarray, init_centres: np.ndarray, max_iter: int = 300) -> KMeansResult:
    """k-means on box shapes with the distance 1 - centred IoU and the median update.

    One iteration: centres = per-coordinate medians of their boxes; every box moves to its closest
    centre (ties: lower index); empty clusters are re-seeded from the worst-fitted boxes (lowest IoU to
    their centre, ties: lower index) and the boxes re-assigned. Stops when an iteration changes no
    assignment. Deterministic: nothing random inside.

    Speed (COCO-size levels take hundreds of thousands of boxes and ~100 iterations): 1 - IoU of two
    rectangles with a common centre is their Jaccard distance as point sets, a metric, so Hamerly's
    bounds apply: per box an upper bound on the distance to its centre and a lower bound on the distance
    to any other, loosened by how far the centres moved; only boxes whose bounds overlap are re-measured.
    The medians are updated from the boxes that moved (``_ClusterMedians``). The assignments, and so the
    result, are those of the plain algorithm (tests/test_kmeans.py compares them).

    Args:
        whs (ndarray[N, 2]): box (w, h), > 0.
        init_centres (ndarray[K, 2]): initial centres (w, h), > 0.
        max_iter: cap on the iterations.

    Returns:
        KMeansResult; centres are the medians of the final assignment (re-seeded clusters that stayed
        empty keep the box they were re-seeded on).
    """
    whs = np.asarray(whs, dtype=np.float64).reshape(-1, 2)
    centres = np.array(init_centres, dtype=np.float64).reshape(-1, 2)
    k = centres.shape[0]
    if k == 0:
        raise UserError("iou_kmeans needs at least one initial centre")
    if whs.shape[0] == 0:
        return KMeansResult(centres, np.zeros(0, dtype=np.int64), 0, True, 0, k, float("nan"))

    def assign_all(centres):
        assignments, upper, lower = _distances(whs, centres)
        reseeded_centres, reseeded = _reseed_empty(whs, centres, assignments)
        if reseeded:
            assignments, upper, lower = _distances(whs, reseeded_centres)
        return reseeded_centres, assignments, upper, lower, reseeded

    centres, assignments, upper, lower, num_reseeded = assign_all(centres)
    medians = [_ClusterMedians(whs[:, d], assignments, k) for d in range(2)]
    num_iters, converged = 0, False
    while num_iters < max_iter:
        num_iters += 1
        new_centres = np.stack([m.medians(assignments, centres[:, d]) for d, m in enumerate(medians)], axis=1)
        shift = 1.0 - box_iou_wh_np(centres, new_centres).diagonal()  # [K] distance each centre moved
        centres = new_centres
        # Triangle inequality: own distance grows by at most the own centre's shift, the distance to any
        # other centre shrinks by at most the largest shift among the others.
        upper += shift[assignments]
        if k > 1:
            top = int(shift.argmax())
            lower -= np.where(assignments == top, np.delete(shift, top).max(), shift[top])
        unsure = np.flatnonzero(upper + _BOUND_SLACK >= lower)
        new_assignments, upper[unsure], lower[unsure] = _distances(whs[unsure], centres)
        moved = unsure[new_assignments != assignments[unsure]]
        old = assignments[moved]
        assignments[unsure] = new_assignments
        for m in medians:
            m.move(moved, old, assignments[moved])
        if medians[0].counts.sum(axis=1).min() == 0:  # rare: an empty cluster; re-measure all, rebuild
            previous = assignments.copy()
            centres, reseeded = _reseed_empty(whs, centres, assignments)
            assignments, upper, lower = _distances(whs, centres)
            num_reseeded += reseeded
            medians = [_ClusterMedians(whs[:, d], assignments, k) for d in range(2)]
            changed = moved.size > 0 or not np.array_equal(assignments, previous)
        else:
            changed = moved.size > 0
        if not changed:
            converged = True
            break
    own_iou = box_iou_wh_np(whs, centres)[np.arange(whs.shape[0]), assignments]
    num_empty = int((np.bincount(assignments, minlength=k) == 0).sum())
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
        raise UserError(f"unknown k-means init {init!r} (expected one of {INIT_MODES})")
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
            float(box_iou_wh_np(level_whs, level_init).max(axis=1).mean()) if level_whs.shape[0] else None
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
    cells = anchor_generator.cell_sizes(grid_sizes, (input_h, input_w))
    k = anchor_generator.num_anchors_per_location
    centres = 0.5 * (gt_boxes[:, :2] + gt_boxes[:, 2:])  # [G, 2] (cx, cy)
    type_offsets = torch.arange(k, device=gt_boxes.device)
    level_start = 0
    idxs_per_level = []
    for (grid_h, grid_w), (cell_h, cell_w), num in zip(grid_sizes, cells, num_per_level):
        # Cell centres are (j + 0.5) * cell, so the nearest one to c is j = floor(c / cell).
        cell_x = torch.floor(centres[:, 0] / cell_w).long().clamp_(0, grid_w - 1)
        cell_y = torch.floor(centres[:, 1] / cell_h).long().clamp_(0, grid_h - 1)
        first = level_start + (cell_y * grid_w + cell_x) * k  # [G]
        idxs_per_level.append(first[:, None] + type_offsets[None, :])  # [G, k]
        level_start += num
    return torch.cat(idxs_per_level, dim=1)


def best_anchor_iou(
    gt_boxes: Tensor,
    anchor_generator: AnchorGenerator,
    input_h: int,
    input_w: int,
    chunk_size: int = 16384,
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
    layout: str = "stride",
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
        layout: the anchor centre layout ("stride", or "original" for the original codebase's sets).

    Returns:
        dict: num_anchors_per_location, total_anchors (mean anchors per image over the images),
        num_gt, average_iou (mean over boxes of the best anchor IoU), recall_pct (share of boxes whose
        best IoU >= positive_threshold, in %); average_iou and recall_pct are None without boxes.
    """
    generator = AnchorGenerator(anchor_whs_per_level, strides, layout=layout)
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
