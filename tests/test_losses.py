import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.box_coder import BoxCoder
from layers.losses import FocalLoss, MultiBoxLoss, ohem_negative_mask
from layers.matcher import BACKGROUND, IGNORE, match_anchors, pad_targets


def _target(boxes, labels, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    g = boxes.shape[0]
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult or [False] * g, dtype=torch.bool),
        "iscrowd": torch.zeros(g, dtype=torch.bool),
    }


def test_ohem_picks_hardest_negatives_per_image():
    g = torch.Generator().manual_seed(0)
    num_images, num_anchors = 4, 60
    bg_loss = torch.stack([torch.randperm(num_anchors, generator=g).float() for _ in range(num_images)])
    negative_mask = torch.rand(num_images, num_anchors, generator=g) < 0.5
    negative_mask[3] = False
    negative_mask[3, :2] = True  # only 2 negatives available
    num_pos = torch.tensor([2, 0, 30, 5])
    selected = ohem_negative_mask(bg_loss, negative_mask, num_pos, 3)
    for i in range(num_images):
        available = [a for a in range(num_anchors) if negative_mask[i, a]]
        # min(3 * P, available); an image without positives still gets 3 (ratio * 1) hard negatives.
        k = min(3 * max(int(num_pos[i]), 1), len(available))
        hardest = sorted(available, key=lambda a: -float(bg_loss[i, a]))[:k]
        assert set(selected[i].nonzero().flatten().tolist()) == set(hardest), i
    assert selected.sum(1).tolist() == [6, 3, int(negative_mask[2].sum()), 2]


def _hand_case():
    # Three anchors, K = 2 classes (3 logit columns). Image 0: a gt of label 1 overlapping a0 (IoU 90/110),
    # a difficult box exactly on a2 (a2 -> IGNORE), a1 background. Image 1: no gt.
    anchors = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=torch.float32)
    targets = [
        _target([[1, 0, 11, 10], [40, 0, 50, 10]], [1, 0], difficult=[False, True]),
        _target([], []),
    ]
    pred_logits = torch.tensor(
        [
            [[0.5, -1.0, 2.0], [1.0, 0.2, -0.3], [-5.0, 3.0, 3.0]],
            [[0.0, 1.0, -1.0], [2.0, 0.5, 0.5], [1.5, 1.5, 0.0]],
        ],
        requires_grad=True,
    )
    pred_box_deltas = torch.tensor(
        [[[0.5, 0.2, -2.0, 0.1], [9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]], [[9.0] * 4] * 3],
        requires_grad=True,
    )
    return (
        anchors,
        targets,
        {"pred_logits": pred_logits, "pred_box_deltas": pred_box_deltas, "anchors": anchors},
    )


def _ce(logits, target):
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_multibox_hand_computed():
    anchors, targets, outputs = _hand_case()
    criterion = MultiBoxLoss(BoxCoder((0.1, 0.2)), 0.5, 0.5, neg_pos_ratio=3, smooth_l1_beta=1.0)
    losses = criterion(outputs, targets)
    logits = outputs["pred_logits"].tolist()
    # Image 0: a0 positive (label 1 -> column 2), a1 the only available negative (a2 ignored).
    # Image 1: no positive, so ratio * 1 = 3 negatives wanted, 3 available: all three.
    expected_cls = (
        _ce(logits[0][0], 2)
        + _ce(logits[0][1], 0)
        + _ce(logits[1][0], 0)
        + _ce(logits[1][1], 0)
        + _ce(logits[1][2], 0)
    ) / 1  # one positive in the batch
    # Target deltas of a0: centre 6 vs 5 -> dx = 1 / 10 / 0.1 = 1; same size -> 0, 0, 0.
    # Smooth L1 (beta 1) of pred (0.5, 0.2, -2, 0.1) - (1, 0, 0, 0): 0.125 + 0.02 + 1.5 + 0.005.
    expected_box = 0.125 + 0.02 + 1.5 + 0.005
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_box"].item() == pytest.approx(expected_box, rel=1e-6)
    assert set(losses) == {"loss_cls", "loss_box"}

    sum(losses.values()).backward()
    grad = outputs["pred_logits"].grad
    assert torch.equal(grad[0, 2], torch.zeros(3))  # IGNORE anchor: no gradient
    assert (grad[1] != 0).all()
    box_grad = outputs["pred_box_deltas"].grad
    assert (box_grad[0, 0] != 0).all() and (box_grad[0, 1:] == 0).all() and (box_grad[1] == 0).all()


def test_multibox_mines_only_ratio_times_positives():
    anchors, targets, outputs = _hand_case()
    # neg_pos_ratio 1 on image 1 (no positive): one negative, the hardest (-log p_bg is largest for a0).
    criterion = MultiBoxLoss(BoxCoder(), neg_pos_ratio=1)
    losses = criterion(outputs, targets)
    logits = outputs["pred_logits"].tolist()
    bg = [_ce(logits[1][a], 0) for a in range(3)]
    assert max(bg) == bg[0]
    expected = _ce(logits[0][0], 2) + _ce(logits[0][1], 0) + bg[0]
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-6)


