"""layers/postprocess.py against the implementation it replaced (tests/postprocess_reference.py): the same
detections in the same order, for both score types, our protocol and the original one, with empty
images, images with nothing above the threshold, tied scores, and groups beyond the vectorised NMS's
size limit."""

import pytest
import torch
from postprocess_reference import (
    CASES,
    ORIGINAL_PROTOCOL,
    OUR_PROTOCOL,
    ReferencePostProcess,
    assert_same,
    make_outputs,
    make_targets,
)

import layers.grouped_nms as grouped_nms
import layers.postprocess as postprocess
from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.box_coder import BoxCoder
from layers.postprocess import PostProcess


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
    outputs = make_outputs(g, columns=columns, **CASES[case])
    outputs["pred_logits"][2] = -30.0  # an image with nothing above any threshold
    if score_type == "softmax":
        outputs["pred_logits"][2, :, 0] = 30.0  # all background
    targets = make_targets(4)
    new = PostProcess(BoxCoder(), score_type, **settings)
    old = ReferencePostProcess(BoxCoder(), score_type, **settings)
    expected = old(outputs, targets)
    assert len(expected[2]["scores"]) == 0 and sum(len(e["scores"]) for e in expected) > 0
    assert_same(new(outputs, targets), expected)


@pytest.mark.parametrize("score_type, columns", [("sigmoid", 4), ("softmax", 5)])
def test_same_detections_with_large_groups_and_small_chunks(score_type, columns, monkeypatch):
    """Groups beyond NMS_VECTOR_MAX go to torchvision's nms, mixed with vectorised ones; the softmax
    normaliser in chunks of 7 rows per thread, and the NMS pairs in chunks of about 5, give the same result
    as in one piece."""
    monkeypatch.setattr(grouped_nms, "NMS_VECTOR_MAX", 3)
    monkeypatch.setattr(postprocess, "_SOFTMAX_ROWS_PER_THREAD", 7)
    monkeypatch.setattr(grouped_nms, "NMS_PAIRS_PER_CHUNK", 5)
    g = torch.Generator().manual_seed(11)
    outputs = make_outputs(g, columns=columns, spread=3.0)
    settings = {**OUR_PROTOCOL, "nms_thresh": 0.4}
    expected = ReferencePostProcess(BoxCoder(), score_type, **settings)(outputs, make_targets(4))
    assert_same(PostProcess(BoxCoder(), score_type, **settings)(outputs, make_targets(4)), expected)


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
    assert_same(PostProcess(BoxCoder((0.1, 0.2)), score_type, **OUR_PROTOCOL)(outputs, targets), expected)


def test_all_below_threshold_and_empty_batch():
    g = torch.Generator().manual_seed(12)
    outputs = make_outputs(g, columns=4, shift=-30.0)
    for score_type in ("sigmoid", "softmax"):
        if score_type == "softmax":
            outputs["pred_logits"][..., 0] = 30.0  # background everywhere
        results = PostProcess(BoxCoder(), score_type, **OUR_PROTOCOL)(outputs, make_targets(4))
        assert [len(r["scores"]) for r in results] == [0, 0, 0, 0]
    empty = {
        **outputs,
        "pred_logits": outputs["pred_logits"][:0],
        "pred_box_deltas": outputs["pred_box_deltas"][:0],
    }
    assert PostProcess(BoxCoder(), "sigmoid", **OUR_PROTOCOL)(empty, []) == []
