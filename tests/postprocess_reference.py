"""The earlier post-processor, kept as the reference the post-processing tests compare with, and the
inputs they share.

ReferencePostProcess is PostProcess.forward as of commit 90ba04a (main before the CPU rework), verbatim
but for one marked change: ties in score are ordered by anchor then class, as PostProcess now does.
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.postprocess import PostProcess


class ReferencePostProcess(PostProcess):
    """PostProcess.forward as of commit 90ba04a (main before the rework), verbatim but for one marked
    change: ties in score are ordered by anchor then class."""

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict]) -> List[Dict[str, Tensor]]:
        pred_logits, pred_box_deltas, anchors = (
            outputs["pred_logits"],
            outputs["pred_box_deltas"],
            outputs["anchors"],
        )
        num_images, num_anchors, num_columns = pred_logits.shape
        device = pred_logits.device
        if len(targets) != num_images:
            raise ValueError(f"{len(targets)} targets for {num_images} images")
        num_anchors_per_level = outputs.get("num_anchors_per_level") or [num_anchors]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(
                f"num_anchors_per_level sums to {sum(num_anchors_per_level)}, "
                f"pred_logits has {num_anchors} anchors"
            )
        softmax = self.score_type == "softmax"
        num_classes = num_columns - 1 if softmax else num_columns

        # 1. Per level, the pre_nms_topk best (anchor, class) pairs above conf_thresh, per image.
        # They lie within the pre_nms_topk anchors of highest best-class score (each better anchor has a
        # pair at least as good), so only those anchors' K scores are computed: one max-reduction over
        # the level instead of scores, a mask and a top-k over all A_l * K pairs.
        cand_scores, cand_anchor_idxs, cand_labels = [], [], []
        if self.per_class_topk:  # instead: per class, the best anchors over all levels
            cand_scores, cand_anchor_idxs, cand_labels = _per_class_candidates(
                pred_logits, softmax, self.pre_nms_topk, self.conf_thresh
            )
        start = 0
        for num_level in [] if self.per_class_topk else num_anchors_per_level:
            logits = pred_logits[:, start : start + num_level]  # [N, A_l, C]
            if softmax:
                log_norm = torch.logsumexp(logits.float(), dim=2)  # [N, A_l]
                best = logits[..., 1:].amax(dim=2).float() - log_norm  # log of the best class probability
            else:
                best = logits.amax(dim=2)  # sigmoid is monotonic: rank by logit
            k = min(self.pre_nms_topk, num_level)
            top_anchors = best.topk(k, dim=1).indices  # [N, k]
            sel = logits.gather(1, top_anchors[..., None].expand(-1, -1, num_columns)).float()  # [N, k, C]
            if softmax:
                scores = (sel[..., 1:] - log_norm.gather(1, top_anchors)[..., None]).exp()
            else:
                scores = sel.sigmoid()
            scores = scores.reshape(num_images, -1)  # [N, k * K], anchor-major
            scores = scores.masked_fill(scores <= self.conf_thresh, -1.0)
            top_scores, top_idxs = scores.topk(min(self.pre_nms_topk, scores.shape[1]), dim=1)
            cand_scores.append(top_scores)
            cand_anchor_idxs.append(top_anchors.gather(1, top_idxs // num_classes) + start)
            cand_labels.append(top_idxs % num_classes)
            start += num_level
        scores = torch.cat(cand_scores, dim=1)  # [N, M]
        keep = scores > self.conf_thresh  # -1: below threshold
        image_idxs = torch.arange(num_images, device=device)[:, None].expand_as(scores)[keep]
        scores = scores[keep]
        anchor_idxs = torch.cat(cand_anchor_idxs, dim=1)[keep]
        labels = torch.cat(cand_labels, dim=1)[keep]
        # The one change to the verbatim copy: ties in score broken by anchor then class (below, the
        # stable sorts keep this order), as PostProcess now does, instead of by topk's order.
        canonical = torch.argsort((image_idxs * num_anchors + anchor_idxs) * num_classes + labels)
        image_idxs, scores, anchor_idxs, labels = (
            t[canonical] for t in (image_idxs, scores, anchor_idxs, labels)
        )

        # 2. Decode and clip to the valid (unpadded) image area.
        sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device)  # [N, 2] (h, w)
        boxes = self.box_coder.decode(pred_box_deltas[image_idxs, anchor_idxs], anchors[anchor_idxs])
        if self.clip_before_nms:
            boxes = _clip_xyxy(boxes, sizes[image_idxs].float())

        # 3. NMS per image and class (or per image). On CPU: one nms() per group on contiguous slices
        # after one sort (batched_nms would scan all boxes once per group); on GPU: one batched_nms.
        nms_groups = image_idxs if self.class_agnostic else image_idxs * num_classes + labels
        if device.type == "cpu":
            # Sort once by group, then score: every group is a contiguous, already sorted slice (views).
            order = torch.argsort(scores, descending=True, stable=True)
            order = order[torch.argsort(nms_groups[order], stable=True)]
            sorted_boxes, sorted_scores = boxes[order], scores[order]
            group_sizes = torch.unique_consecutive(nms_groups[order], return_counts=True)[1].tolist()
            keep, start = [], 0
            for size in group_sizes:
                keep.append(
                    nms(
                        sorted_boxes[start : start + size],
                        sorted_scores[start : start + size],
                        self.nms_thresh,
                    )
                    + start
                )
                start += size
            keep = order[torch.cat(keep)] if keep else order
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
        else:
            keep = batched_nms(boxes.double(), scores.double(), nms_groups, self.nms_thresh)

        if self.max_per_class:  # keep is sorted by decreasing score: the first of each group are its best
            keep = keep[_first_k_per_group(image_idxs[keep] * num_classes + labels[keep], self.max_per_class)]

        # 4. The max_detections best per image: stable sort by image keeps the score order within each.
        keep = keep[torch.sort(image_idxs[keep], stable=True).indices]
        kept_image_idxs = image_idxs[keep]
        counts = torch.bincount(kept_image_idxs, minlength=num_images)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=device) - first[kept_image_idxs]
        if self.max_detections:
            keep = keep[rank < self.max_detections]
            counts = counts.clamp(max=self.max_detections)

        # 5. Back to original image pixels.
        scales, orig_sizes = _scales_and_orig_sizes(targets, sizes)
        image_idxs = image_idxs[keep]
        boxes = boxes[keep] / scales.to(device)[image_idxs].repeat(1, 2)
        boxes = _clip_xyxy(boxes, orig_sizes.to(device)[image_idxs].float())
        split = counts.tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab, "anchor_idxs": a}
            for b, s, lab, a in zip(
                boxes.split(split),
                scores[keep].split(split),
                labels[keep].split(split),
                anchor_idxs[keep].split(split),
            )
        ]


# The module-level helpers of that commit, verbatim.
def _per_class_candidates(
    pred_logits: Tensor, softmax: bool, topk: int, conf_thresh: float
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Per image and class, the ``topk`` best anchors over all levels (the original's selection).

    pred_logits (Tensor[N, A, C]). Returns one-element lists (the layout of the per-level selection) of
    scores (Tensor[N, K * k], -1 where not above ``conf_thresh``), anchor indices and labels (Tensor[N,
    K * k] int64), k = min(topk, A), class-major.
    """
    num_images = pred_logits.shape[0]
    if softmax:
        scores = pred_logits.float().softmax(dim=2)[..., 1:]  # [N, A, K]
    else:
        scores = pred_logits.float().sigmoid()
    num_classes = scores.shape[2]
    top_scores, top_anchors = scores.transpose(1, 2).topk(min(topk, scores.shape[1]), dim=2)  # [N, K, k]
    top_scores = top_scores.masked_fill(top_scores <= conf_thresh, -1.0)
    labels = torch.arange(num_classes, device=pred_logits.device)[None, :, None].expand_as(top_anchors)
    return (
        [top_scores.reshape(num_images, -1)],
        [top_anchors.reshape(num_images, -1)],
        [labels.reshape(num_images, -1)],
    )


