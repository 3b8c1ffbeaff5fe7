import pytest
import torch
from torchvision.ops import box_iou

from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.matcher import BACKGROUND, IGNORE, match_anchors, pad_targets


def _target(boxes, labels=None, difficult=None, iscrowd=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    g = boxes.shape[0]
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels if labels is not None else [0] * g, dtype=torch.int64),
        "difficult": torch.tensor(difficult if difficult is not None else [False] * g, dtype=torch.bool),
        "iscrowd": torch.tensor(iscrowd if iscrowd is not None else [False] * g, dtype=torch.bool),
    }


def reference_low_quality_winners(iou, usable, num_anchors):
    """{anchor: box} for the low-quality rule: every usable box with some overlap claims the anchors of
    its best IoU (ties: all of them); an anchor claimed by several boxes goes to the first of the highest
    IoU."""
    claims = {}
    for g in usable:
        best = max(iou[g])
        if best <= 0:
            continue
        for a in range(num_anchors):
            if iou[g][a] == best:
                claims.setdefault(a, []).append(g)
    winners = {}
    for a, gs in claims.items():
        winner = gs[0]
        for g in gs[1:]:
            if iou[g][a] > iou[winner][a]:
                winner = g
        winners[a] = winner
    return winners


def reference_match(anchors, target, pos_thr, neg_thr, low_quality):
    """Straightforward per-image version of the rules in match_anchors' docstring (loops on purpose)."""
    num_anchors = anchors.shape[0]
    result = [BACKGROUND] * num_anchors
    boxes = target["boxes"]
    if boxes.shape[0] == 0:
        return torch.tensor(result)
    iou = box_iou(boxes, anchors).tolist()  # [G][A]
    is_ignore = [
        bool(d) or bool(c) or int(lab) < 0
        for d, c, lab in zip(target["difficult"], target["iscrowd"], target["labels"])
    ]
    usable = [g for g in range(len(iou)) if not is_ignore[g]]
    ignore = [g for g in range(len(iou)) if is_ignore[g]]
    positive = [False] * num_anchors
    max_usable = [-1.0] * num_anchors
    for a in range(num_anchors):
        best_g, best = -1, -1.0
        for g in usable:
            if iou[g][a] > best:
                best_g, best = g, iou[g][a]
        max_usable[a] = best
        if best >= pos_thr:
            result[a], positive[a] = best_g, True
    if low_quality:
        for a, winner in reference_low_quality_winners(iou, usable, num_anchors).items():
            result[a], positive[a] = winner, True
    for a in range(num_anchors):
        if positive[a]:
            continue
        if neg_thr <= max_usable[a] < pos_thr or any(iou[g][a] >= neg_thr for g in ignore):
            result[a] = IGNORE
    return torch.tensor(result)


def test_pad_targets():
    targets = [
        _target([[0, 0, 10, 10], [1, 1, 5, 5]], labels=[2, -1], difficult=[False, False]),
        _target([]),
        _target([[2, 2, 8, 8]], labels=[0], iscrowd=[True]),
    ]
    targets[0].pop("iscrowd")  # optional field
    gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    assert gt_boxes.shape == (3, 2, 4)
    assert torch.equal(gt_boxes[0], targets[0]["boxes"])
    assert torch.equal(gt_boxes[1], torch.zeros(2, 4))
    assert gt_labels.tolist() == [[2, -1], [-1, -1], [0, -1]]
    assert gt_valid.tolist() == [[True, True], [False, False], [True, False]]
    assert gt_ignore.tolist() == [[False, True], [False, False], [True, False]]
    # All images empty: G = 0.
    gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets([_target([]), _target([])], torch.device("cpu"))
    assert gt_boxes.shape == (2, 0, 4) and gt_valid.shape == (2, 0)
    with pytest.raises(ValueError, match="labels"):
        pad_targets([{"boxes": torch.zeros(2, 4), "labels": torch.zeros(3)}], torch.device("cpu"))


# Hand-worked layout: anchors a0..a6 on a line, all 10 px tall.
HAND_ANCHORS = torch.tensor(
    [
        [0, 0, 10, 10],  # a0: IoU 1 with gt0
        [5, 0, 15, 10],  # a1: IoU 1/3 with gt0, 0.233 with gt3
        [20, 0, 30, 10],  # a2: IoU 90/110 with gt1
        [40, 0, 50, 10],  # a3: IoU 1 with the difficult gt2
        [60, 0, 70, 10],  # a4: IoU 0.4 with gt4, its best anchor
        [100, 0, 110, 10],  # a5: IoU 100/120 with gt5 (its best)
        [103, 0, 113, 10],  # a6: IoU 90/130 with gt5, 50/150 with gt6 (gt6's best)
    ],
    dtype=torch.float32,
)
HAND_TARGET = _target(
    [
        [0, 0, 10, 10],  # gt0
        [21, 0, 31, 10],  # gt1
        [40, 0, 50, 10],  # gt2, difficult
        [0, 0, 12, 4],  # gt3: best anchor a0 (0.37) is claimed by gt0 with IoU 1, so gt3 gets none
        [60, 0, 64, 10],  # gt4
        [100, 0, 112, 10],  # gt5
        [108, 0, 118, 10],  # gt6
    ],
    difficult=[False, False, True, False, False, False, False],
)


