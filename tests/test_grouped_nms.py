"""layers/grouped_nms.py against torchvision's nms: boxes at the IoU threshold, tied scores, suppression
chains, and groups beyond the vectorised NMS's size limit."""

import pytest
import torch
from torchvision.ops import batched_nms, nms

from layers.grouped_nms import nms_sorted_groups


def _per_group_nms(boxes, scores, groups, threshold):
    """Reference: torchvision's nms on each group's boxes, by the straightforward loop."""
    keep = []
    for group in torch.unique(groups).tolist():
        idxs = (groups == group).nonzero().flatten()
        keep.append(idxs[nms(boxes[idxs], scores[idxs], threshold)])
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
    return torch.sort(keep).values


@pytest.mark.parametrize("threshold", [0.5, 0.45, 0.3, 1 / 3, 0.7, 0.0])
def test_nms_sorted_groups_equals_torchvision(threshold):
    g = torch.Generator().manual_seed(int(threshold * 100))
    num_boxes = 600
    # Integer corners on a small grid: many IoUs are simple fractions, some exactly at the threshold.
    xy = torch.randint(0, 12, (num_boxes, 2), generator=g).float()
    wh = torch.randint(1, 6, (num_boxes, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randint(0, 20, (num_boxes,), generator=g).float() / 20  # ties
    groups = torch.randint(0, 40, (num_boxes,), generator=g)
    groups[:200] = 99  # one group of about 200 boxes: beyond NMS_VECTOR_MAX, torchvision's nms
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sizes = torch.unique_consecutive(groups[order], return_counts=True)[1]
    kept = nms_sorted_groups(boxes[order], scores[order], sizes, threshold)
    expected = _per_group_nms(boxes[order], scores[order], groups[order], threshold)
    assert torch.equal(kept, expected)
    assert 0 < len(kept) < num_boxes
    # batched_nms agrees too (the same greedy rule)
    assert torch.equal(
        torch.sort(order[kept]).values, torch.sort(batched_nms(boxes, scores, groups, threshold)).values
    )


def test_nms_sorted_groups_long_suppression_chain():
    """Each box overlaps the next by IoU 0.6 and the one after by 0.2: greedy NMS keeps every other one,
    which needs one fixed-point pass per link of the chain."""
    num_boxes = 60
    x = torch.arange(num_boxes).float() * 0.25
    boxes = torch.stack([x, torch.zeros(num_boxes), x + 1, torch.ones(num_boxes)], dim=1)
    scores = torch.linspace(1, 0.1, num_boxes)
    kept = nms_sorted_groups(boxes, scores, torch.tensor([num_boxes]), 0.5)
    assert torch.equal(kept, nms(boxes, scores, 0.5))
    assert torch.equal(kept, torch.arange(0, num_boxes, 2))
