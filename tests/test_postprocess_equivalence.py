"""layers/postprocess.py against the implementation it replaced (copied below as the reference): the same
detections in the same order, for both score types, our protocol and the original one, with empty
images, images with nothing above the threshold, tied scores, boxes at the IoU threshold, suppression
chains, and groups beyond the vectorised NMS's size limit."""

import collections
from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

import layers.grouped_nms as grouped_nms
import layers.postprocess as postprocess
from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.box_coder import BoxCoder
from layers.grouped_nms import nms_sorted_groups
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


def _outputs(generator, num_images=4, columns=5, quantise=None, duplicate_rows=False, spread=2.0, shift=0.0):
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


def _targets(num_images):
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


def _assert_same(results, expected):
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


@pytest.mark.parametrize("score_type, columns", [("sigmoid", 4), ("softmax", 5)])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "settings",
    [
        OUR_PROTOCOL,
        {**OUR_PROTOCOL, "pre_nms_topk": 7, "max_detections": 10},  # the per-level caps bite
        {**OUR_PROTOCOL, "class_agnostic": True, "nms_thresh": 0.3},
        {**OUR_PROTOCOL, "conf_thresh": 0.3, "nms_thresh": 0.7},
        {**OUR_PROTOCOL, "max_per_class": 2},
        ORIGINAL_PROTOCOL,
        {**ORIGINAL_PROTOCOL, "pre_nms_topk": 5, "max_per_class": 2},
    ],
)
def test_same_detections_as_before(score_type, columns, case, settings):
    g = torch.Generator().manual_seed(columns * 10 + list(CASES).index(case))
    outputs = _outputs(g, columns=columns, **CASES[case])
    outputs["pred_logits"][2] = -30.0  # an image with nothing above any threshold
    if score_type == "softmax":
        outputs["pred_logits"][2, :, 0] = 30.0  # all background
    targets = _targets(4)
    new = PostProcess(BoxCoder(), score_type, **settings)
    old = ReferencePostProcess(BoxCoder(), score_type, **settings)
    expected = old(outputs, targets)
    assert len(expected[2]["scores"]) == 0 and sum(len(e["scores"]) for e in expected) > 0
    _assert_same(new(outputs, targets), expected)


def _count_paths(monkeypatch) -> collections.Counter:
    """Counts, from now on, the NMS runs (one per round of the prefix path, one for the per-level path)
    and the per-level path's runs."""
    calls = collections.Counter()

    def counted(name):
        original = getattr(PostProcess, name)

        def spy(self, *args):
            calls[name] += 1
            return original(self, *args)

        return spy

    for name in ("_nms", "_per_level_candidates"):
        monkeypatch.setattr(PostProcess, name, counted(name))
    return calls


@pytest.mark.parametrize("score_type, columns", [("sigmoid", 4), ("softmax", 5)])
@pytest.mark.parametrize("case", ["continuous", "quantised ties", "duplicate rows"])
@pytest.mark.parametrize("settings", [OUR_PROTOCOL, {**OUR_PROTOCOL, "max_per_class": 30}])
def test_prefix_path_alone_gives_the_same_detections(score_type, columns, case, settings, monkeypatch):
    """Each image's best 4 * max_detections pairs (ties at the cut left out) settle its detections in one
    round, ties in score included: the per-level path never runs."""
    g = torch.Generator().manual_seed(columns * 10 + list(CASES).index(case))
    outputs = _outputs(g, columns=columns, **CASES[case])
    expected = ReferencePostProcess(BoxCoder(), score_type, **settings)(outputs, _targets(4))
    calls = _count_paths(monkeypatch)
    _assert_same(PostProcess(BoxCoder(), score_type, **settings)(outputs, _targets(4)), expected)
    assert (calls["_nms"], calls["_per_level_candidates"]) == (1, 0)
    assert [len(e["scores"]) for e in expected] == [100] * 4


def _blob_outputs(score_type: str, width: float):
    """128 px, the best scores on a blob of anchors around the centre (``width`` of the image): NMS
    removes most of the best pairs, so the prefix path needs more of them."""
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    grid_sizes = gen.grid_sizes_for_input(128, 128)
    anchors = gen(grid_sizes)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    blob = 6 * torch.exp(-((centres - 64) ** 2).sum(1) / (width * 128) ** 2)  # [A]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, anchors.shape[0], 4, generator=g) + blob[None, :, None]
    if score_type == "softmax":
        # background ahead of the classes but on the blob
        logits = torch.cat([torch.full_like(logits[..., :1], 4.0), logits], dim=2)
    return {
        "pred_logits": logits,
        "pred_box_deltas": torch.randn(2, anchors.shape[0], 4, generator=g) * 0.1,
        "anchors": anchors,
        "num_anchors_per_level": gen.num_anchors_per_level(grid_sizes),
    }


@pytest.mark.parametrize(
    "score_type, width, nms_thresh, rounds, per_level",
    [
        # 400 pairs leave fewer than 100 detections after NMS; 1000 (pre_nms_topk) leave enough
        ("sigmoid", 0.15, 0.3, 2, 0),
        ("softmax", 0.15, 0.3, 2, 0),
        # 1000 are not enough either: the per-level path decides
        ("sigmoid", 0.25, 0.3, 2, 1),
        ("softmax", 0.2, 0.2, 2, 1),
    ],
)
def test_prefix_path_widens_then_hands_over(score_type, width, nms_thresh, rounds, per_level, monkeypatch):
    outputs = _blob_outputs(score_type, width)
    targets = [{"size": torch.tensor([128, 128])}] * 2
    settings = {**OUR_PROTOCOL, "class_agnostic": True, "nms_thresh": nms_thresh}
    expected = ReferencePostProcess(BoxCoder(), score_type, **settings)(outputs, targets)
    calls = _count_paths(monkeypatch)
    _assert_same(PostProcess(BoxCoder(), score_type, **settings)(outputs, targets), expected)
    assert (calls["_nms"], calls["_per_level_candidates"]) == (rounds + per_level, per_level)
    assert [len(e["scores"]) for e in expected] == [100, 100]