@pytest.mark.parametrize(
    "pos, neg, low_quality, expected",
    [
        (0.5, 0.3, True, [0, IGNORE, 1, IGNORE, 4, 5, 6]),
        (0.5, 0.3, False, [0, IGNORE, 1, IGNORE, IGNORE, 5, 5]),
        (0.5, 0.4, False, [0, BACKGROUND, 1, IGNORE, IGNORE, 5, 5]),
        (0.5, 0.5, False, [0, BACKGROUND, 1, IGNORE, BACKGROUND, 5, 5]),
        (0.9, 0.9, False, [0, BACKGROUND, BACKGROUND, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND]),
    ],
)
def test_hand_computed(pos, neg, low_quality, expected):
    targets = [HAND_TARGET, _target([])]
    gt_boxes, _, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(HAND_ANCHORS, gt_boxes, gt_valid, gt_ignore, pos, neg, low_quality)
    assert matched.dtype == torch.int64 and matched.shape == (2, 7)
    assert matched[0].tolist() == expected
    assert matched[1].tolist() == [BACKGROUND] * 7
    assert torch.equal(matched[0], reference_match(HAND_ANCHORS, HAND_TARGET, pos, neg, low_quality))


def test_labels_below_zero_and_crowd_only_ignore():
    anchors = HAND_ANCHORS[:2]
    for t in (_target([[0, 0, 10, 10]], labels=[-1]), _target([[0, 0, 10, 10]], iscrowd=[True])):
        gt_boxes, _, gt_valid, gt_ignore = pad_targets([t], torch.device("cpu"))
        # Low-quality matching must not turn an ignore box's best anchor into a positive.
        matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.3, True)
        assert matched.tolist() == [[IGNORE, IGNORE]]
        matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5, True)
        assert matched.tolist() == [[IGNORE, BACKGROUND]]


def _random_targets(generator, num_images):
    targets = []
    for i in range(num_images):
        g = 0 if i == 1 else int(torch.randint(1, 9, (1,), generator=generator))
        xy = torch.rand(g, 2, generator=generator) * 56
        wh = 4 + torch.rand(g, 2, generator=generator) * 44
        boxes = torch.cat([xy, xy + wh], dim=1)
        if g >= 3:
            boxes[1] = boxes[0]  # duplicate gt: the first one wins the tie
            boxes[2] = torch.tensor([200.0, 200.0, 210.0, 210.0])  # overlaps no anchor: claims nothing
        labels = torch.randint(-1, 3, (g,), generator=generator)
        difficult = torch.rand(g, generator=generator) < 0.2
        iscrowd = torch.rand(g, generator=generator) < 0.1
        targets.append({"boxes": boxes, "labels": labels, "difficult": difficult, "iscrowd": iscrowd})
    return targets


@pytest.mark.parametrize("pos, neg", [(0.5, 0.5), (0.5, 0.4), (0.6, 0.3)])
@pytest.mark.parametrize("low_quality", [True, False])
def test_batched_equals_reference(pos, neg, low_quality):
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    anchors = gen.anchors_for_input(64, 64)  # 504 anchors
    generator = torch.Generator().manual_seed(int(pos * 100 + neg * 10) + low_quality)
    targets = _random_targets(generator, 6)
    gt_boxes, _, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, pos, neg, low_quality)
    num_pos = num_ign = 0
    for i, t in enumerate(targets):
        expected = reference_match(anchors, t, pos, neg, low_quality)
        assert torch.equal(matched[i], expected), i
        num_pos += int((expected >= 0).sum())
        num_ign += int((expected == IGNORE).sum())
    assert (matched[1] == BACKGROUND).all()  # the empty image
    assert num_pos > 0 and num_ign > 0  # the case exercises every outcome


def test_every_usable_gt_gets_an_anchor_with_low_quality():
    anchors = AnchorGenerator(
        predefined_anchor_whs(1, base_sizes=(16, 32)), strides=(8, 16)
    ).anchors_for_input(32, 32)
    # Small and thin boxes that reach IoU 0.5 with no anchor.
    t = _target([[1, 1, 4, 4], [10, 2, 30, 5], [20, 20, 23, 31]])
    gt_boxes, _, gt_valid, gt_ignore = pad_targets([t], torch.device("cpu"))
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5, True)
    assert set(matched[matched >= 0].tolist()) == {0, 1, 2}
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5, False)
    assert (matched >= 0).sum() == 0


