"""layers/kmeans.py: the per-level IoU k-means (against planted clusters and a plain reference
implementation) and the grid anchor-quality measure (hand-computed, and against the exhaustive
box_iou). kmeans_for_anchors.py's box loading, report and end-to-end runs:
tests/test_kmeans_for_anchors.py."""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from layers.anchor_sets import original_anchor_whs
from layers.anchors import AnchorGenerator, predefined_anchor_whs
from layers.kmeans import (
    anchor_quality,
    assign_levels,
    best_anchor_iou,
    cluster_anchor_whs,
    iou_kmeans,
    kmeans_aspect_ratios,
)
from utils.box_ops import box_iou_wh_np

# ---------------------------------------------------------------------------------------------
# clustering

# Three planted shapes with 3% multiplicative noise, 400 boxes each.
PLANTED = np.array([[10.0, 20.0], [30.0, 30.0], [60.0, 20.0]])


def planted_boxes(seed=0):
    rng = np.random.default_rng(seed)
    whs = np.concatenate([c * np.exp(rng.normal(0.0, 0.03, (400, 2))) for c in PLANTED])
    labels = np.repeat(np.arange(3), 400)
    order = rng.permutation(whs.shape[0])  # interleave, so nothing depends on the input order
    return whs[order], labels[order]


def test_kmeans_aspect_ratios():
    assert kmeans_aspect_ratios(3) == (0.5, 1.0, 2.0)  # exactly the predefined ratios
    assert kmeans_aspect_ratios(1) == (1.0,)
    np.testing.assert_allclose(kmeans_aspect_ratios(5), [0.5, 2**-0.5, 1.0, 2**0.5, 2.0])
    with pytest.raises(ValueError):
        kmeans_aspect_ratios(0)


def test_iou_kmeans_recovers_planted_clusters_deterministically():
    whs, labels = planted_boxes()
    init = np.array([[12.0, 16.0], [25.0, 40.0], [80.0, 25.0]])
    result = iou_kmeans(whs, init)
    assert result.converged and result.num_reseeded == 0 and result.num_empty == 0
    np.testing.assert_allclose(result.centres, PLANTED, rtol=0.02)
    assert np.array_equal(result.assignments, labels)
    again = iou_kmeans(whs, init)
    assert np.array_equal(again.centres, result.centres) and again.num_iters == result.num_iters


def test_iou_kmeans_reseeds_an_empty_cluster():
    whs, labels = planted_boxes()
    # The (1000, 1000) centre gets no box; the (30, 30) centre starts with both the square and the wide
    # boxes (IoU 0.4 vs 0.17 for the wide ones), so the worst-fitted box is a wide one: the re-seeded
    # cluster picks up the wide group and all three are recovered.
    result = iou_kmeans(whs, np.array([[10.0, 20.0], [30.0, 30.0], [1000.0, 1000.0]]))
    assert result.num_reseeded == 1 and result.num_empty == 0 and result.converged
    np.testing.assert_allclose(result.centres, PLANTED, rtol=0.02)
    assert np.array_equal(result.assignments, labels)


def test_iou_kmeans_fewer_distinct_boxes_than_clusters_terminates():
    # Two distinct shapes, three clusters: one cluster cannot be filled; it must stop, not loop.
    result = iou_kmeans(
        np.array([[10.0, 10.0], [20.0, 20.0], [20.0, 20.0]]), np.array([[10, 10], [20, 20], [40, 40]])
    )
    assert result.converged and result.num_empty == 1 and result.mean_iou == 1.0
    np.testing.assert_allclose(result.centres[:2], [[10, 10], [20, 20]])
    empty = iou_kmeans(np.zeros((0, 2)), np.array([[1.0, 2.0]]))
    assert empty.num_iters == 0 and empty.num_empty == 1


