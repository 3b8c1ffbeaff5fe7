import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import kmeans_for_anchors
from layers.anchor_sets import SHIPPED_KMEANS_FILES, original_anchor_whs
from layers.anchors import AnchorGenerator, load_anchor_file, predefined_anchor_whs
from layers.kmeans import (
    anchor_quality,
    assign_levels,
    best_anchor_iou,
    cluster_anchor_whs,
    iou_kmeans,
    kmeans_aspect_ratios,
)
from utils.box_ops import box_iou_wh_np

ROOT = kmeans_for_anchors.__file__.rsplit("/", 1)[0]
ROW_FIELDS = {
    "type",
    "num_anchors_per_location",
    "average_iou",
    "recall_pct",
    "average_iou_shape",
    "recall_pct_shape",
}

# Three planted shapes with 3% multiplicative noise, 400 boxes each.
PLANTED = np.array([[10.0, 20.0], [30.0, 30.0], [60.0, 20.0]])


def planted_boxes(seed=0):
    rng = np.random.default_rng(seed)
    whs = np.concatenate([c * np.exp(rng.normal(0.0, 0.03, (400, 2))) for c in PLANTED])
    labels = np.repeat(np.arange(3), 400)
    order = rng.permutation(whs.shape[0])  # interleave, so nothing depends on the input order
    return whs[order], labels[order]


# ---------------------------------------------------------------------------------------------
# clustering


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


# ---------------------------------------------------------------------------------------------
# loading, the anchor file, end to end


def write_annotations(path, images, annotations):
    coco = {
        "images": [{"id": i, "file_name": f"images/{i}.jpg", "width": w, "height": h} for i, w, h in images],
        "annotations": [
            {
                "id": n,
                "image_id": i,
                "category_id": 1,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": c,
                "difficult": d,
            }
            for n, (i, b, c, d) in enumerate(annotations, start=1)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))


def test_load_boxes_rescales_like_training_and_counts_ignored(tmp_path):
    ann = tmp_path / "toy" / "annotations" / "train.json"
    write_annotations(
        ann,
        [(1, 200, 100), (7, 50, 50), (3, 200, 100)],  # (id, width, height)
        [
            (1, [10.0, 20.0, 40.0, 30.0], 0, 0),
            (7, [0.0, 0.0, 50.0, 50.0], 0, 0),
            (7, [5.0, 5.0, 10.0, 10.0], 0, 1),  # difficult
            (7, [20.0, 20.0, 10.0, 10.0], 1, 0),  # crowd
            (7, [1.0, 1.0, 0.0, 5.0], 0, 0),  # zero width
        ],
    )
    # keep_aspect 150 / 400: 100 x 200 -> x1.5 -> 150 x 300, padded to 160 x 320; 50 x 50 -> x3 -> 150 x 150.
    boxes = kmeans_for_anchors.load_boxes([str(ann)], "keep_aspect", 600, 150, 400)
    np.testing.assert_allclose(boxes["gt_boxes"][:2], [[15, 30, 75, 75], [0, 0, 150, 150]])
    assert boxes["input_sizes"].tolist() == [[160, 160], [160, 320]]
    assert boxes["num_images_per_size"].tolist() == [1, 2]
    assert boxes["gt_input_size_idxs"].tolist() == [1, 0, 0, 0, 0]
    assert kmeans_for_anchors.kept_boxes(boxes).tolist() == [True, True, False, False, False]
    counts = kmeans_for_anchors.box_counts(boxes)
    assert counts == {
        "num_images": 3,
        "num_input_sizes": 2,
        "num_boxes": 2,
        "num_ignored_difficult": 1,
        "num_ignored_crowd": 1,
        "num_ignored_degenerate": 1,
    }
    # square 64: sx = 64 / 200, sy = 64 / 100, one input size, no padding.
    square = kmeans_for_anchors.load_boxes([str(ann)], "square", 64, 600, 1000)
    np.testing.assert_allclose(square["gt_boxes"][0], [3.2, 12.8, 16.0, 32.0])
    assert square["input_sizes"].tolist() == [[64, 64]]