def _first_k_per_group(groups: Tensor, k: int) -> Tensor:
    """Bool mask [M]: the first ``k`` elements of each group value in ``groups`` (Tensor[M] int64)."""
    order = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1]
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    mask = torch.empty_like(groups, dtype=torch.bool)
    mask[order] = torch.arange(groups.numel(), device=groups.device) - first < k
    return mask


def _clip_xyxy(boxes: Tensor, sizes_hw: Tensor) -> Tensor:
    """Clip boxes (Tensor[M, 4] xyxy) to [0, w] x [0, h], with sizes_hw (Tensor[M, 2]) per box."""
    upper = sizes_hw.flip(-1).repeat(1, 2)  # (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), upper)


def _scales_and_orig_sizes(targets: List[Dict], sizes: Tensor):
    scales = torch.stack(
        [torch.as_tensor(t["scale"], dtype=torch.float32) if "scale" in t else torch.ones(2) for t in targets]
    )  # [N, 2] (sx, sy)
    orig_sizes = torch.stack(
        [
            torch.as_tensor(t["orig_size"]).float()
            if "orig_size" in t
            else sizes[i].cpu().float() / scales[i].flip(0)  # (h / sy, w / sx)
            for i, t in enumerate(targets)
        ]
    )  # [N, 2] (h, w)
    return scales, orig_sizes