@pytest.mark.parametrize("score_type, columns", [("sigmoid", 4), ("softmax", 5)])
def test_prefix_path_hands_nan_over(score_type, columns, monkeypatch):
    """NaN ranks first in topk, so the prefix could miss a pair: the per-level path decides."""
    g = torch.Generator().manual_seed(5)
    outputs = _outputs(g, columns=columns)
    outputs["pred_logits"][1, 7, 2] = float("nan")
    expected = ReferencePostProcess(BoxCoder(), score_type, **OUR_PROTOCOL)(outputs, _targets(4))
    calls = _count_paths(monkeypatch)
    _assert_same(PostProcess(BoxCoder(), score_type, **OUR_PROTOCOL)(outputs, _targets(4)), expected)
    assert (calls["_nms"], calls["_per_level_candidates"]) == (1, 1)
    assert all(len(e["scores"]) > 0 for e in expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_best_against_torch(dtype, monkeypatch):
    """The CPU ranking (exp2 by chunks, here of 7 rows per thread) against torch.logsumexp and amax, with
    rows of large, tiny, infinite and background-dominated logits."""
    monkeypatch.setattr(postprocess, "_SOFTMAX_ROWS_PER_THREAD", 7)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 40, 6, generator=g) * 3
    logits[0, :5] *= 1e3  # large
    logits[0, 5:10] *= 1e-6  # tiny
    logits[1, :5, 0] += 80.0  # background far ahead
    logits[1, 5] = float("-inf")  # a row of -inf: normaliser -inf
    logits[1, 6, 3] = float("-inf")  # one -inf logit
    logits[2, 0, 2] = float("inf")  # +inf: normaliser +inf, best NaN (inf - inf), as torch gives
    logits = logits.to(dtype)
    best, log_norm = postprocess._softmax_best(logits)
    want_log_norm = torch.logsumexp(logits.float(), dim=2)
    want_best = logits[..., 1:].amax(dim=2).float() - want_log_norm
    torch.testing.assert_close(log_norm, want_log_norm, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(best, want_best, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert log_norm[1, 5] == float("-inf") and log_norm[2, 0] == float("inf") and best[2, 0].isnan()


@pytest.mark.parametrize("score_type, columns", [("sigmoid", 4), ("softmax", 5)])
def test_same_detections_with_large_groups_and_small_chunks(score_type, columns, monkeypatch):
    """Groups beyond NMS_VECTOR_MAX go to torchvision's nms, mixed with vectorised ones; the softmax
    normaliser in chunks of 7 rows per thread, and the NMS pairs in chunks of about 5, give the same result
    as in one piece."""
    monkeypatch.setattr(grouped_nms, "NMS_VECTOR_MAX", 3)
    monkeypatch.setattr(postprocess, "_SOFTMAX_ROWS_PER_THREAD", 7)
    monkeypatch.setattr(grouped_nms, "NMS_PAIRS_PER_CHUNK", 5)
    g = torch.Generator().manual_seed(11)
    outputs = _outputs(g, columns=columns, spread=3.0)
    settings = {**OUR_PROTOCOL, "nms_thresh": 0.4}
    expected = ReferencePostProcess(BoxCoder(), score_type, **settings)(outputs, _targets(4))
    _assert_same(PostProcess(BoxCoder(), score_type, **settings)(outputs, _targets(4)), expected)


@pytest.mark.slow
@pytest.mark.parametrize("score_type", ["sigmoid", "softmax"])
def test_same_detections_at_benchmark_size(score_type):
    """bench_components' setting (600 px, the 67,995 anchors of P3-P7, 81 columns, N(-6, 1.5^2) logits),
    2 images: levels larger than pre_nms_topk, thousands of candidates per level."""
    gen = AnchorGenerator(predefined_anchor_whs())
    grid_sizes = gen.grid_sizes_for_input(600, 600)
    anchors = gen(grid_sizes)
    g = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, anchors.shape[0], 81, generator=g) * 1.5 - 6.0,
        "pred_box_deltas": torch.randn(2, anchors.shape[0], 4, generator=g) * 0.5,
        "anchors": anchors,
        "num_anchors_per_level": gen.num_anchors_per_level(grid_sizes),
    }
    targets = [{"size": torch.tensor([600, 600])}] * 2
    expected = ReferencePostProcess(BoxCoder((0.1, 0.2)), score_type, **OUR_PROTOCOL)(outputs, targets)
    assert [len(e["scores"]) for e in expected] == [100, 100]
    _assert_same(PostProcess(BoxCoder((0.1, 0.2)), score_type, **OUR_PROTOCOL)(outputs, targets), expected)


def test_all_below_threshold_and_empty_batch():
    g = torch.Generator().manual_seed(12)
    outputs = _outputs(g, columns=4, shift=-30.0)
    for score_type in ("sigmoid", "softmax"):
        if score_type == "softmax":
            outputs["pred_logits"][..., 0] = 30.0  # background everywhere
        results = PostProcess(BoxCoder(), score_type, **OUR_PROTOCOL)(outputs, _targets(4))
        assert [len(r["scores"]) for r in results] == [0, 0, 0, 0]
    empty = {
        **outputs,
        "pred_logits": outputs["pred_logits"][:0],
        "pred_box_deltas": outputs["pred_box_deltas"][:0],
    }
    assert PostProcess(BoxCoder(), "sigmoid", **OUR_PROTOCOL)(empty, []) == []


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
