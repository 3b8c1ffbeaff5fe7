"""bench/misses_by_size.py: greedy VOC-style matching and size bins, on hand-made boxes."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "misses_by_size", os.path.join(ROOT, "bench", "misses_by_size.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COCO = {
    "images": [{"id": 1, "file_name": "a.png", "width": 256, "height": 256}],
    "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 22], "area": 220, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [50, 50, 100, 100], "area": 1e4, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [0, 200, 20, 20], "area": 400, "iscrowd": 1},
    ],
}


def test_bins_matching_and_false_positives():
    m = _load()
    results = [
        # Finds box 2 (IoU 1); a second, lower-scored copy finds nothing: a false positive.
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 30], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 30], "score": 0.8},
        # Right place, wrong class for box 1: box 1 stays missed, and this is a false positive.
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 22], "score": 0.95},
        # Box 3 at IoU 0.81 (90x90 inside 100x100) but under the score threshold: not counted.
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 90, 90], "score": 0.4},
    ]
    report = m.misses_by_size(COCO, results, score=0.5, iou=0.5, edges=[22, 48, 96])
    # Box 1's longer side is exactly 22: the (0, 22] bin. Box 4 is crowd: left out.
    assert [(b["gt"], b["missed"]) for b in report["bins"]] == [(1, 1), (1, 0), (0, 0), (1, 1)]
    assert report["bins"][1]["recall"] == 1.0 and report["bins"][2]["recall"] is None
    assert report["false_positives"] == 2 and report["missed"] == 2 and report["gt"] == 3
    # At score 0.3 the 90x90 detection finds box 3.
    report = m.misses_by_size(COCO, results, score=0.3, iou=0.5, edges=[22, 48, 96])
    assert report["bins"][3]["missed"] == 0
    # ... but not at IoU 0.85.
    assert m.misses_by_size(COCO, results, score=0.3, iou=0.85, edges=[22, 48, 96])["bins"][3]["missed"] == 1


def test_main_prints_json_last(tmp_path, capsys):
    m = _load()
    ann, res = tmp_path / "val.json", tmp_path / "results.json"
    ann.write_text(json.dumps(COCO))
    res.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 22], "score": 0.7}]))
    m.main(m.get_args_parser().parse_args(["--annotations", str(ann), "--results", str(res)]))
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bins"][0] == {"range": [0.0, 22.0], "gt": 1, "missed": 0, "recall": 1.0}
    res.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="results.json: expected a COCO results list"):
        m.main(m.get_args_parser().parse_args(["--annotations", str(ann), "--results", str(res)]))
