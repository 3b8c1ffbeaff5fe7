import pytest
import torch
from torchvision.ops import box_iou, nms

from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.box_coder import BoxCoder
from layers.postprocess import PostProcess


def _target(size, scale, orig_size):
    return {
        "size": torch.tensor(size, dtype=torch.int64),
        "scale": torch.tensor(scale, dtype=torch.float32),
        "orig_size": torch.tensor(orig_size, dtype=torch.int64),
    }


def _random_outputs(generator, num_images=3, columns=4):
    gen = AnchorGenerator(predefined_anchor_whs(2, base_sizes=(12, 24, 48)), strides=(8, 16, 32))
    grid_sizes = gen.grid_sizes_for_input(64, 64)
    anchors = gen(grid_sizes)
    num_anchors = anchors.shape[0]
    return {
        "pred_logits": torch.randn(num_images, num_anchors, columns, generator=generator) * 2,
        "pred_box_deltas": torch.randn(num_images, num_anchors, 4, generator=generator) * 3,
        "anchors": anchors,
        "num_anchors_per_level": gen.num_anchors_per_level(grid_sizes),
    }


TARGETS = [
    _target([64, 64], [1.0, 1.0], [64, 64]),
    _target([48, 64], [0.5, 0.5], [96, 128]),  # keep_aspect-like: padded rows below 48
    _target([64, 40], [2.0, 0.8], [80, 20]),
]


