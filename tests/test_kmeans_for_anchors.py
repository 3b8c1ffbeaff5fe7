"""kmeans_for_anchors.py: loading and rescaling the boxes (data/box_sets.py), the options, the report and
the anchor file end to end (layers/anchor_report.py), and its errors. The clustering and the grid measure
themselves: tests/test_kmeans.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import kmeans_for_anchors
from data import box_sets
from layers import anchor_report
from layers.anchor_sets import SHIPPED_KMEANS_FILES
from layers.anchors import AnchorGenerator, load_anchor_file
from layers.kmeans import anchor_quality

ROOT = kmeans_for_anchors.__file__.rsplit("/", 1)[0]
ROW_FIELDS = {
    "type",
    "num_anchors_per_location",
    "average_iou",
    "recall_pct",
    "average_iou_shape",
    "recall_pct_shape",
}


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
    boxes = box_sets.load_boxes([str(ann)], "keep_aspect", 600, 150, 400)
    np.testing.assert_allclose(boxes["gt_boxes"][:2], [[15, 30, 75, 75], [0, 0, 150, 150]])
    assert boxes["input_sizes"].tolist() == [[160, 160], [160, 320]]
    assert boxes["num_images_per_size"].tolist() == [1, 2]
    assert boxes["gt_input_size_idxs"].tolist() == [1, 0, 0, 0, 0]
    assert box_sets.kept_boxes(boxes).tolist() == [True, True, False, False, False]
    counts = box_sets.box_counts(boxes)
    assert counts == {
        "num_images": 3,
        "num_input_sizes": 2,
        "num_boxes": 2,
        "num_ignored_difficult": 1,
        "num_ignored_crowd": 1,
        "num_ignored_degenerate": 1,
    }
    # square 64: sx = 64 / 200, sy = 64 / 100, one input size, no padding.
    square = box_sets.load_boxes([str(ann)], "square", 64, 600, 1000)
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
    train = box_sets.load_boxes(
        [str(tiny_shapes / "shapes/annotations/train.json")], "square", 128, 600, 1000
    )
    keep = box_sets.kept_boxes(train)
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

    monkeypatch.setattr(anchor_report, "cluster_anchor_whs", no_clustering)
    monkeypatch.setattr(anchor_report, "cluster_anchor_whs_original", no_clustering)
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
