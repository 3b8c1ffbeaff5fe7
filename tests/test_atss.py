"""layers/atss.py against hand-computed cases and a per-box loop written from the ATSS paper."""

import pytest
import torch
from torchvision.ops import box_iou

from layers.atss import atss_match
from layers.box_coder import BoxCoder
from layers.losses import FocalLoss, MultiBoxLoss
from layers.matcher import BACKGROUND, IGNORE, pad_targets


def grid_anchors(side: int, stride: int, size: float) -> torch.Tensor:
    """One size x size anchor per cell centre ((j + 0.5) * stride), row-major: [(side/stride)^2, 4]."""
    n = side // stride
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
    return torch.cat([centres - size / 2, centres + size / 2], dim=1)


def reference_atss(anchors, counts, gt_boxes, usable, ignore, topk, ignore_threshold):
    """One image, one gt box at a time, as the paper's Algorithm 1 (plus our two rules)."""
    num_anchors = anchors.shape[0]
    best = torch.full((num_anchors,), -1.0, dtype=torch.float64)
    owner = torch.full((num_anchors,), BACKGROUND, dtype=torch.int64)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    for g in range(gt_boxes.shape[0]):
        if not usable[g]:
            continue
        box = gt_boxes[g]
        iou = box_iou(box[None].double(), anchors.double())[0]
        gc = (box[:2] + box[2:]) / 2
        candidates, start = [], 0
        for count in counts:
            d = ((centres[start : start + count] - gc) ** 2).sum(1)
            candidates += [start + int(i) for i in torch.argsort(d, stable=True)[: min(topk, count)]]
            start += count
        cand_iou = iou[candidates]
        thr = cand_iou.mean() + (cand_iou.std() if len(candidates) > 1 else 0.0)
        chosen = []
        for a, v in zip(candidates, cand_iou.tolist()):
            inside = bool((centres[a] > box[:2]).all() and (centres[a] < box[2:]).all())
            if v >= thr and inside and v > 0:
                chosen.append(a)
        if not chosen and float(cand_iou.max()) > 0:
            chosen = [candidates[int(cand_iou.argmax())]]
        for a in chosen:
            if iou[a] > best[a]:
                best[a], owner[a] = iou[a], g
    for g in range(gt_boxes.shape[0]):
        if ignore[g]:
            iou = box_iou(gt_boxes[g][None].double(), anchors.double())[0]
            owner[(iou >= ignore_threshold) & (best < 0)] = IGNORE
    return owner


def test_small_box_between_four_anchors_gets_all_four():
    # 12 px anchors every 8 px; a 12 px box centred on a cell corner overlaps its 4 nearest anchors by
    # IoU 64 / 224 = 0.286 each: a fixed 0.5 threshold makes none of them positive on its own.
    anchors = grid_anchors(64, 8, 12.0)
    gt = torch.tensor([[[26.0, 26.0, 38.0, 38.0]]])
    valid, ignore = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool)
    matched = atss_match(anchors, [anchors.shape[0]], gt, valid, ignore, topk=9)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = {(28.0, 28.0), (36.0, 28.0), (28.0, 36.0), (36.0, 36.0)}
    positives = {tuple(centres[a].tolist()) for a in (matched[0] == 0).nonzero()[:, 0].tolist()}
    assert positives == expected
    assert int((matched[0] == BACKGROUND).sum()) == anchors.shape[0] - 4


def test_box_with_no_anchor_centre_inside_claims_its_best_candidate():
    anchors = grid_anchors(32, 8, 8.0)
    gt = torch.tensor([[[13.0, 13.0, 15.0, 15.0]]])  # 2 px, between the centres 12 and 20
    matched = atss_match(
        anchors, [16], gt, torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool)
    )
    assert int((matched == 0).sum()) == 1
    a = int((matched[0] == 0).nonzero()[0, 0])
    assert anchors[a].tolist() == [8.0, 8.0, 16.0, 16.0]  # centre (12, 12): the first of the ties in IoU


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_per_box_reference_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    levels = [grid_anchors(128, s, 1.5 * s) for s in (8, 16, 32)]
    # Two shapes per location on the first level, as k-means anchor files give.
    levels[0] = torch.cat([levels[0], grid_anchors(128, 8, 20.0)])
    anchors = torch.cat(levels)
    counts = [len(x) for x in levels]
    targets = []
    for _ in range(3):
        n = int(torch.randint(0, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 100
        wh = 4 + torch.rand(n, 2, generator=g) * 60
        boxes = torch.cat([xy, (xy + wh).clamp(max=128)], dim=1)
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.zeros(n, dtype=torch.int64),
                "iscrowd": torch.rand(n, generator=g) < 0.2,
            }
        )
    gt_boxes, _, gt_valid, gt_ignore = pad_targets(targets, torch.device("cpu"))
    matched = atss_match(anchors, counts, gt_boxes, gt_valid, gt_ignore, topk=5, ignore_threshold=0.4)
    for i in range(3):
        ref = reference_atss(
            anchors, counts, gt_boxes[i], gt_valid[i] & ~gt_ignore[i], gt_valid[i] & gt_ignore[i], 5, 0.4
        )
        assert torch.equal(matched[i], ref), f"image {i}"


def test_arguments_are_checked():
    anchors = grid_anchors(32, 8, 8.0)
    gt, v, ig = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not sum to 16"):
        atss_match(anchors, [10], gt, v, ig)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        atss_match(anchors, [16], gt, v, ig, topk=0)


@pytest.mark.parametrize("loss_class", [MultiBoxLoss, FocalLoss])
def test_losses_use_atss_positives(loss_class):
    anchors = grid_anchors(64, 8, 12.0)
    num_columns = 3 if loss_class is MultiBoxLoss else 2
    outputs = {
        "pred_logits": torch.zeros(1, anchors.shape[0], num_columns),
        "pred_box_deltas": torch.zeros(1, anchors.shape[0], 4),
        "anchors": anchors,
        "num_anchors_per_level": [anchors.shape[0]],
    }
    targets = [{"boxes": torch.tensor([[26.0, 26.0, 38.0, 38.0]]), "labels": torch.tensor([1])}]
    criterion = loss_class(BoxCoder((0.1, 0.2)), matcher="atss", atss_topk=9)
    labelled = criterion.label_anchors(anchors, targets, outputs["num_anchors_per_level"])
    assert int((labelled["matched_idxs"] >= 0).sum()) == 4  # the IoU matcher gives only its tied best 4
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    with pytest.raises(ValueError, match="needs the model's num_anchors_per_level"):
        criterion.label_anchors(anchors, targets)
    with pytest.raises(ValueError, match="matcher must be one of"):
        loss_class(BoxCoder((0.1, 0.2)), matcher="nearest")


def test_matcher_option_reaches_the_criterion(tmp_path):
    import train
    from models import build_model
    from utils.options import resolve_defaults

    argv = ["--dataset", "shapes", "--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", "32"]
    argv += ["--num_head_layers", "1", "--input_dim", "64", "--matcher", "atss", "--atss_topk", "4"]
    args = resolve_defaults(train.get_args_parser().parse_args(argv))
    args.num_classes = 3
    _, criterion, _ = build_model(args, load_pretrained=False)
    assert (criterion.matcher, criterion.atss_topk) == ("atss", 4)