def reference_postprocess(outputs, target, score_type, conf, topk, nms_thresh, max_det, agnostic):
    """Single image, loops over levels and classes, torchvision.ops.nms per class."""
    coder = BoxCoder()
    logits = outputs["pred_logits"][0]
    probs = torch.softmax(logits, -1)[:, 1:] if score_type == "softmax" else torch.sigmoid(logits)
    num_classes = probs.shape[1]
    h, w = target["size"].tolist()
    cand = []  # (score, anchor, label)
    start = 0
    for n in outputs["num_anchors_per_level"]:
        level = [
            (probs[a, c].item(), a, c)
            for a in range(start, start + n)
            for c in range(num_classes)
            if probs[a, c].item() > conf
        ]
        cand += sorted(level, reverse=True)[:topk]
        start += n
    if not cand:
        return (
            torch.zeros(0, 4),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
        )
    scores = torch.tensor([c[0] for c in cand])
    anchor_idxs = torch.tensor([c[1] for c in cand])
    labels = torch.tensor([c[2] for c in cand])
    boxes = coder.decode(outputs["pred_box_deltas"][0, anchor_idxs], outputs["anchors"][anchor_idxs])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    kept = []
    for c in [None] if agnostic else range(num_classes):
        idx = torch.arange(len(cand)) if c is None else (labels == c).nonzero().flatten()
        kept += idx[nms(boxes[idx].double(), scores[idx].double(), nms_thresh)].tolist()
    kept = sorted(kept, key=lambda i: -scores[i].item())[:max_det]
    kept = torch.tensor(kept, dtype=torch.int64)
    sx, sy = target["scale"].tolist()
    oh, ow = target["orig_size"].tolist()
    out = boxes[kept] / torch.tensor([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clamp(0, ow)
    out[:, 1::2] = out[:, 1::2].clamp(0, oh)
    return out, scores[kept], labels[kept], anchor_idxs[kept]


def _single(outputs, i):
    return {
        **outputs,
        "pred_logits": outputs["pred_logits"][i : i + 1],
        "pred_box_deltas": outputs["pred_box_deltas"][i : i + 1],
    }


@pytest.mark.parametrize("score_type, columns", [("softmax", 5), ("sigmoid", 4)])
@pytest.mark.parametrize("agnostic", [False, True])
# Few candidates: batched_nms takes its coordinate-offset path; many (> 1000 boxes): its per-group loop.
@pytest.mark.parametrize("conf, topk", [(0.3, 50), (0.05, 1000)])
def test_batched_equals_single_and_reference(score_type, columns, agnostic, conf, topk):
    g = torch.Generator().manual_seed(columns + agnostic)
    outputs = _random_outputs(g, columns=columns)
    post = PostProcess(
        BoxCoder(),
        score_type,
        conf_thresh=conf,
        pre_nms_topk=topk,
        nms_thresh=0.5,
        max_detections=20,
        class_agnostic=agnostic,
    )
    batched = post(outputs, TARGETS)
    assert len(batched) == 3
    for i, target in enumerate(TARGETS):
        single = post(_single(outputs, i), [target])[0]
        for key in ("boxes", "scores", "labels", "anchor_idxs"):
            assert torch.equal(batched[i][key], single[key]), (i, key)
        boxes, scores, labels, anchor_idxs = reference_postprocess(
            _single(outputs, i), target, score_type, conf, topk, 0.5, 20, agnostic
        )
        assert torch.equal(single["anchor_idxs"], anchor_idxs)
        assert torch.equal(single["labels"], labels)
        assert torch.allclose(single["scores"], scores)
        assert torch.allclose(single["boxes"], boxes, atol=1e-4)
        assert 0 < len(single["scores"]) <= 20


def test_limits_and_clipping():
    g = torch.Generator().manual_seed(7)
    outputs = _random_outputs(g, columns=5)
    outputs["pred_box_deltas"] *= 5  # many boxes far outside the image
    post = PostProcess(
        BoxCoder(), "softmax", conf_thresh=0.2, pre_nms_topk=1000, nms_thresh=0.7, max_detections=7
    )
    results = post(outputs, TARGETS)
    for result, target in zip(results, TARGETS):
        oh, ow = target["orig_size"].tolist()
        assert len(result["scores"]) == 7
        assert (result["scores"] > 0.2).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        b = result["boxes"]
        assert (b >= 0).all() and (b[:, 0::2] <= ow).all() and (b[:, 1::2] <= oh).all()
        assert result["labels"].dtype == torch.int64 and result["anchor_idxs"].dtype == torch.int64
        assert ((result["labels"] >= 0) & (result["labels"] < 4)).all()
    # The valid area is clipped before mapping back: image 1's padded rows (y > 48) never appear.
    assert (results[1]["boxes"][:, 1::2] <= 48 / 0.5).all()


def test_pre_nms_topk_per_level():
    g = torch.Generator().manual_seed(8)
    outputs = _random_outputs(g, num_images=2, columns=3)
    post = PostProcess(
        BoxCoder(), "sigmoid", conf_thresh=0.05, pre_nms_topk=2, nms_thresh=1.0, max_detections=100
    )
    results = post(outputs, TARGETS[:2])
    probs = torch.sigmoid(outputs["pred_logits"])
    bounds = torch.tensor([0] + outputs["num_anchors_per_level"]).cumsum(0)
    for i, result in enumerate(results):
        assert len(result["scores"]) == 2 * 3  # 2 per level, nothing suppressed at nms_thresh 1
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            in_level = (result["anchor_idxs"] >= lo) & (result["anchor_idxs"] < hi)
            assert torch.allclose(result["scores"][in_level], probs[i, lo:hi].flatten().topk(2).values)


def test_softmax_background_never_a_label():
    anchors = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 15, 15]], dtype=torch.float32)
    logits = torch.tensor([[[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0], [-10.0, -10.0, 5.0]]])
    outputs = {"pred_logits": logits, "pred_box_deltas": torch.zeros(1, 3, 4), "anchors": anchors}
    target = _target([40, 40], [1.0, 1.0], [40, 40])
    result = PostProcess(BoxCoder(), "softmax")(outputs, [target])[0]
    # Anchor 0 is confidently background: no detection; column c + 1 is label c.
    assert result["anchor_idxs"].tolist() == [1, 2]
    assert result["labels"].tolist() == [0, 1]
    assert torch.equal(result["boxes"], anchors[1:])


def test_class_agnostic_vs_class_aware():
    anchors = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=torch.float32)
    assert box_iou(anchors[:1], anchors[1:]).item() > 0.5
    # Anchor 0: class 0 at p 0.987; anchor 1: class 1 at p 0.965; every other score is below 0.05.
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 4.0]]])
    outputs = {"pred_logits": logits, "pred_box_deltas": torch.zeros(1, 2, 4), "anchors": anchors}
    target = _target([20, 20], [1.0, 1.0], [20, 20])
    aware = PostProcess(BoxCoder(), "softmax", nms_thresh=0.5)(outputs, [target])[0]
    assert aware["labels"].tolist() == [0, 1] and aware["anchor_idxs"].tolist() == [0, 1]
    agnostic = PostProcess(BoxCoder(), "softmax", nms_thresh=0.5, class_agnostic=True)(outputs, [target])[0]
    assert agnostic["labels"].tolist() == [0] and agnostic["anchor_idxs"].tolist() == [0]