def plain_iou_kmeans(whs, init, max_iter=300):
    """Reference: the textbook loop, every box re-measured and every median recomputed each iteration."""

    def assign(centres):
        iou = box_iou_wh_np(whs, centres)
        assignments = iou.argmax(1)
        return assignments, iou[np.arange(len(whs)), assignments]

    def reseed(centres, assignments, own_iou):
        empty = np.flatnonzero(np.bincount(assignments, minlength=len(centres)) == 0)
        if empty.size == 0:
            return centres, assignments, 0
        worst = np.argsort(own_iou, kind="stable")[: empty.size]
        centres = centres.copy()
        centres[empty[: worst.size]] = whs[worst]
        return centres, assign(centres)[0], worst.size

    centres = np.array(init, dtype=np.float64)
    centres, assignments, num_reseeded = reseed(centres, *assign(centres))
    for it in range(1, max_iter + 1):
        for j in range(len(centres)):
            if (assignments == j).any():
                centres[j] = np.median(whs[assignments == j], axis=0)
        centres, new_assignments, reseeded = reseed(centres, *assign(centres))
        num_reseeded += reseeded
        if np.array_equal(new_assignments, assignments):
            return centres, new_assignments, it, True, num_reseeded
        assignments = new_assignments
    return centres, assignments, max_iter, False, num_reseeded


def test_iou_kmeans_equals_the_plain_algorithm():
    # The bounds and incremental medians are only a speed-up: same centres, assignments, iterations
    # and re-seeds as the textbook loop, including rounded shapes (ties) and far-away initial centres.
    rng = np.random.default_rng(1)
    for trial in range(12):
        whs = np.exp(rng.normal(3.0, 0.6, (int(rng.integers(1, 1500)), 2)))
        if trial % 3 == 0:
            whs = np.round(whs)
        init = np.exp(rng.normal(3.0, 1.0, (int(rng.integers(1, 6)), 2)))
        if trial % 4 == 0:
            init[-1] = [1e4, 1e4]
        centres, assignments, num_iters, converged, num_reseeded = plain_iou_kmeans(whs, init)
        result = iou_kmeans(whs, init)
        assert np.array_equal(result.centres, centres) and np.array_equal(result.assignments, assignments)
        assert result.num_iters == num_iters and result.converged == converged
        assert result.num_reseeded == num_reseeded
    # Tiny sets with more clusters than the data supports: clusters empty out mid-run (seeds 23, 27, 108,
    # 123, 147, 196, 212 among these) and are re-seeded inside the loop.
    for seed in range(250):
        rng = np.random.default_rng(seed)
        whs = np.exp(rng.normal(3.0, 0.8, (int(rng.integers(3, 40)), 2)))
        init = np.exp(rng.normal(3.0, 0.8, (int(rng.integers(2, 5)), 2)))
        centres, assignments, num_iters, converged, num_reseeded = plain_iou_kmeans(whs, init)
        result = iou_kmeans(whs, init)
        assert np.array_equal(result.centres, centres) and np.array_equal(result.assignments, assignments)
        assert result.num_iters == num_iters and result.num_reseeded == num_reseeded


def test_iou_kmeans_max_iter_cap():
    whs, _ = planted_boxes()
    result = iou_kmeans(whs, np.array([[200.0, 5.0], [5.0, 200.0], [300.0, 300.0]]), max_iter=1)
    assert result.num_iters == 1 and not result.converged


def test_assign_levels_by_centred_iou_with_the_one_scale_anchors():
    init = [w.double().numpy() for w in predefined_anchor_whs(1)]
    # 45 x 45: IoU 45^2/64^2... vs P3's 32 x 32: 1024 / 2025 = 0.5057 > P4's 2025 / 4096 = 0.4944 -> P3.
    # 46 x 46: 1024 / 2116 = 0.4839 < 2116 / 4096 = 0.5166 -> P4. (90, 45) is P4's 2:1 shape itself.
    whs = np.array([[45.0, 45.0], [46.0, 46.0], [90.51, 45.25], [2.0, 2.0], [5000.0, 3000.0]])
    assert assign_levels(whs, init).tolist() == [0, 1, 1, 0, 4]


def test_cluster_anchor_whs_per_level_and_seeded_random_init():
    whs, _ = planted_boxes()
    init = [w.double().numpy() for w in predefined_anchor_whs(1)]
    anchors, summaries = cluster_anchor_whs(whs, init)
    # All planted boxes are small: everything lands on P3, which recovers the three shapes (sorted by
    # aspect ratio h / w: wide, square, tall); the other levels keep their initial anchors.
    assert [s["num_boxes"] for s in summaries] == [1200, 0, 0, 0, 0]
    np.testing.assert_allclose(anchors[0], PLANTED[[2, 1, 0]], rtol=0.02)
    np.testing.assert_allclose(anchors[3], init[3])
    assert summaries[0]["mean_iou"] > 0.9 > summaries[0]["mean_iou_init"]
    a1, _ = cluster_anchor_whs(whs, init, init="random", seed=3)
    a2, _ = cluster_anchor_whs(whs, init, init="random", seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2))  # random starts may end in a local optimum
    with pytest.raises(ValueError, match="init"):
        cluster_anchor_whs(whs, init, init="kmeans++")


