"""Box arithmetic that torchvision.ops does not provide: IoU, IoA, area and clipping, in PyTorch and NumPy.

Formats are in the names: ``xyxy`` is (x1, y1, x2, y2) in continuous pixel coordinates (width x2 - x1,
no "+1"); ``wh`` is (w, h) of boxes that share a centre. NumPy functions end in ``_np``. There is no "+1"
variant: VOC's 1-based inclusive boxes become x1 = xmin - 1, x2 = xmax when read (prep/voc_xml.py), and
then the plain IoU equals the devkit's "+1" IoU term by term (see metrics/voc.py).

Use torchvision.ops directly for what it has: ``box_iou`` ([..., N, 4] x [..., M, 4] -> [..., N, M]),
``box_area``, ``box_convert``, ``clip_boxes_to_image`` (one image size), ``nms`` / ``batched_nms``. Here:

- ``box_iou_xyxy_batched``: the matcher's [N, G, A] IoU with 4 fresh [N, G, A] buffers where ``box_iou``
  makes 8 (it is the largest tensor of the matching, BENCHMARKS.md).
- ``clip_xyxy``: one size per box, for the boxes of several images in one tensor.
- ``paired_box_iou_xyxy_np`` / ``paired_box_ioa_xyxy_np``: element-wise over already paired boxes
  (evaluation matches within an image and class only); IoA is Open Images' group-of criterion.
- ``box_iou_wh_np``: IoU of (w, h) shapes at a common centre (anchor k-means).
- ``box_area_xyxy_np``: NumPy's ``box_area``.

Conventions:
- ``paired_*`` work element-wise with NumPy broadcasting: [P, 4] x [P, 4] -> [P], [G, 4] x [4] -> [G].
- NumPy ``dtype``: both inputs are cast to it first (float64 by default, as evaluation wants);
  ``dtype=None`` computes in the inputs' own dtypes with NumPy's promotion, for callers whose numbers
  must not move: RandomSampleCrop (float32 boxes, int64 window), the exported network's NMS (float32,
  as torchvision's), the original codebase's float32 k-means.
- ``paired_*``: an empty union (for IoA, a detection without area) gives 0, not NaN.

Torch is not imported: the PyTorch functions only call tensor methods, so the NumPy-only users
(utils/numpy_postprocess.py for exported networks, the VOC and Open Images evaluation,
merge_submissions.py) do not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


# --------------------------------------------------------------------------------------------------
# PyTorch


def box_iou_xyxy_batched(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of every gt box with every anchor, per image, in 4 fresh [N, G, A] buffers.

    Equal to ``torchvision.ops.box_iou(gt_boxes, anchors)`` (which broadcasts the leading N), but
    ``box_iou`` makes [N, G, A, 2] corner temporaries and a separate union: 8 fresh [N, G, A] buffers.

    Args:
        gt_boxes (Tensor[N, G, 4]): xyxy.
        anchors (Tensor[A, 4]): xyxy, positive area.

    Returns:
        Tensor[N, G, A] float32. A zero-area box (e.g. padding) has IoU 0 with everything.
    """
    gt_boxes, anchors = gt_boxes.float(), anchors.float()
    area_gt = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])  # [N, G]
    area_anchor = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # [A]
    # x and y overlaps separately: [N, G, A] temporaries instead of [N, G, A, 2]; in place after the
    # first op of each line, and union reuses inter_h's buffer: 4 fresh [N, G, A] buffers instead of 8
    # (on CPU each fresh buffer also costs its first-touch page faults).
    g = gt_boxes[:, :, None, :]  # [N, G, 1, 4]
    inter = g[..., 2].minimum(anchors[:, 2]).sub_(g[..., 0].maximum(anchors[:, 0])).clamp_(min=0)
    inter_h = g[..., 3].minimum(anchors[:, 3]).sub_(g[..., 1].maximum(anchors[:, 1])).clamp_(min=0)
    inter.mul_(inter_h)  # [N, G, A]
    union = inter_h.copy_(area_gt[:, :, None]).add_(area_anchor).sub_(inter)
    return inter.div_(union)


def clip_xyxy(boxes: Tensor, sizes_hw: Tensor) -> Tensor:
    """Boxes clipped to [0, w] x [0, h], with a size per box (a new tensor; ``boxes`` is not changed).

    ``torchvision.ops.clip_boxes_to_image`` takes one (h, w) for all boxes; here the boxes of several
    images share one tensor.

    Args:
        boxes (Tensor[..., 4]): xyxy.
        sizes_hw (Tensor[..., 2]): (h, w), broadcast against boxes' leading dims (e.g. [M, 2] for
            boxes [M, 4], or [M, 1, 2] for boxes [M, K, 4]).

    Returns:
        Tensor[..., 4] xyxy.
    """
    wh = sizes_hw.flip(-1)
    return boxes.clamp(min=0).minimum(wh.tile((2,)))  # upper bounds (w, h, w, h)