def test_maps_to_original_pixels():
    anchors = torch.tensor([[4, 4, 8, 8], [10, 2, 18, 14]], dtype=torch.float32)
    logits = torch.tensor([[[5.0], [4.0]]])
    outputs = {"pred_logits": logits, "pred_box_deltas": torch.zeros(1, 2, 4), "anchors": anchors}
    # sx = 2, sy = 0.5; the original image is 32 high and 8 wide.
    target = _target([16, 16], [2.0, 0.5], [32, 8])
    result = PostProcess(BoxCoder(), "sigmoid")(outputs, [target])[0]
    expected = torch.tensor([[2.0, 8.0, 4.0, 16.0], [5.0, 4.0, 8.0, 28.0]])  # second one clipped at w = 8
    assert torch.allclose(result["boxes"], expected)


def test_no_detections():
    outputs = _random_outputs(torch.Generator().manual_seed(9), num_images=2, columns=5)
    results = PostProcess(BoxCoder(), "softmax", conf_thresh=0.999)(outputs, TARGETS[:2])
    assert [len(r["scores"]) for r in results] == [0, 0]
    assert results[0]["boxes"].shape == (0, 4)


# --protocol original (the original codebase's evaluate.py / train.py validate) --------------------------

ORIGINAL_KWARGS = dict(
    conf_thresh=0.001,
    pre_nms_topk=3,
    nms_thresh=0.45,
    max_detections=0,
    per_class_topk=True,
    max_per_class=2,
    clip_before_nms=False,
)


def _hand_built_case():
    """Six anchors (= boxes: zero deltas) in two levels of three, two sigmoid classes with exact scores.

    a0 [0,0,10,10]; a1 [1,0,11,10] (IoU 90/110 = 0.82 with a0); a2, a3, a4 apart; a5 [-20,0,5,10] leaves
    the 100 x 100 image: unclipped its IoU with a0 is 50/300 = 0.17, clipped to [0,0,5,10] it is 50/100 =
    0.5 > 0.45.
    """
    anchors = torch.tensor(
        [
            [0, 0, 10, 10],
            [1, 0, 11, 10],
            [20, 20, 30, 30],
            [40, 40, 50, 50],
            [60, 60, 70, 70],
            [-20, 0, 5, 10],
        ],
        dtype=torch.float32,
    )
    probs = torch.tensor(
        [  # class 0, class 1
            [0.90, 0.0005],  # a0: class 1 below conf_thresh 0.001
            [0.80, 0.0001],
            [0.70, 0.95],
            [0.60, 0.94],
            [0.50, 0.93],
            [0.85, 0.0001],
        ]
    )
    outputs = {
        "pred_logits": torch.logit(probs.double()).float()[None],
        "pred_box_deltas": torch.zeros(1, 6, 4),
        "anchors": anchors,
        "num_anchors_per_level": [3, 3],
    }
    return outputs, _target([100, 100], [1.0, 1.0], [100, 100])


def test_original_protocol_hand_built_case():
    outputs, target = _hand_built_case()
    result = PostProcess(BoxCoder(), "sigmoid", **ORIGINAL_KWARGS)(outputs, [target])[0]
    # Class 0: its 3 best over both levels are a0 .90, a5 .85, a1 .80 (a2 .70 is not a candidate);
    # NMS on unclipped boxes keeps a0 and a5, suppresses a1. Class 1: a2, a3, a4 survive NMS and the cap of
    # 2 per class keeps a2, a3. No cap per image: all 4, by decreasing score; a5 is clipped after NMS.
    assert result["anchor_idxs"].tolist() == [2, 3, 0, 5]
    assert result["labels"].tolist() == [1, 1, 0, 0]
    assert torch.allclose(result["scores"], torch.tensor([0.95, 0.94, 0.90, 0.85]))
    assert torch.allclose(result["boxes"][3], torch.tensor([0.0, 0.0, 5.0, 10.0]))