def test_main_rejects_bad_options(tmp_path):
    args = kmeans_for_anchors.get_args_parser().parse_args(["--data_root", str(tmp_path), "--k", "0"])
    with pytest.raises(ValueError, match="--k"):
        kmeans_for_anchors.main(args)
    args = kmeans_for_anchors.get_args_parser().parse_args(["--data_root", str(tmp_path)])
    with pytest.raises(ValueError, match="train.json"):
        kmeans_for_anchors.main(args)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, "prep/shapes.py", "--data_root", str(root), "--num_train", "40", "--num_val", "12"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return root


def test_end_to_end_on_shapes_and_anchor_file_round_trip(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "anchors" / "shapes.json"
    argv = [
        "--data_root",
        str(tiny_shapes),
        "--dataset",
        "shapes",
        "--train_sets",
        "train",
        "--val_sets",
        "val",
    ]
    argv += ["--input_dim", "128", "--out", str(out), "--json"]
    report = kmeans_for_anchors.main(kmeans_for_anchors.get_args_parser().parse_args(argv))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))

    # The file train.py loads: 5 levels x 3 anchors, the resize options recorded.
    whs, meta = load_anchor_file(str(out), expected_strides=(8, 16, 32, 64, 128))
    assert [tuple(w.shape) for w in whs] == [(3, 2)] * 5
    assert meta["resize_mode"] == "square" and meta["input_dim"] == 128 and meta["train_sets"] == ["train"]
    assert meta["dataset"] == "shapes"
    gen = AnchorGenerator(whs)
    assert gen.anchors_for_input(128, 128).shape[0] == 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)

    for split in ("train", "val"):
        rows = {(r["type"], r["num_scales"]): r for r in report["splits"][split]["rows"]}
        split_rows = report["splits"][split]["rows"]
        assert [r["num_anchors_per_location"] for r in split_rows] == [9, 6, 3, 9, 6, 3, 3]
        assert [r["type"] for r in split_rows] == ["original"] * 3 + ["predefined"] * 3 + ["clustered"]
        assert [r["name"] for r in split_rows[:3]] == ["pdf9", "pdf6", "default"]
        assert [r["layout"] for r in split_rows] == ["original"] * 3 + ["stride"] * 4
        for r in split_rows:
            assert ROW_FIELDS <= set(r)
            # The shape measure ignores positions: its best IoU is never below the grid's.
            assert r["average_iou_shape"] >= r["average_iou"]
        assert rows[("clustered", 1)]["total_anchors"] == 3 * 341
        assert rows[("clustered", 1)]["recall_pct"] >= rows[("predefined", 1)]["recall_pct"]
        assert rows[("clustered", 1)]["num_gt"] == report["splits"][split]["num_boxes"] > 0
    # The clustered row measures the anchors as stored in the file.
    train = kmeans_for_anchors.load_boxes(
        [str(tiny_shapes / "shapes/annotations/train.json")], "square", 128, 600, 1000
    )
    keep = kmeans_for_anchors.kept_boxes(train)
    q = anchor_quality(
        torch.as_tensor(train["gt_boxes"][keep], dtype=torch.float32),
        torch.as_tensor(train["gt_input_size_idxs"][keep]),
        [(128, 128)],
        [train["num_images"]],
        whs,
        (8, 16, 32, 64, 128),
    )
    assert q["recall_pct"] == report["splits"]["train"]["rows"][6]["recall_pct"]
    assert q["average_iou"] == report["splits"]["train"]["rows"][6]["average_iou"]
    assert (
        sum(level["num_boxes"] for level in report["clustering"]["levels"])
        == report["clustering"]["num_boxes"]
    )


