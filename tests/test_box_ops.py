"""utils/box_ops.py: hand-computed values, torchvision.ops as reference, batched vs single, empty inputs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_area, box_iou, clip_boxes_to_image, nms

from layers.anchors import AnchorGenerator, predefined_anchor_whs
from utils.box_ops import (
    box_area_xyxy_np,
    box_iou_wh_np,
    box_iou_xyxy_batched,
    clip_xyxy,
    paired_box_ioa_xyxy_np,
    paired_box_iou_xyxy_np,
)
from utils.numpy_postprocess import nms as nms_np


def random_boxes(rng: np.random.Generator, n: int, size: float = 50.0) -> np.ndarray:
    """np.float64[n, 4] xyxy with positive width and height."""
    xy = rng.uniform(0, size, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(0.5, size, (n, 2))], axis=1)


# --------------------------------------------------------------------------------------------------
# box_iou_xyxy_batched


def test_box_iou_xyxy_batched_hand_computed():
    gt = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]])  # [1, 2, 4]: a box and padding
    anchors = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou = box_iou_xyxy_batched(gt, anchors)
    # [0, 0, 2, 2] vs [1, 1, 3, 3]: intersection 1, union 4 + 4 - 1 = 7.
    assert torch.equal(iou, torch.tensor([[[1 / 7, 1.0, 0.0], [0.0, 0.0, 0.0]]]))


def test_box_iou_xyxy_batched_equals_torchvision():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(3, 7, 2, generator=g) * 50
    gt = torch.cat([xy, xy + 1 + torch.rand(3, 7, 2, generator=g) * 30], dim=-1)
    anchors = AnchorGenerator(
        predefined_anchor_whs(2, base_sizes=(12, 24)), strides=(8, 16)
    ).anchors_for_input(64, 64)
    iou = box_iou_xyxy_batched(gt, anchors)
    assert iou.shape == (3, 7, anchors.shape[0])
    for i in range(3):
        assert torch.equal(iou[i], box_iou(gt[i], anchors))
        # Batched vs one image at a time.
        assert torch.equal(iou[i], box_iou_xyxy_batched(gt[i : i + 1], anchors)[0])
    # float64 input: float32 result, as in training.
    assert torch.equal(box_iou_xyxy_batched(gt.double(), anchors.double()), iou)


def test_box_iou_xyxy_batched_empty_and_inputs_untouched():
    anchors = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    assert box_iou_xyxy_batched(torch.zeros(2, 0, 4), anchors).shape == (2, 0, 1)
    assert box_iou_xyxy_batched(torch.zeros(0, 3, 4), anchors).shape == (0, 3, 1)
    assert box_iou_xyxy_batched(torch.ones(2, 3, 4), torch.zeros(0, 4)).shape == (2, 3, 0)
    gt = torch.tensor([[[1.0, 1.0, 3.0, 5.0]]])
    gt_before, anchors_before = gt.clone(), anchors.clone()
    box_iou_xyxy_batched(gt, anchors)
    assert torch.equal(gt, gt_before) and torch.equal(anchors, anchors_before)


# --------------------------------------------------------------------------------------------------
# clip_xyxy


def test_clip_xyxy_hand_computed_and_input_untouched():
    boxes = torch.tensor([[-5.0, -1.0, 20.0, 8.0], [2.0, 3.0, 4.0, 5.0]])
    sizes_hw = torch.tensor([[6.0, 10.0], [4.0, 3.0]])  # (h, w) per box
    before = boxes.clone()
    clipped = clip_xyxy(boxes, sizes_hw)
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 10.0, 6.0], [2.0, 3.0, 3.0, 4.0]]))
    assert torch.equal(boxes, before)


def test_clip_xyxy_equals_torchvision_per_image_and_broadcasts():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 5, 3, 4, generator=g) * 120 - 20  # [images, boxes, classes, 4]
    sizes = [(70.0, 90.0), (100.0, 40.0)]
    sizes_hw = torch.tensor(sizes)[:, None, None, :]  # [2, 1, 1, 2]
    clipped = clip_xyxy(boxes, sizes_hw)
    for i, size in enumerate(sizes):
        assert torch.equal(clipped[i], clip_boxes_to_image(boxes[i], size))
    # Boxes of several images flattened into one tensor, one size per box.
    flat = clip_xyxy(boxes.reshape(-1, 4), sizes_hw.expand(2, 5, 3, 2).reshape(-1, 2))
    assert torch.equal(flat, clipped.reshape(-1, 4))
    assert clip_xyxy(torch.zeros(0, 4), torch.zeros(0, 2)).shape == (0, 4)


# --------------------------------------------------------------------------------------------------
# NumPy: area, paired IoU and IoA


def test_box_area_xyxy_np_hand_computed_and_torchvision():
    assert box_area_xyxy_np(np.array([[1, 2, 4, 7], [0, 0, 0, 5]])).tolist() == [15.0, 0.0]
    boxes = random_boxes(np.random.default_rng(0), 20)
    np.testing.assert_array_equal(box_area_xyxy_np(boxes), box_area(torch.from_numpy(boxes)).numpy())
    assert box_area_xyxy_np(np.zeros((0, 4))).shape == (0,)


def test_paired_box_iou_xyxy_np_hand_computed():
    boxes1 = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1], [3, 3, 3, 3]])
    boxes2 = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [1, 0, 2, 1], [3, 3, 3, 3]])
    iou = paired_box_iou_xyxy_np(boxes1, boxes2)
    # 1 / 7 (see above); identical; touching edges; two empty boxes: empty union -> 0, not NaN.
    np.testing.assert_array_equal(iou, [1 / 7, 1.0, 0.0, 0.0])
    assert iou.dtype == np.float64  # integers in, float64 out (the default dtype)


def test_paired_box_iou_xyxy_np_equals_torchvision_pairs_and_matrix():
    rng = np.random.default_rng(1)
    boxes1, boxes2 = random_boxes(rng, 30), random_boxes(rng, 30)
    matrix = box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()  # [30, 30] float64
    np.testing.assert_array_equal(paired_box_iou_xyxy_np(boxes1, boxes2), np.diagonal(matrix))
    # Broadcasting: [N, 1, 4] x [M, 4] is the matrix, [G, 4] x [4] one box against many.
    np.testing.assert_array_equal(paired_box_iou_xyxy_np(boxes1[:, None], boxes2), matrix)
    np.testing.assert_array_equal(paired_box_iou_xyxy_np(boxes1, boxes2[3]), matrix[:, 3])
    # dtype=None keeps float32 arithmetic, as torchvision's on float32 boxes.
    b1, b2 = boxes1.astype(np.float32), boxes2.astype(np.float32)
    got = paired_box_iou_xyxy_np(b1[:, None], b2, dtype=None)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, box_iou(torch.from_numpy(b1), torch.from_numpy(b2)).numpy())


def test_paired_box_iou_xyxy_np_keeps_the_crops_promotion():
    """RandomSampleCrop passes float32 boxes and an int64 window with dtype=None: the result is the
    crop's earlier formula (float32 box areas, float64 overlaps) bit for bit, so seeded crops stay."""
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 50, size=300.0).astype(np.float32)
    rect = np.array([17, 40, 251, 199])
    lt, rb = np.maximum(boxes[:, :2], rect[:2]), np.minimum(boxes[:, 2:], rect[2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area_boxes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_rect = (rect[2] - rect[0]) * (rect[3] - rect[1])
    expected = inter / np.maximum(area_boxes + area_rect - inter, 1e-12)
    np.testing.assert_array_equal(paired_box_iou_xyxy_np(boxes, rect, dtype=None), expected)
    # The float64 default differs in the last bits: the dtype choice is real.
    assert not np.array_equal(paired_box_iou_xyxy_np(boxes, rect), expected)


def test_paired_box_ioa_xyxy_np_hand_computed_and_reference():
    det = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 5, 9], [0, 0, 4, 4]])
    gt = np.array([[1, 1, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [8, 8, 9, 9]])
    # 1 of 4 inside; all inside (IoA 1 where IoU is 4 / 100); a detection without area -> 0; disjoint.
    np.testing.assert_array_equal(paired_box_ioa_xyxy_np(det, gt), [0.25, 1.0, 0.0, 0.0])
    # Reference from torchvision's IoU: inter = IoU * (area1 + area2) / (1 + IoU).
    rng = np.random.default_rng(3)
    d, g = random_boxes(rng, 40), random_boxes(rng, 40)
    iou = np.diagonal(box_iou(torch.from_numpy(d), torch.from_numpy(g)).numpy())
    inter = iou * (box_area_xyxy_np(d) + box_area_xyxy_np(g)) / (1 + iou)
    np.testing.assert_allclose(
        paired_box_ioa_xyxy_np(d, g), inter / box_area_xyxy_np(d), rtol=1e-12, atol=1e-15
    )
    assert paired_box_ioa_xyxy_np(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)


def test_paired_np_empty_inputs():
    assert paired_box_iou_xyxy_np(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)
    assert paired_box_iou_xyxy_np(np.zeros((0, 4)), np.array([0, 0, 1, 1])).shape == (0,)
    assert paired_box_iou_xyxy_np(np.zeros((0, 1, 4)), np.zeros((3, 4))).shape == (0, 3)


# --------------------------------------------------------------------------------------------------
# box_iou_wh_np


def test_box_iou_wh_np_hand_computed():
    # (2, 4) vs (4, 2): intersection 2 x 2 = 4, union 8 + 8 - 4 = 12; (2, 4) vs (1, 1): 1 / 8.
    iou = box_iou_wh_np(np.array([[2.0, 4.0]]), np.array([[4.0, 2.0], [1.0, 1.0], [2.0, 4.0]]))
    np.testing.assert_allclose(iou, [[1 / 3, 1 / 8, 1.0]])


def test_box_iou_wh_np_is_the_iou_of_centred_and_of_corner_boxes():
    rng = np.random.default_rng(4)
    whs1, whs2 = rng.uniform(1, 60, (25, 2)), rng.uniform(1, 60, (9, 2))
    iou = box_iou_wh_np(whs1, whs2)
    assert iou.shape == (25, 9) and iou.dtype == np.float64
    at_corner = box_iou(
        torch.from_numpy(np.concatenate([np.zeros_like(whs1), whs1], 1)),
        torch.from_numpy(np.concatenate([np.zeros_like(whs2), whs2], 1)),
    ).numpy()
    np.testing.assert_array_equal(iou, at_corner)
    centred = box_iou(
        torch.from_numpy(np.concatenate([-whs1 / 2, whs1 / 2], 1)),
        torch.from_numpy(np.concatenate([-whs2 / 2, whs2 / 2], 1)),
    ).numpy()
    np.testing.assert_allclose(iou, centred, rtol=1e-12)
    # dtype=None: float32 stays float32 (the original codebase's k-means arithmetic).
    got = box_iou_wh_np(whs1.astype(np.float32), whs2.astype(np.float32), dtype=None)
    assert got.dtype == np.float32
    assert box_iou_wh_np(np.zeros((0, 2)), whs2).shape == (0, 9)
    assert box_iou_wh_np(whs1, np.zeros((0, 2))).shape == (25, 0)


# --------------------------------------------------------------------------------------------------
# Users


def test_numpy_nms_equals_torchvision():
    """utils/numpy_postprocess.nms (built on paired_box_iou_xyxy_np) keeps what torchvision.ops.nms keeps,
    including score ties (stable) and empty boxes (IoU 0 here, NaN in torchvision: kept by both)."""
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 200, size=80.0).astype(np.float32)
    boxes[:5] = [10, 10, 10, 10]  # empty boxes
    scores = np.round(rng.uniform(0, 1, 200), 2).astype(np.float32)  # with ties
    for thresh in (0.3, 0.5, 1.0):
        expected = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh).numpy()
        np.testing.assert_array_equal(nms_np(boxes, scores, thresh), expected)
    assert nms_np(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)


def test_numpy_users_do_not_load_torch():
    """The module docstring's promise: the NumPy-only modules import box_ops without torch."""
    code = (
        "import sys, utils.box_ops, metrics.voc, metrics.oid.metric, utils.numpy_postprocess; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("fn", [paired_box_iou_xyxy_np, paired_box_ioa_xyxy_np])
def test_paired_np_do_not_change_inputs(fn):
    boxes1, boxes2 = np.array([[0.0, 0.0, 2.0, 2.0]]), np.array([[1.0, 1.0, 3.0, 3.0]])
    before1, before2 = boxes1.copy(), boxes2.copy()
    fn(boxes1, boxes2)
    assert np.array_equal(boxes1, before1) and np.array_equal(boxes2, before2)