def test_no_gt_in_batch():
    anchors, _, outputs = _hand_case()
    targets = [_target([], []), _target([], [])]
    losses = MultiBoxLoss(BoxCoder())(outputs, targets)
    logits = outputs["pred_logits"].tolist()
    # No positives: normaliser 1, each image mines its 3 hardest negatives (all of them here).
    expected = sum(_ce(logits[i][a], 0) for i in range(2) for a in range(3))
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss_box"].item() == 0.0
    focal = FocalLoss(BoxCoder())({**outputs, "pred_logits": outputs["pred_logits"][..., 1:]}, targets)
    assert torch.isfinite(focal["loss_cls"]) and focal["loss_box"].item() == 0.0


def _random_batch(generator, num_images=3, num_classes=4, columns=None):
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    anchors = gen.anchors_for_input(64, 64)
    targets = []
    for i in range(num_images):
        g = 0 if i == 1 else 5
        xy = torch.rand(g, 2, generator=generator) * 50
        boxes = torch.cat([xy, xy + 6 + torch.rand(g, 2, generator=generator) * 40], dim=1)
        labels = torch.randint(0, num_classes, (g,), generator=generator)
        if g:
            labels[-1] = -1  # an out-of-subset box: ignore region
        t = {"boxes": boxes, "labels": labels, "difficult": torch.rand(g, generator=generator) < 0.2}
        targets.append(t)
    columns = columns or num_classes
    outputs = {
        "pred_logits": torch.randn(num_images, anchors.shape[0], columns, generator=generator),
        "pred_box_deltas": torch.randn(num_images, anchors.shape[0], 4, generator=generator),
        "anchors": anchors,
    }
    return anchors, targets, outputs


def test_focal_equals_torchvision():
    g = torch.Generator().manual_seed(3)
    anchors, targets, outputs = _random_batch(g)
    coder = BoxCoder()
    criterion = FocalLoss(coder, 0.5, 0.4, alpha=0.25, gamma=2.0, smooth_l1_beta=1 / 9)
    losses = criterion(outputs, targets)

    gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.4)
    assert (matched == IGNORE).any() and (matched >= 0).any()
    num_pos = int((matched >= 0).sum())
    expected_cls = expected_box = 0.0
    for i in range(len(targets)):
        onehot = torch.zeros_like(outputs["pred_logits"][i])
        pos = (matched[i] >= 0).nonzero().flatten()
        onehot[pos, gt_labels[i, matched[i, pos]]] = 1.0
        keep = matched[i] != IGNORE
        expected_cls += sigmoid_focal_loss(
            outputs["pred_logits"][i][keep], onehot[keep], alpha=0.25, gamma=2.0, reduction="sum"
        ).item()
        target_deltas = coder.encode(gt_boxes[i, matched[i, pos]], anchors[pos])
        expected_box += torch.nn.functional.smooth_l1_loss(
            outputs["pred_box_deltas"][i, pos], target_deltas, beta=1 / 9, reduction="sum"
        ).item()
    assert losses["loss_cls"].item() == pytest.approx(expected_cls / max(num_pos, 1), rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(expected_box / max(num_pos, 1), rel=1e-5)


def test_focal_gradient_equals_torchvision_autograd():
    """The chunked negative term has a hand-written backward: its gradient must equal autograd's
    through torchvision's sigmoid_focal_loss, for the logits of positives, negatives and ignored anchors."""
    g = torch.Generator().manual_seed(6)
    anchors, targets, outputs = _random_batch(g)
    logits = outputs["pred_logits"].clone().requires_grad_(True)
    FocalLoss(BoxCoder(), 0.5, 0.4)({**outputs, "pred_logits": logits}, targets)["loss_cls"].backward()

    reference_logits = outputs["pred_logits"].clone().requires_grad_(True)
    gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.4)
    onehot = torch.zeros_like(reference_logits)
    pos_image, pos_anchor = (matched >= 0).nonzero(as_tuple=True)
    onehot[pos_image, pos_anchor, gt_labels[pos_image, matched[pos_image, pos_anchor]]] = 1.0
    keep = matched != IGNORE
    reference = sigmoid_focal_loss(reference_logits[keep], onehot[keep], 0.25, 2.0, reduction="sum")
    (reference / max(len(pos_image), 1)).backward()
    assert (reference_logits.grad[~keep] == 0).all() and (logits.grad[~keep] == 0).all()
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-8)