# ---------------------------------------------------------------------------------------------
# anchor quality

ONE_PER_LEVEL = [torch.tensor([[s, s]], dtype=torch.float32) for s in (16.0, 32.0, 64.0, 128.0, 256.0)]


def test_best_anchor_iou_hand_computed_on_a_64x64_input():
    # One square anchor per location: 16, 32, 64, 128, 256 on P3..P7. 64 x 64 input: grids 8, 4, 2, 1, 1.
    gen = AnchorGenerator(ONE_PER_LEVEL)
    gt = torch.tensor(
        [
            [4.0, 4.0, 20.0, 20.0],  # the P3 anchor of cell (1, 1) itself: 1
            [0.0, 0.0, 24.0, 24.0],  # P4 anchor [-8, -8, 24, 24]: 576 / 1024 = 0.5625 (P3's: 256 / 576)
            [40.0, 8.0, 60.0, 16.0],  # P3 anchor [44, 4, 60, 20]: 16 * 8 / (160 + 256 - 128) = 4 / 9
        ]
    )
    expected = torch.tensor([1.0, 0.5625, 4.0 / 9.0])
    torch.testing.assert_close(best_anchor_iou(gt, gen, 64, 64), expected)
    torch.testing.assert_close(box_iou(gt, gen.anchors_for_input(64, 64)).max(1).values, expected)


def test_anchor_quality_hand_computed_two_input_sizes():
    gt = torch.tensor(
        [
            [4.0, 4.0, 20.0, 20.0],
            [0.0, 0.0, 24.0, 24.0],
            [40.0, 8.0, 60.0, 16.0],
            # On a 32 x 32 input (grids 4, 2, 1, 1, 1): P3 anchor [-4, -4, 12, 12]: 144 / 368 = 9 / 23.
            [0.0, 0.0, 16.0, 16.0],
        ]
    )
    q = anchor_quality(
        gt, torch.tensor([1, 1, 1, 0]), [(32, 32), (64, 64)], [1, 3], ONE_PER_LEVEL, (8, 16, 32, 64, 128)
    )
    assert q["num_anchors_per_location"] == 1 and q["num_gt"] == 4
    # Anchors per image: 64 x 64 -> 64 + 16 + 4 + 1 + 1 = 86, 32 x 32 -> 16 + 4 + 1 + 1 + 1 = 23.
    assert q["total_anchors"] == round((3 * 86 + 23) / 4)
    assert q["average_iou"] == pytest.approx((1 + 0.5625 + 4 / 9 + 9 / 23) / 4, abs=1e-6)
    assert q["recall_pct"] == pytest.approx(50.0)
    empty = anchor_quality(
        torch.zeros(0, 4), torch.zeros(0), [(64, 64)], [2], ONE_PER_LEVEL, (8, 16, 32, 64, 128)
    )
    assert empty["average_iou"] is None and empty["recall_pct"] is None and empty["total_anchors"] == 86


@pytest.mark.parametrize("input_hw", [(100, 130), (300, 260), (61, 35)])
def test_best_anchor_iou_equals_exhaustive_box_iou(input_hw):
    # The candidate shortcut against box_iou over every anchor of the grid: random boxes anywhere,
    # including ones hanging over the border and ones larger than the input.
    h, w = input_hw
    torch.manual_seed(0)
    xy = torch.rand(300, 2, 2) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    gt = torch.cat([xy.min(1).values, xy.max(1).values + 1.0], dim=1)
    gen_whs = [predefined_anchor_whs(3), [w * torch.rand(4, 2) + 2.0 for _ in range(5)]]
    for whs in gen_whs + [original_anchor_whs("pdf9", min(h, w))]:
        for layout in ("stride", "original"):  # the original's centres are (j + 0.5) * (input / f)
            gen = AnchorGenerator(whs, layout=layout)
            exhaustive = box_iou(gt, gen.anchors_for_input(h, w)).max(1).values
            fast = best_anchor_iou(gt, gen, h, w, chunk_size=128)
            torch.testing.assert_close(fast, exhaustive, rtol=0, atol=1e-6)