def test_method_original_end_to_end(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "shapes_original.json"
    argv = ["--data_root", str(tiny_shapes), "--input_dim", "128", "--method", "original"]
    report = kmeans_for_anchors.main(
        kmeans_for_anchors.get_args_parser().parse_args(argv + ["--out", str(out)])
    )
    assert report["method"] == "original" and report["layout"] == "original" and report["max_iter"] == 10
    whs, meta = load_anchor_file(str(out))
    assert meta["layout"] == "original" and meta["method"] == "original"
    assert [tuple(w.shape) for w in whs] == [(3, 2)] * 5
    levels = report["clustering"]["levels"]
    assert sum(s["num_boxes"] for s in levels) == report["clustering"]["num_boxes"]
    assert all(s["num_iters"] <= 10 for s in levels)
    clustered = report["splits"]["train"]["rows"][-1]
    assert clustered["type"] == "clustered" and clustered["layout"] == "original"
    # Its clustered set beats the set it was seeded with, on the measure it optimises.
    default = report["splits"]["train"]["rows"][2]
    assert default["name"] == "default" and clustered["average_iou_shape"] > default["average_iou_shape"]
    # The file is what train.py --anchor_type kmeans loads, with the original's centres.
    from models import build_anchors
    from utils.options import get_common_parser

    args = get_common_parser().parse_args(
        ["--anchor_type", "kmeans", "--anchor_file", str(out), "--input_dim", "128"]
    )
    built, layout = build_anchors(args)
    assert layout == "original"
    torch.testing.assert_close(torch.stack(built), torch.stack(whs))
    assert "Shape recall %" in capsys.readouterr().out
    for bad in (["--k", "4"], ["--init", "random"]):
        with pytest.raises(ValueError, match="--method original"):
            kmeans_for_anchors.main(kmeans_for_anchors.get_args_parser().parse_args(argv + bad))


def test_every_input_file_is_checked_before_clustering(tiny_shapes, tmp_path, monkeypatch):
    def no_clustering(*args, **kwargs):
        raise AssertionError("clustered before the inputs were checked")

    monkeypatch.setattr(kmeans_for_anchors, "cluster_anchor_whs", no_clustering)
    monkeypatch.setattr(kmeans_for_anchors, "cluster_anchor_whs_original", no_clustering)
    base = ["--data_root", str(tiny_shapes), "--input_dim", "128", "--out", str(tmp_path / "a.json")]
    # A missing val split and a missing second train split are both named, in one error.
    argv = base + ["--train_sets", "train,extra", "--val_sets", "val,test"]
    with pytest.raises(ValueError) as e:
        kmeans_for_anchors.main(kmeans_for_anchors.get_args_parser().parse_args(argv))
    assert "extra.json: annotation file not found" in str(e.value)
    assert "test.json: annotation file not found" in str(e.value)
    assert "val.json" not in str(e.value)
    # A broken val file stops the run before any clustering too.
    broken = tmp_path / "data"
    (broken / "shapes" / "annotations").mkdir(parents=True)
    (broken / "shapes" / "annotations" / "train.json").write_text(
        (tiny_shapes / "shapes" / "annotations" / "train.json").read_text()
    )
    (broken / "shapes" / "annotations" / "val.json").write_text("{not json")
    argv = ["--data_root", str(broken), "--input_dim", "128", "--out", str(tmp_path / "b.json")]
    with pytest.raises(ValueError, match="val.json: not a valid JSON"):
        kmeans_for_anchors.main(kmeans_for_anchors.get_args_parser().parse_args(argv))
    # The original's shipped sets are never overwritten.
    argv = base[:-1] + [SHIPPED_KMEANS_FILES["voc"]]
    with pytest.raises(ValueError, match="shipped"):
        kmeans_for_anchors.main(kmeans_for_anchors.get_args_parser().parse_args(argv))


def test_script_prints_one_line_errors(tmp_path):
    done = subprocess.run(
        [sys.executable, "kmeans_for_anchors.py", "--data_root", str(tmp_path), "--val_sets", "val"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train.json: annotation file not found" in done.stderr and "val.json" in done.stderr