def make_outputs(
    generator, num_images=4, columns=5, quantise=None, duplicate_rows=False, spread=2.0, shift=0.0
):
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    grid_sizes = gen.grid_sizes_for_input(64, 64)
    anchors = gen(grid_sizes)
    num_anchors = anchors.shape[0]
    logits = torch.randn(num_images, num_anchors, columns, generator=generator) * spread + shift
    if quantise:  # few distinct values: many exactly tied scores
        logits = (logits * quantise).round() / quantise
    if duplicate_rows:  # identical rows, as anchors in a padded region see identical features
        logits[:, 1::2] = logits[:, 0::2][:, : logits[:, 1::2].shape[1]]
    deltas = torch.randn(num_images, num_anchors, 4, generator=generator) * 0.3
    return {
        "pred_logits": logits,
        "pred_box_deltas": deltas,
        "anchors": anchors,
        "num_anchors_per_level": gen.num_anchors_per_level(grid_sizes),
    }


def make_targets(num_images):
    sizes = [
        ([64, 64], [1.0, 1.0], [64, 64]),
        ([48, 64], [0.5, 0.5], [96, 128]),
        ([64, 40], [2.0, 0.8], [80, 20]),
    ]
    targets = []
    for i in range(num_images):
        size, scale, orig = sizes[i % len(sizes)]
        targets.append(
            {
                "size": torch.tensor(size),
                "scale": torch.tensor(scale),
                "orig_size": torch.tensor(orig),
            }
        )
    return targets


def assert_same(results, expected):
    assert len(results) == len(expected)
    for i, (got, want) in enumerate(zip(results, expected)):
        assert torch.equal(got["labels"], want["labels"]), i
        assert torch.equal(got["anchor_idxs"], want["anchor_idxs"]), i
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-6, atol=1e-6)


OUR_PROTOCOL = dict(conf_thresh=0.05, pre_nms_topk=1000, nms_thresh=0.5, max_detections=100)
ORIGINAL_PROTOCOL = dict(
    conf_thresh=0.001,
    pre_nms_topk=200,
    nms_thresh=0.45,
    max_detections=0,
    per_class_topk=True,
    max_per_class=50,
    clip_before_nms=False,
)
CASES = {
    "continuous": {},
    "quantised ties": {"quantise": 2},
    "duplicate rows": {"duplicate_rows": True},
    "low scores": {"shift": -4.0},
}