def test_original_protocol_differs_from_ours_where_expected():
    outputs, target = _hand_built_case()
    # Clipping before NMS (ours) makes a5 overlap a0 by 0.5: suppressed.
    clipped = PostProcess(BoxCoder(), "sigmoid", **{**ORIGINAL_KWARGS, "clip_before_nms": True})
    assert clipped(outputs, [target])[0]["anchor_idxs"].tolist() == [2, 3, 0]
    # 2 candidates per class over all levels: class 0 a0, a5 and class 1 a2, a3, all kept.
    per_class = PostProcess(BoxCoder(), "sigmoid", **{**ORIGINAL_KWARGS, "pre_nms_topk": 2})
    assert per_class(outputs, [target])[0]["anchor_idxs"].tolist() == [2, 3, 0, 5]
    # 2 per level (ours): level 0 offers a2/1, a0/0 and level 1 a3/1, a4/1: a5 is no candidate.
    per_level = PostProcess(
        BoxCoder(), "sigmoid", **{**ORIGINAL_KWARGS, "pre_nms_topk": 2, "per_class_topk": False}
    )
    assert per_level(outputs, [target])[0]["anchor_idxs"].tolist() == [2, 3, 0]
    # A cap per image applies after the per-class caps.
    capped = PostProcess(BoxCoder(), "sigmoid", **{**ORIGINAL_KWARGS, "max_detections": 3})
    assert capped(outputs, [target])[0]["anchor_idxs"].tolist() == [2, 3, 0]
    # No cap per class: class 1 keeps a4 too.
    uncapped = PostProcess(BoxCoder(), "sigmoid", **{**ORIGINAL_KWARGS, "max_per_class": 0})
    assert uncapped(outputs, [target])[0]["anchor_idxs"].tolist() == [2, 3, 4, 0, 5]


def _original_nms():
    """modules/box_utils.nms of the original codebase (FPN_ORIGINAL_REPO, or /work/original), or skip."""
    import importlib.util
    import os

    root = os.environ.get("FPN_ORIGINAL_REPO", "/work/original")
    path = os.path.join(root, "modules", "box_utils.py")
    if not os.path.isfile(path):
        pytest.skip("the original codebase is not checked out (set FPN_ORIGINAL_REPO)")
    spec = importlib.util.spec_from_file_location("original_box_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.nms


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")  # the original's nms
@pytest.mark.parametrize("max_per_class", [50, 20, 3])
def test_original_protocol_matches_the_original_evaluation_loop(max_per_class):
    """Against the original's per-class loop (train.py validate / evaluate.py validate_coco) with its own
    nms(): softmax, scores > conf, nms(boxes, scores, 0.45, top_k=200), the first max_per_class kept, boxes
    clamped after NMS; run on our decoded boxes."""
    original_nms = _original_nms()
    g = torch.Generator().manual_seed(max_per_class)
    outputs = _random_outputs(g, num_images=2, columns=4)
    post = PostProcess(
        BoxCoder(),
        "softmax",
        conf_thresh=0.001,
        pre_nms_topk=200,
        nms_thresh=0.45,
        max_detections=0,
        per_class_topk=True,
        max_per_class=max_per_class,
        clip_before_nms=False,
    )
    targets = [_target([64, 64], [1.0, 1.0], [64, 64]), _target([64, 64], [0.5, 0.5], [128, 128])]
    results = post(outputs, targets)
    for i, (result, target) in enumerate(zip(results, targets)):
        probs = outputs["pred_logits"][i].softmax(-1)
        boxes = BoxCoder().decode(outputs["pred_box_deltas"][i], outputs["anchors"])
        expected = []  # (score, label, box in original pixels)
        for cl in range(1, probs.shape[1]):
            scores = probs[:, cl]
            mask = scores.gt(0.001)
            ids, count = original_nms(boxes[mask].clone(), scores[mask].clone(), 0.45, 200)
            picked = ids[:count][:max_per_class]
            scale = target["scale"][0].item()
            for score, box in zip(scores[mask][picked], boxes[mask][picked] / scale):
                expected.append((score.item(), cl - 1, box.clamp(0, target["orig_size"][0].item())))
        expected.sort(key=lambda e: -e[0])
        assert len(result["scores"]) == len(expected) > 0
        assert torch.allclose(result["scores"], torch.tensor([e[0] for e in expected]))
        assert result["labels"].tolist() == [e[1] for e in expected]
        assert torch.allclose(result["boxes"], torch.stack([e[2] for e in expected]), atol=1e-4)