def test_multibox_random_against_reference():
    g = torch.Generator().manual_seed(4)
    anchors, targets, outputs = _random_batch(g, columns=5)
    losses = MultiBoxLoss(BoxCoder(), 0.5, 0.5, neg_pos_ratio=3)(outputs, targets)
    gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.5)
    total, num_pos_total = 0.0, int((matched >= 0).sum())
    for i in range(len(targets)):
        logp = torch.log_softmax(outputs["pred_logits"][i], dim=-1)
        pos = (matched[i] >= 0).nonzero().flatten().tolist()
        neg = (matched[i] == BACKGROUND).nonzero().flatten().tolist()
        total += sum(-logp[a, gt_labels[i, matched[i, a]] + 1].item() for a in pos)
        neg_losses = sorted((-logp[a, 0].item() for a in neg), reverse=True)
        total += sum(neg_losses[: 3 * max(len(pos), 1)])
    assert losses["loss_cls"].item() == pytest.approx(total / num_pos_total, rel=1e-5)


@pytest.mark.parametrize("loss_cls, columns", [(MultiBoxLoss, 5), (FocalLoss, 4)])
def test_fp32_under_autocast(loss_cls, columns):
    g = torch.Generator().manual_seed(5)
    anchors, targets, outputs = _random_batch(g, columns=columns)
    criterion = loss_cls(BoxCoder())
    reference = criterion(outputs, targets)
    head = torch.nn.Linear(columns, columns)
    torch.nn.init.eye_(head.weight)
    torch.nn.init.zeros_(head.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(outputs["pred_logits"])  # autocast makes this bf16
        assert logits.dtype == torch.bfloat16
        losses = criterion(
            {**outputs, "pred_logits": logits, "pred_box_deltas": outputs["pred_box_deltas"].bfloat16()},
            targets,
        )
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        # Only the bf16 rounding of the inputs differs from the fp32 run.
        assert value.item() == pytest.approx(reference[name].item(), rel=2e-2)


def _focal_reference(logits, targets, anchors, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss (float64, autograd) over the non-ignored anchors / positives."""
    gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.4)
    onehot = torch.zeros_like(logits)
    pos_image, pos_anchor = (matched >= 0).nonzero(as_tuple=True)
    onehot[pos_image, pos_anchor, gt_labels[pos_image, matched[pos_image, pos_anchor]]] = 1.0
    keep = matched != IGNORE
    return sigmoid_focal_loss(logits[keep], onehot[keep], alpha, gamma, reduction="sum") / max(
        len(pos_image), 1
    )


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 2.0), (1.0, 2.0), (0.5, 1.5), (0.25, 0.0)])
def test_focal_value_and_gradient_to_1e6(alpha, gamma):
    """Value to 1e-6 relative and gradient to 1e-6 of its largest entry, against a float64 autograd
    reference through torchvision's sigmoid_focal_loss; also alpha < 0 (no weighting) and alpha = 1
    (negatives weigh nothing), whose gradients take other branches; the loss scaled by 3 before
    backward scales the gradient."""
    g = torch.Generator().manual_seed(9)
    anchors, targets, outputs = _random_batch(g)
    outputs["pred_logits"] = outputs["pred_logits"] * 3  # some p near 0 and 1
    logits = outputs["pred_logits"].clone().requires_grad_(True)
    losses = FocalLoss(BoxCoder(), 0.5, 0.4, alpha=alpha, gamma=gamma)(
        {**outputs, "pred_logits": logits}, targets
    )
    (3 * losses["loss_cls"]).backward()

    reference_logits = outputs["pred_logits"].double().requires_grad_(True)
    reference = _focal_reference(reference_logits, targets, anchors, alpha, gamma)
    (3 * reference).backward()
    assert losses["loss_cls"].item() == pytest.approx(reference.item(), rel=1e-6)
    expected = reference_logits.grad.float()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_focal_without_grad_and_second_backward():
    g = torch.Generator().manual_seed(10)
    anchors, targets, outputs = _random_batch(g)
    criterion = FocalLoss(BoxCoder())
    with torch.no_grad():
        value = criterion(outputs, targets)["loss_cls"]
    logits = outputs["pred_logits"].clone().requires_grad_(True)
    loss = criterion({**outputs, "pred_logits": logits}, targets)["loss_cls"]
    assert loss.item() == value.item()
    loss.backward(retain_graph=True)
    # The gradient is computed in the forward pass and handed over once: say so instead of a wrong one.
    with pytest.raises(RuntimeError, match="second forward"):
        loss.backward()


@pytest.mark.parametrize("matcher", ["iou", "atss"])
def test_label_anchors_in_image_chunks_equals_whole_batch(matcher, monkeypatch):
    import layers.losses as losses_module

    g = torch.Generator().manual_seed(12)
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    grid_sizes = gen.grid_sizes_for_input(64, 64)
    anchors = gen(grid_sizes)
    _, targets, _ = _random_batch(g, num_images=5)
    criterion = FocalLoss(BoxCoder(), matcher=matcher)
    whole = criterion.label_anchors(anchors, targets, gen.num_anchors_per_level(grid_sizes))
    monkeypatch.setattr(losses_module, "_MATCH_CHUNK_ELEMENTS", 1)  # one image per chunk
    chunked = criterion.label_anchors(anchors, targets, gen.num_anchors_per_level(grid_sizes))
    assert (whole["matched_idxs"] >= 0).any()
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key
