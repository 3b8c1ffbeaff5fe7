"""NMS within groups (per image and class) on the CPU, for many small groups at once; and the first k of
each group.

torchvision's ``batched_nms`` on the CPU scans every box once per group when there are more than a few
thousand boxes (one ``idxs == group`` mask each), and ``nms`` per group costs a call per group: hundreds
of (image, class) groups per batch in post-processing. ``nms_sorted_groups`` resolves the small groups
together with vectorised pairwise IoUs and gives torchvision's result (tests/test_grouped_nms.py).
"""

import torch
from torch import Tensor
from torchvision.ops import nms

# nms_sorted_groups resolves groups of up to this many boxes with vectorised pairwise IoUs (at most
# 128 * 127 / 2 pairs per group) and calls torchvision's nms for larger ones.
NMS_VECTOR_MAX = 128
NMS_PAIRS_PER_CHUNK = 1 << 15


def nms_sorted_groups(boxes: Tensor, scores: Tensor, group_sizes: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's nms within each group, on CPU, for boxes already sorted by group then score.

    Args:
        boxes (Tensor[M, 4] float, xyxy), scores (Tensor[M]): group after group, each group by decreasing
            score (ties in a stable order, which is the order torchvision's CPU nms keeps them in).
        group_sizes (Tensor[G] int64): boxes per group, summing to M.

    Returns:
        Tensor[D] int64: the positions kept, increasing (so group by group, each by decreasing score).

    A box is kept iff no kept box before it in its group overlaps it by IoU > iou_threshold (greedy NMS).
    Groups of up to NMS_VECTOR_MAX boxes are resolved together: the IoU of every pair within a group,
    computed with the same float operations as torchvision's kernel (so the same comparisons at the
    threshold), then the rule above iterated to its fixed point (the greedy result is its unique
    solution, reached after at most one pass per box of the longest suppression chain). Larger groups
    call torchvision's nms each.
    """
    num_boxes = boxes.shape[0]
    keep = torch.ones(num_boxes, dtype=torch.bool)
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    large = group_sizes > NMS_VECTOR_MAX
    for start, size in zip(starts[large].tolist(), group_sizes[large].tolist()):
        kept = nms(boxes[start : start + size], scores[start : start + size], iou_threshold)
        keep[start : start + size] = False
        keep[kept + start] = True

    # Pairs (i, j), i before j, within the small groups: position p pairs with the rest of its group.
    size_per_box = torch.repeat_interleave(group_sizes, group_sizes)
    rank = torch.arange(num_boxes) - torch.repeat_interleave(starts, group_sizes)
    partners = torch.where(size_per_box <= NMS_VECTOR_MAX, size_per_box - 1 - rank, 0)  # [M]
    x1, y1, x2, y2 = (c.contiguous() for c in boxes.unbind(1))
    areas = (x2 - x1) * (y2 - y1)
    # The pairs of a run of positions at a time, about NMS_PAIRS_PER_CHUNK: [pairs] temporaries of a few
    # hundred kB, reused, where all pairs at once (a million on bench_components' batch) would be fresh
    # pages for each of the twenty operations below.
    pairs_before = torch.cumsum(partners, 0) - partners
    bounds = torch.searchsorted(pairs_before, torch.arange(0, int(partners.sum()), NMS_PAIRS_PER_CHUNK))
    overlapping_pairs = []
    for lo, hi in zip(bounds.tolist(), bounds[1:].tolist() + [num_boxes]):
        count = partners[lo:hi]
        first = torch.repeat_interleave(torch.arange(lo, hi), count)
        second = first + 1 + torch.arange(first.numel()) - torch.repeat_interleave(pairs_before[lo:hi], count)
        second += pairs_before[lo]  # (pairs_before counts from position 0, the chunk's arange from 0)
        # index_select: much faster than values[first] for many indices
        pair = lambda values, first=first, second=second: (  # noqa: E731
            values.index_select(0, first),
            values.index_select(0, second),
        )
        # As torchvision's nms_kernel: areas (x2 - x1) * (y2 - y1); w, h = max(0, min(x2) - max(x1)), ...;
        # ovr = inter / (area_i + area_j - inter) in the boxes' dtype; suppress if ovr > threshold (double).
        w = torch.minimum(*pair(x2)).sub_(torch.maximum(*pair(x1))).clamp_(min=0)
        h = torch.minimum(*pair(y2)).sub_(torch.maximum(*pair(y1))).clamp_(min=0)
        inter = w.mul_(h)
        area_first, area_second = pair(areas)
        iou = inter / area_first.add_(area_second).sub_(inter)
        overlapping = iou.double() > iou_threshold
        overlapping_pairs.append((first[overlapping], second[overlapping]))
    first = (
        torch.cat([f for f, _ in overlapping_pairs])
        if overlapping_pairs
        else torch.zeros(0, dtype=torch.int64)
    )
    second = torch.cat([s for _, s in overlapping_pairs]) if overlapping_pairs else first

    small_keep = torch.ones(num_boxes, dtype=torch.bool)
    while True:
        suppressed = torch.zeros(num_boxes, dtype=torch.bool)
        suppressed[second[small_keep[first]]] = True
        if torch.equal(suppressed, ~small_keep):
            break
        small_keep = ~suppressed
    return (keep & small_keep).nonzero().flatten()


def first_k_per_group(groups: Tensor, k: int) -> Tensor:
    """Bool mask [M]: the first ``k`` elements of each group value in ``groups`` (Tensor[M] int64)."""
    order = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1]
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    mask = torch.empty_like(groups, dtype=torch.bool)
    mask[order] = torch.arange(groups.numel(), device=groups.device) - first < k
    return mask
