import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from metrics.coco import (
    COCO_STAT_NAMES,
    detections_to_coco_results,
    evaluate_coco,
    write_coco_results,
)


def make_gt():
    rng = np.random.default_rng(1)
    images = [{"id": i, "file_name": f"images/{i}.jpg", "width": 640, "height": 480} for i in (3, 7, 11, 12)]
    anns = []
    for img in images:
        for _ in range(6):
            w, h = rng.uniform(8, 300, size=2)
            x, y = rng.uniform(0, 300), rng.uniform(0, 150)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": int(rng.choice([1, 5, 9])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.1),
                    "difficult": int(rng.random() < 0.2),  # extra field of the common format
                }
            )
    categories = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]
    return {"images": images, "annotations": anns, "categories": categories}


def make_dets(gt):
    rng = np.random.default_rng(2)
    dets = []
    for a in gt["annotations"]:
        for _ in range(2):
            box = np.array(a["bbox"]) + rng.normal(0, 6, size=4)
            box[2:] = np.maximum(box[2:], 2)
            dets.append(
                {
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "bbox": box.tolist(),
                    "score": rng.random(),
                }
            )
    for img in gt["images"]:
        dets.append(
            {"image_id": img["id"], "category_id": 9, "bbox": [10.0, 10.0, 50.0, 40.0], "score": 0.99}
        )
    return dets


def pycocotools_direct(gt_path, det_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_dt = coco_gt.loadRes(det_path)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.array(ev.stats)


def test_identical_to_pycocotools_on_files(tmp_path):
    gt = make_gt()
    dets = make_dets(gt)
    gt_path, det_path = str(tmp_path / "gt.json"), str(tmp_path / "dets.json")
    with open(gt_path, "w") as f:
        json.dump(gt, f)
    write_coco_results(dets, det_path)
    expected = pycocotools_direct(gt_path, det_path)

    for gt_in, det_in in [(gt_path, det_path), (gt, dets)]:
        res = evaluate_coco(gt_in, det_in)
        np.testing.assert_array_equal(np.array([res[n] for n in COCO_STAT_NAMES]), expected)
        assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in res["summary"]
        assert len(res["summary"].strip().splitlines()) == 12
        assert set(res["ap_per_class"]) == {"cat", "dog", "bird"}
        assert res["num_detections"] == len(dets)
    assert 0 < res["AP"] < 1
    # Inputs are not modified (pycocotools adds "ignore" / "area" / "id" to the dicts it is given).
    assert "ignore" not in gt["annotations"][0] and "id" not in dets[0]


def test_per_class_ap_averages_to_ap():
    gt = make_gt()
    res = evaluate_coco(gt, make_dets(gt))
    assert np.nanmean(list(res["ap_per_class"].values())) == pytest.approx(res["AP"])


def test_empty_detections_give_zero_where_gt_exists(caplog):
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 500, "height": 500}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 200, 200],
                "area": 40000.0,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    with caplog.at_level("WARNING"):
        res = evaluate_coco(gt, [])
    assert "no detections" in caplog.text
    # No medium-sized gt: pycocotools reports -1 there.
    expected = {"AP": 0, "AP50": 0, "AP75": 0, "APs": 0, "APm": -1, "APl": 0}
    expected.update({"AR1": 0, "AR10": 0, "AR100": 0, "ARs": 0, "ARm": -1, "ARl": 0})
    assert {n: res[n] for n in COCO_STAT_NAMES} == expected
    assert res["ap_per_class"] == {"a": 0.0}