def test_rejects_inverted_thresholds():
    gt_boxes, _, gt_valid, gt_ignore = pad_targets([HAND_TARGET], torch.device("cpu"))
    with pytest.raises(ValueError, match="negative_threshold"):
        match_anchors(HAND_ANCHORS, gt_boxes, gt_valid, gt_ignore, 0.4, 0.5)


# --best_anchor_match one (the original's SSD matching) -------------------------------------------------

ONE_ANCHORS = torch.tensor(
    [[0, 0, 10, 10], [10, 0, 20, 10], [0, 20, 10, 30], [30, 0, 40, 10]], dtype=torch.float32
)
# gt0 overlaps a0 and a1 equally (IoU 50/150 = 1/3); gt1's best anchor is a0 too (IoU 20/100 = 0.2); gt2
# reaches a3 at 0.8 (a positive by threshold).
ONE_TARGET = _target([[5, 0, 15, 10], [0, 0, 10, 2], [30, 0, 38, 10]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        # ties: gt0 claims both tied anchors and wins a0 from gt1 by its higher IoU; gt1 gets nothing.
        ("ties", [0, 0, BACKGROUND, 2]),
        # one: gt0 claims only its first best anchor a0, and gt1 (the later box) takes it over.
        ("one", [1, BACKGROUND, BACKGROUND, 2]),
    ],
)
def test_best_anchor_match_hand_computed(mode, expected):
    gt_boxes, _, gt_valid, gt_ignore = pad_targets([ONE_TARGET, _target([])], torch.device("cpu"))
    matched = match_anchors(
        ONE_ANCHORS, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5, True, best_anchor_match=mode
    )
    assert matched[0].tolist() == expected
    assert matched[1].tolist() == [BACKGROUND] * 4


def test_best_anchor_match_one_ignores_unusable_and_padding():
    t = _target([[5, 0, 15, 10], [0, 0, 10, 2]], difficult=[False, True])  # gt1 is an ignore region
    gt_boxes, _, gt_valid, gt_ignore = pad_targets([t, ONE_TARGET], torch.device("cpu"))
    matched = match_anchors(
        ONE_ANCHORS, gt_boxes, gt_valid, gt_ignore, 0.5, 0.1, True, best_anchor_match="one"
    )
    # gt0 claims a0; the difficult gt1 claims nothing (its IoU 0.2 >= 0.1 would only make anchors IGNORE).
    assert matched[0].tolist() == [0, IGNORE, BACKGROUND, BACKGROUND]
    with pytest.raises(ValueError, match="best_anchor_match"):
        match_anchors(ONE_ANCHORS, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5, True, best_anchor_match="all")


def _original_match():
    """modules/box_utils.match_anchors of the original codebase (FPN_ORIGINAL_REPO or /work/original)."""
    import importlib.util
    import os

    root = os.environ.get("FPN_ORIGINAL_REPO", "/work/original")
    path = os.path.join(root, "modules", "box_utils.py")
    if not os.path.isfile(path):
        pytest.skip("the original codebase is not checked out (set FPN_ORIGINAL_REPO)")
    spec = importlib.util.spec_from_file_location("original_box_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.match_anchors


def test_best_anchor_match_one_equals_the_original():
    """Labels per anchor against the original's match_anchors (threshold 0.5, no ignore zone), on random
    boxes with duplicates (the later duplicate takes the shared best anchor)."""
    original_match = _original_match()
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    anchors = gen.anchors_for_input(64, 64)
    cxcywh = torch.cat([(anchors[:, :2] + anchors[:, 2:]) / 2, anchors[:, 2:] - anchors[:, :2]], dim=1)
    generator = torch.Generator().manual_seed(5)
    num_claims_that_differ = 0
    for _ in range(20):
        g = int(torch.randint(2, 9, (1,), generator=generator))
        xy = torch.rand(g, 2, generator=generator) * 50
        boxes = torch.cat([xy, xy + 4 + torch.rand(g, 2, generator=generator) * 30], dim=1)
        boxes[1] = boxes[0]
        labels = torch.randint(0, 5, (g,), generator=generator)
        t = {"boxes": boxes, "labels": labels}
        gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets([t], torch.device("cpu"))
        ours = {}
        for mode in ("one", "ties"):
            matched = match_anchors(
                anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5, True, best_anchor_match=mode
            )[0]
            ours[mode] = torch.where(matched >= 0, labels[matched.clamp(min=0)] + 1, 0)
        conf, _ = original_match(boxes.clone(), labels.clone(), cxcywh.clone(), iou_threshold=0.5)
        assert torch.equal(ours["one"], conf)
        num_claims_that_differ += int((ours["ties"] != conf).sum())
    assert num_claims_that_differ > 0  # the case tells the two rules apart
