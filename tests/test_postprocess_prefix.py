"""The post-processor's prefix path (each image's best pairs only) and its CPU softmax ranking: the
per-level path's detections, which path ran, how many rounds, and the hand-over to the per-level path."""

import collections

import pytest
import torch
from postprocess_reference import (
    CASES,
    OUR_PROTOCOL,
    ReferencePostProcess,
    assert_same,
    make_outputs,
    make_targets,
)

import layers.postprocess as postprocess
from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.box_coder import BoxCoder
from layers.postprocess import PostProcess


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
    outputs = make_outputs(g, columns=columns, **CASES[case])
    expected = ReferencePostProcess(BoxCoder(), score_type, **settings)(outputs, make_targets(4))
    calls = _count_paths(monkeypatch)
    assert_same(PostProcess(BoxCoder(), score_type, **settings)(outputs, make_targets(4)), expected)
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
    assert_same(PostProcess(BoxCoder(), score_type, **settings)(outputs, targets), expected)
    assert (calls["_nms"], calls["_per_level_candidates"]) == (rounds + per_level, per_level)
    assert [len(e["scores"]) for e in expected] == [100, 100]


@pytest.mark.parametrize("score_type, columns", [("sigmoid", 4), ("softmax", 5)])
def test_prefix_path_hands_nan_over(score_type, columns, monkeypatch):
    """NaN ranks first in topk, so the prefix could miss a pair: the per-level path decides."""
    g = torch.Generator().manual_seed(5)
    outputs = make_outputs(g, columns=columns)
    outputs["pred_logits"][1, 7, 2] = float("nan")
    expected = ReferencePostProcess(BoxCoder(), score_type, **OUR_PROTOCOL)(outputs, make_targets(4))
    calls = _count_paths(monkeypatch)
    assert_same(PostProcess(BoxCoder(), score_type, **OUR_PROTOCOL)(outputs, make_targets(4)), expected)
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