def test_unknown_ids_raise():
    gt = make_gt()
    with pytest.raises(ValueError, match=r"unknown category ids \[4\]"):
        evaluate_coco(gt, [{"image_id": 3, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])


def test_class_without_gt_is_nan_per_class():
    gt = make_gt()
    gt["categories"].append({"id": 42, "name": "unicorn"})
    res = evaluate_coco(gt, make_dets(gt))
    assert math.isnan(res["ap_per_class"]["unicorn"])


def test_detections_to_coco_results():
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.5, 60.123]]),
            "scores": torch.tensor([0.123456789]),
            "labels": torch.tensor([2]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {
            "boxes": np.array([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 8.0]]),
            "scores": np.array([0.9, 0.5]),
            "labels": np.array([0, 1]),
        },
    ]
    res = detections_to_coco_results(outputs, [2007000005, 7, 8], [15, 3, 90])
    assert res == [
        {"image_id": 2007000005, "category_id": 90, "bbox": [10.0, 20.0, 20.5, 40.12], "score": 0.12346},
        {"image_id": 8, "category_id": 15, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.9},
        {"image_id": 8, "category_id": 3, "bbox": [5.0, 5.0, 1.0, 3.0], "score": 0.5},
    ]
    assert all(type(v) in (int, float) for r in res for v in (r["image_id"], r["category_id"], r["score"]))
    with pytest.raises(ValueError, match="image 7 has labels outside 0..2"):
        detections_to_coco_results(
            [{"boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([3])}], [7], [15, 3, 90]
        )
    with pytest.raises(ValueError, match="2 outputs but 1 image ids"):
        detections_to_coco_results(outputs[:2], [1], [15, 3, 90])


def test_write_coco_results_round_trip(tmp_path):
    dets = [{"image_id": 1, "category_id": 2, "bbox": [1.5, 2.0, 3.0, 4.0], "score": 0.5}]
    path = tmp_path / "sub" / "results.json"
    write_coco_results(dets, str(path))
    assert json.loads(path.read_text()) == dets
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def coco_arrays(res):
    return np.array([res[n] for n in COCO_STAT_NAMES]), np.array(res["precision"]), np.array(res["recall"])


def assert_same_as_pycocotools(gt, dets):
    """faster-coco-eval against the reference: the 12 numbers (equal up to C++ summation order), the
    per-class APs and the stored precision / recall arrays."""
    ref = evaluate_coco(gt, dets, backend="pycocotools")
    fast = evaluate_coco(gt, dets, backend="faster")
    assert (ref["backend"], fast["backend"]) == ("pycocotools", "faster")
    for a, b in zip(coco_arrays(ref), coco_arrays(fast)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
    for key in ("ap_per_class", "ap50_per_class", "ap75_per_class", "ar100_per_class"):
        np.testing.assert_allclose(list(fast[key].values()), list(ref[key].values()), atol=1e-12)
    return ref, fast


def test_faster_backend_gives_pycocotools_numbers(tmp_path):
    gt = make_gt()
    dets = make_dets(gt)
    ref, fast = assert_same_as_pycocotools(gt, dets)
    np.testing.assert_array_equal(coco_arrays(ref)[0], coco_arrays(fast)[0])  # bit-equal on this case
    # From files too (what evaluate.py --detections reads), against pycocotools called directly.
    gt_path, det_path = str(tmp_path / "gt.json"), str(tmp_path / "dets.json")
    with open(gt_path, "w") as f:
        json.dump(gt, f)
    write_coco_results(dets, det_path)
    res = evaluate_coco(gt_path, det_path, backend="faster")
    np.testing.assert_allclose(coco_arrays(res)[0], pycocotools_direct(gt_path, det_path), atol=1e-12)
    # Empty detections: the same -1 / 0 pattern.
    assert_same_as_pycocotools(gt, [])


def test_faster_backend_on_a_larger_random_case():
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    from bench_eval import synthetic_case

    rng = np.random.default_rng(7)
    gt, dets = synthetic_case(rng, 150, 12, 6.0, 40, crowd_frac=0.05)
    ref, _ = assert_same_as_pycocotools(gt, dets)
    assert 0.05 < ref["AP"] < 0.95 and ref["APs"] > -1 and ref["APl"] > -1  # every area range has gt


def test_stored_arrays_give_the_summary_numbers():
    gt = make_gt()
    res = evaluate_coco(gt, make_dets(gt))
    precision, recall = np.array(res["precision"]), np.array(res["recall"])  # [T, R, K], [T, K]
    assert precision.shape == (10, 101, 3) and recall.shape == (10, 3)
    assert precision[precision > -1].mean() == pytest.approx(res["AP"], abs=1e-4)  # 4 decimals stored
    assert precision[0][precision[0] > -1].mean() == pytest.approx(res["AP50"], abs=1e-4)
    assert recall[recall > -1].mean() == pytest.approx(res["AR100"], abs=1e-4)
    assert res["iou_thresholds"][0] == 0.5 and len(res["recall_thresholds"]) == 101


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="coco backend must be one of"):
        evaluate_coco(make_gt(), [], backend="detectron")