# --------------------------------------------------------------------------------------------------
# NumPy


def _cast(boxes: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return np.asarray(boxes) if dtype is None else np.asarray(boxes, dtype=dtype)


def _divide_or_zero(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else 0 (floating point, at least float32)."""
    out = np.zeros(np.broadcast_shapes(np.shape(num), np.shape(den)), np.result_type(num, den, np.float32))
    return np.divide(num, den, out=out, where=den > 0)


def box_area_xyxy_np(boxes: np.ndarray, dtype: np.dtype | None = np.float64) -> np.ndarray:
    """Area of boxes (np.ndarray[..., 4], xyxy) -> np.ndarray[...]; negative for inverted boxes."""
    boxes = _cast(boxes, dtype)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _paired_inter_xyxy_np(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Intersection area of paired boxes ([..., 4] each, xyxy, broadcast) -> [...]."""
    lt = np.maximum(boxes1[..., :2], boxes2[..., :2])  # [..., 2]
    rb = np.minimum(boxes1[..., 2:], boxes2[..., 2:])  # [..., 2]
    wh = np.clip(rb - lt, 0, None)
    return wh[..., 0] * wh[..., 1]


def paired_box_iou_xyxy_np(
    boxes1: np.ndarray, boxes2: np.ndarray, dtype: np.dtype | None = np.float64
) -> np.ndarray:
    """Element-wise IoU of paired boxes: row i of boxes1 with row i of boxes2.

    For the matrix of all pairs use ``torchvision.ops.box_iou`` (or pass boxes1[:, None] and boxes2).

    Args:
        boxes1 (np.ndarray[..., 4]): xyxy.
        boxes2 (np.ndarray[..., 4]): xyxy, broadcast against boxes1 ([P, 4] with [P, 4] or with [4]).
        dtype: cast both to it first (None: the inputs' dtypes with NumPy's promotion).

    Returns:
        np.ndarray[...]: intersection / union, 0 where the union is empty (two boxes without area).
    """
    boxes1, boxes2 = _cast(boxes1, dtype), _cast(boxes2, dtype)
    inter = _paired_inter_xyxy_np(boxes1, boxes2)
    union = box_area_xyxy_np(boxes1, None) + box_area_xyxy_np(boxes2, None) - inter
    return _divide_or_zero(inter, union)


def paired_box_ioa_xyxy_np(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, dtype: np.dtype | None = np.float64
) -> np.ndarray:
    """Element-wise intersection over the area of the first box (Open Images' group-of criterion).

    Args:
        det_boxes (np.ndarray[..., 4]): xyxy; their area is the denominator.
        gt_boxes (np.ndarray[..., 4]): xyxy, broadcast against det_boxes.
        dtype: cast both to it first (None: the inputs' dtypes with NumPy's promotion).

    Returns:
        np.ndarray[...]: intersection / area of det_boxes, 0 where that area is not positive.
    """
    det_boxes, gt_boxes = _cast(det_boxes, dtype), _cast(gt_boxes, dtype)
    return _divide_or_zero(_paired_inter_xyxy_np(det_boxes, gt_boxes), box_area_xyxy_np(det_boxes, None))


def box_iou_wh_np(whs1: np.ndarray, whs2: np.ndarray, dtype: np.dtype | None = np.float64) -> np.ndarray:
    """IoU of every (w, h) shape of whs1 with every one of whs2, aligned at a common centre.

    A common corner gives the same overlap, so this is also the original codebase's IoU at the origin.
    inter = min(w) * min(h), union = (area1 + area2) - inter, IoU = inter / union, in that order: with
    ``dtype=None`` and float32 inputs it is bit for bit the original's float32 torch arithmetic.

    Args:
        whs1 (np.ndarray[N, 2]): (w, h), > 0.
        whs2 (np.ndarray[K, 2]): (w, h), > 0.
        dtype: cast both to it first (None: the inputs' dtypes with NumPy's promotion).

    Returns:
        np.ndarray[N, K].
    """
    whs1, whs2 = _cast(whs1, dtype), _cast(whs2, dtype)
    inter = np.minimum(whs1[:, None, 0], whs2[None, :, 0]) * np.minimum(whs1[:, None, 1], whs2[None, :, 1])
    union = (whs1[:, 0] * whs1[:, 1])[:, None] + (whs2[:, 0] * whs2[:, 1])[None, :] - inter  # [N, K]
    return inter / union
