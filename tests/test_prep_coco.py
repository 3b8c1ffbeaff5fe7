import contextlib
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.annotations import load_annotations
from prep import coco as coco_prep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ann(ann_id, image_id, category_id, bbox, area=None, iscrowd=0):
    area = bbox[2] * bbox[3] if area is None else area
    polygon = [[bbox[0], bbox[1], bbox[0] + 1, bbox[1], bbox[0], bbox[1] + 1]]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": area,
            "iscrowd": iscrowd, "segmentation": polygon}  # fmt: skip


@pytest.fixture
def coco_source(tmp_path):
    """instances_val2017.json with crowd, zero-area, bad-id, outside and missing-image records."""
    image_dir = tmp_path / "val2017"
    image_dir.mkdir()
    for name, (w, h) in {"a.jpg": (40, 30), "b.jpg": (20, 10), "c.jpg": (16, 16)}.items():
        assert cv2.imwrite(str(image_dir / name), np.zeros((h, w, 3), np.uint8))
    source = {
        "info": {"description": "tiny COCO", "year": 2017},
        "licenses": [{"id": 1, "name": "x"}],
        "images": [
            {"id": 397133, "file_name": "a.jpg", "width": 40, "height": 30, "license": 1, "coco_url": "u"},
            {"id": 37777, "file_name": "b.jpg", "width": 20, "height": 10},
            {"id": 5, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 6, "file_name": "c.jpg", "width": 16, "height": 16},
        ],
        # Not in id order: the list order is the label order and must survive.
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
        ],
        "annotations": [
            _ann(100, 397133, 1, [1.5, 2.0, 10.0, 5.0], area=40.5),  # area is the segment's, kept
            _ann(101, 397133, 18, [0, 0, 40, 30], area=900, iscrowd=1),
            _ann(102, 37777, 1, [5, 5, 0, 3]),  # zero width
            _ann(103, 37777, 1, [5, 5, 3, -1]),  # negative height
            _ann(104, 999, 1, [1, 1, 2, 2]),  # unknown image
            _ann(105, 37777, 7, [1, 1, 2, 2]),  # unknown category
            _ann(106, 37777, 18, [15.0, 2.0, 5.5, 4.0], area=20),  # x + w = 20.5 > 20: clipped
            _ann(107, 5, 1, [1, 1, 2, 2]),  # image file missing
            _ann(108, 37777, 18, [25, 1, 3, 3]),  # entirely right of the image
        ],
    }
    ann_path = tmp_path / "instances_val2017.json"
    ann_path.write_text(json.dumps(source))
    return str(ann_path), str(image_dir)


def _run(*argv):
    return coco_prep.main(coco_prep.get_args_parser().parse_args(list(argv)))


def test_counts_ids_and_boxes(tmp_path, coco_source):
    ann_path, image_dir = coco_source
    data_root = str(tmp_path / "datasets")
    summaries = _run("--ann", ann_path, "--image_dir", image_dir, "--data_root", data_root)
    assert list(summaries) == ["val2017"]  # split from the file name
    s = summaries["val2017"]
    assert s["num_images"] == 3 and s["num_images_without_boxes"] == 1
    assert s["num_boxes"] == 3 and s["num_crowd"] == 1 and s["num_difficult"] == 0
    assert s["boxes_per_class"] == {"dog": 2, "person": 1}
    assert s["dropped_boxes"] == {
        "zero area (w <= 0 or h <= 0)": 2,
        "unknown image_id": 1,
        "unknown category_id": 1,
        "on a skipped image": 1,
        "zero area after clipping": 1,
    }
    assert s["examples"]["unknown image_id"] == ["annotation id=104 (image_id 999)"]
    assert s["examples"]["unknown category_id"] == ["annotation id=105 (category_id 7)"]
    assert s["clipped_boxes"] == {"outside the image": 1}
    assert s["skipped_images"] == {"missing image file": 1}

    out = load_annotations(os.path.join(data_root, "coco", "annotations", "val2017.json"))
    assert out["categories"] == [
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 1, "name": "person", "supercategory": "person"},
    ]
    assert out["images"] == [
        {"id": 397133, "file_name": "val2017/a.jpg", "width": 40, "height": 30},
        {"id": 37777, "file_name": "val2017/b.jpg", "width": 20, "height": 10},
        {"id": 6, "file_name": "val2017/c.jpg", "width": 16, "height": 16},
    ]
    # Original ids, crowd flag and (segment) area kept; segmentation dropped; clipped box [15, 2, 5, 4].
    keys = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
    assert out["annotations"] == [
        dict(zip(keys, (100, 397133, 1, [1.5, 2.0, 10.0, 5.0], 40.5, 0))),
        dict(zip(keys, (101, 397133, 18, [0, 0, 40, 30], 900, 1))),
        dict(zip(keys, (106, 37777, 18, [15.0, 2.0, 5.0, 4.0], 20, 0))),
    ]
    assert out["info"]["description"] == "tiny COCO"

    # The dataset folder stands alone: images reachable as <data_root>/coco/<file_name>.
    assert os.path.islink(os.path.join(data_root, "coco", "val2017"))
    for image in out["images"]:
        path = os.path.join(data_root, "coco", image["file_name"])
        assert cv2.imread(path).shape[:2] == (image["height"], image["width"])


