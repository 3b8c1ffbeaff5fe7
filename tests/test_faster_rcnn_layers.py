"""Faster R-CNN's layers: the target conversion (layers/faster_rcnn_losses.py) and the batched
post-processor (layers/faster_rcnn_postprocess.py), against hand-computed values and torchvision's
RoIHeads."""

import math

import pytest
import torch
from faster_rcnn_helpers import target
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import nms

from layers.faster_rcnn_losses import convert_targets
from layers.faster_rcnn_postprocess import FasterRCNNPostProcess


def test_convert_targets_drops_and_counts_ignore_difficult_and_crowd_boxes():
    targets = [
        target(
            [[0, 0, 10, 10], [5, 5, 20, 30], [1, 1, 4, 4], [2, 2, 8, 9]],
            [0, -1, 2, 1],
            (64, 64),
            difficult=[False, False, True, False],
            iscrowd=[False, True, True, False],
        ),
        target([[3, 4, 30, 40]], [-1], (64, 64)),
        target([], [], (64, 64)),
    ]
    converted, counts = convert_targets(targets)
    assert counts == {"dropped": 3, "ignore_label": 2, "difficult": 1, "crowd": 2}
    torch.testing.assert_close(converted[0]["boxes"], torch.tensor([[0.0, 0, 10, 10], [2, 2, 8, 9]]))
    assert converted[0]["labels"].tolist() == [1, 2]  # 0 is torchvision's background
    assert converted[1]["boxes"].shape == (0, 4) and converted[2]["labels"].shape == (0,)
    with pytest.raises(ValueError, match="img7.png"):
        convert_targets([target([[10, 10, 10, 20]], [0], (64, 64), image_id=7)])


def _random_roi_outputs(num_rois_per_image, image_sizes, num_classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    proposals = []
    for n, (h, w) in zip(num_rois_per_image, image_sizes):
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(n, 2, generator=generator) * torch.tensor([w, h]) * 0.5 + 2
        proposals.append(torch.cat([xy, xy + wh], 1))
    total = sum(num_rois_per_image)
    return {
        "proposals": proposals,
        "class_logits": torch.randn(total, num_classes + 1, generator=generator) * 3,
        "box_regression": torch.randn(total, 4 * (num_classes + 1), generator=generator),
    }


def test_postprocess_matches_torchvision_roi_heads_per_image():
    num_classes, sizes = 4, [(80, 120), (100, 90), (64, 64)]
    outputs = _random_roi_outputs([300, 200, 0], sizes, num_classes)
    targets = [target([], [], size) for size in sizes]
    reference = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 40)
    ref_boxes, ref_scores, ref_labels = reference.postprocess_detections(
        outputs["class_logits"], outputs["box_regression"], outputs["proposals"], sizes
    )
    ours = FasterRCNNPostProcess(score_thresh=0.05, nms_thresh=0.5, detections_per_img=40)(outputs, targets)
    assert len(ref_boxes[0]) == 40 and 0 < len(ref_boxes[1]) and len(ref_boxes[2]) == 0
    for det, boxes, scores, labels in zip(ours, ref_boxes, ref_scores, ref_labels):
        torch.testing.assert_close(det["boxes"], boxes)
        torch.testing.assert_close(det["scores"], scores)
        assert torch.equal(det["labels"], labels - 1)  # ours: 0..K-1
    # roi_idxs index each image's own proposals.
    for det, proposals in zip(ours, outputs["proposals"]):
        assert det["roi_idxs"].max() < len(proposals) if len(det["roi_idxs"]) else True


def test_class_agnostic_postprocess_is_one_nms_over_all_classes_of_an_image():
    num_classes, sizes = 3, [(80, 120), (100, 90)]
    outputs = _random_roi_outputs([150, 120], sizes, num_classes, seed=3)
    targets = [target([], [], size) for size in sizes]
    ours = FasterRCNNPostProcess(0.05, 0.5, 25, class_agnostic=True)(outputs, targets)
    aware = FasterRCNNPostProcess(0.05, 0.5, 1000)(outputs, targets)
    ref_all = FasterRCNNPostProcess(0.05, 1.01, 10**6)(outputs, targets)  # every candidate, no NMS
    for det, every, per_class in zip(ours, ref_all, aware):
        keep = nms(every["boxes"], every["scores"], 0.5)[:25]
        torch.testing.assert_close(det["boxes"], every["boxes"][keep])
        torch.testing.assert_close(det["scores"], every["scores"][keep])
        assert len(det["boxes"]) <= 25 < len(per_class["boxes"])


def test_postprocess_clips_to_the_valid_size_and_maps_to_original_pixels():
    # K = 2. RoI A scores 0.987 for label 0, RoI B 0.965; zero deltas decode to the proposals themselves.
    outputs = {
        "proposals": [torch.tensor([[10.0, 20, 60, 80], [100, 50, 200, 120]])],
        "class_logits": torch.tensor([[0.0, 5, 0], [0, 4, 0]]),
        "box_regression": torch.zeros(2, 12),
        "box_features": torch.arange(2 * 1024, dtype=torch.float32).reshape(2, 1024),
    }
    # Valid area 100 x 150 (h, w) inside the padded batch; input = original * (sx 0.5, sy 0.25).
    targets = [target([], [], (100, 150), scale=(0.5, 0.25), orig_size=(400, 300))]
    det = FasterRCNNPostProcess(score_thresh=0.05)(outputs, targets)[0]
    # A: [10, 20, 60, 80] / (0.5, 0.25) = [20, 80, 120, 320].
    # B: clipped to the valid area [100, 50, 150, 100] first, then [200, 200, 300, 400].
    torch.testing.assert_close(det["boxes"], torch.tensor([[20.0, 80, 120, 320], [200, 200, 300, 400]]))
    p_a, p_b = math.exp(5) / (math.exp(5) + 2), math.exp(4) / (math.exp(4) + 2)
    torch.testing.assert_close(det["scores"], torch.tensor([p_a, p_b]))
    assert det["labels"].tolist() == [0, 0] and det["roi_idxs"].tolist() == [0, 1]
    rows = det["roi_features"]
    assert rows.shape == (2, 1 + 4 + 3 + 1024)
    q_a = (1 - p_a) / 2
    torch.testing.assert_close(
        rows[0, :8], torch.tensor([1 - q_a, 20 / 300, 80 / 400, 120 / 300, 320 / 400, q_a, p_a, q_a])
    )
    torch.testing.assert_close(rows[1, 8:], outputs["box_features"][1])