def test_official_tools_score_results_without_mapping(tmp_path, coco_source):
    ann_path, image_dir = coco_source
    data_root = str(tmp_path / "datasets")
    _run("--ann", ann_path, "--image_dir", image_dir, "--data_root", data_root, "--split", "val2017")
    out_path = os.path.join(data_root, "coco", "annotations", "val2017.json")
    out = load_annotations(out_path)
    # Perfect detections written with the file's ids: AP 1 on the boxes that count (crowd ignored).
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in out["annotations"]
        if not a["iscrowd"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(out_path)
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_copy_and_bad_input(tmp_path, coco_source):
    ann_path, image_dir = coco_source
    data_root = str(tmp_path / "datasets")
    _run(
        "--ann", ann_path, "--image_dir", image_dir, "--data_root", data_root, "--split", "minival", "--copy"
    )
    copied = os.path.join(data_root, "coco", "minival")
    assert os.path.isdir(copied) and not os.path.islink(copied)
    assert sorted(os.listdir(copied)) == ["a.jpg", "b.jpg", "c.jpg"]

    with pytest.raises(ValueError, match="nope.json: COCO annotation file not found"):
        _run("--ann", str(tmp_path / "nope.json"), "--image_dir", image_dir, "--data_root", data_root)
    broken = tmp_path / "instances_broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="instances_broken.json: not a valid JSON"):
        _run("--ann", str(broken), "--image_dir", image_dir, "--data_root", data_root)
    duplicated = json.loads(open(ann_path).read())
    duplicated["annotations"][1]["id"] = 100
    dup_path = tmp_path / "instances_dup.json"
    dup_path.write_text(json.dumps(duplicated))
    with pytest.raises(
        ValueError, match=r"instances_dup.json: annotations\[1\]: duplicate annotation id 100"
    ):
        _run("--ann", str(dup_path), "--image_dir", image_dir, "--data_root", data_root)


def test_script_help_runs_from_the_repo_root():
    out = subprocess.run([sys.executable, "prep/coco.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--image_dir" in out.stdout


def test_image_headers_tiny_boxes_and_bad_records(tmp_path, coco_source, caplog):
    ann_path, image_dir = coco_source
    source = json.loads(open(ann_path).read())
    source["images"][3].update(width=17)  # c.jpg is 16 x 16
    with open(os.path.join(image_dir, "b.jpg"), "r+b") as f:
        f.truncate(100)  # a cut download: its header still reads
    source["annotations"] += [
        _ann(200, 397133, 1, [3.0, 4.0, 0.5, 8.0]),  # half a pixel wide
        _ann([1], 397133, 1, [3, 4, 5, 5]),  # an id that is not an integer
        _ann(201, [397133], 1, [3, 4, 5, 5]),  # an image_id that is not an integer
        _ann(202, 397133, [1], [3, 4, 5, 5]),  # a category_id that is not an integer
    ]
    source["categories"].append({"id": 3, "name": "Dog"})
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(source))
    data_root = str(tmp_path / "datasets")
    s = _run("--ann", str(path), "--image_dir", image_dir, "--data_root", data_root)["val2017"]
    assert s["num_images"] == 1  # only a.jpg is left
    assert s["skipped_images"] == {
        "missing image file": 1,
        "unreadable image file": 1,
        "recorded size differs from the image": 1,
    }
    assert "b.jpg (truncated JPEG" in s["examples"]["unreadable image file"][0]
    assert s["examples"]["recorded size differs from the image"] == [
        f"image id=6: 17 x 16 recorded, {os.path.join(image_dir, 'c.jpg')} is 16 x 16"
    ]
    assert s["dropped_boxes"]["annotation id is not an integer"] == 1
    assert s["dropped_boxes"]["unknown image_id"] == 2  # 999, and [397133]
    assert s["dropped_boxes"]["unknown category_id"] == 1  # [1] (the box of class 7 is on b.jpg, skipped)
    assert s["notes"]["box at most 1 px wide or high (kept; --tiny_boxes drop)"] == 1
    assert s["examples"]["box at most 1 px wide or high (kept; --tiny_boxes drop)"] == [
        "annotation id=200: 0.5 x 8"
    ]
    assert s["notes"]["class names that differ only in case (separate classes)"] == 1
    assert "class names ['Dog', 'dog'] differ only in case" in caplog.text
    dropped = _run(
        "--ann", str(path), "--image_dir", image_dir, "--data_root", data_root, "--tiny_boxes", "drop"
    )
    assert dropped["val2017"]["dropped_boxes"]["at most 1 px wide or high (--tiny_boxes drop)"] == 1
    assert dropped["val2017"]["num_boxes"] == s["num_boxes"] - 1


def test_one_file_under_two_image_ids_and_no_categories_are_errors(tmp_path, coco_source):
    ann_path, image_dir = coco_source
    source = json.loads(open(ann_path).read())
    twice = {
        **source,
        "images": source["images"] + [{"id": 8, "file_name": "a.jpg", "width": 40, "height": 30}],
    }
    path = tmp_path / "instances_twice.json"
    path.write_text(json.dumps(twice))
    with pytest.raises(
        ValueError, match=r"instances_twice.json: images\[4\] \(id 8\) and image id 397133 are both 'a.jpg'"
    ):
        _run("--ann", str(path), "--image_dir", image_dir, "--data_root", str(tmp_path / "d"))
    path.write_text(json.dumps({**source, "categories": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances_twice.json: the category list is empty"):
        _run("--ann", str(path), "--image_dir", image_dir, "--data_root", str(tmp_path / "d"))
