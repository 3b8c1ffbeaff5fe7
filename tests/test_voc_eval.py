import math

import numpy as np
import pytest

from metrics.voc import evaluate_voc, format_voc_table, voc_ap
from utils.box_ops import paired_box_iou_xyxy_np


def make_gt(images, annotations, categories):
    """annotations: (image_id, category_id, [x, y, w, h], difficult, iscrowd)."""
    anns = [
        {
            "id": i + 1,
            "image_id": img,
            "category_id": cat,
            "bbox": [float(v) for v in box],
            "area": float(box[2] * box[3]),
            "iscrowd": crowd,
            "difficult": diff,
        }
        for i, (img, cat, box, diff, crowd) in enumerate(annotations)
    ]
    return {
        "images": [{"id": i, "file_name": f"images/{i}.jpg", "width": 100, "height": 100} for i in images],
        "annotations": anns,
        "categories": [{"id": cid, "name": name} for cid, name in categories],
    }


def det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in box], "score": score}


def test_voc_ap_known_sequence():
    # Ranked TP, FP, TP, FP, TP with 3 positives.
    recall = np.array([1, 1, 2, 2, 3]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    # 11-point: t in 0..0.3 -> 1, t in 0.4..0.6 -> 2/3, t in 0.7..1.0 -> 3/5.
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(
        (4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11
    )
    # Area: envelope 1, 2/3, 3/5 over three recall steps of 1/3.
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_voc_ap_envelope_and_exact_tenths():
    # Recall exactly 0.3 must count for t = 0.3 (k / 10 thresholds).
    recall = np.array([0.3])
    precision = np.array([1.0])
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(4 / 11)
    # Precision rising later lifts the envelope over earlier recall.
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([0.5, 1 / 3, 0.5])
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.5)
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=False) == 0.0


def devkit_iou_plus_one(a, b):
    """VOCevaldet.m overlap on 1-based inclusive boxes (xmin, ymin, xmax, ymax)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih
    return iw * ih / ua


def test_iou_equals_devkit_plus_one_on_converted_boxes():
    voc_a = [
        (48, 240, 195, 371),
        (8, 12, 352, 498),
        (1, 1, 10, 10),
        (1, 1, 10, 10),
        (5, 5, 5, 5),
        (100, 1, 200, 50),
    ]
    voc_b = [
        (50, 230, 200, 380),
        (10, 10, 300, 400),
        (11, 1, 20, 10),
        (10, 10, 20, 20),
        (5, 5, 5, 5),
        (150, 20, 260, 99),
    ]
    expected = np.array([devkit_iou_plus_one(a, b) for a, b in zip(voc_a, voc_b)])

    def convert(b):  # common-format box convention
        return (b[0] - 1, b[1] - 1, b[2], b[3])

    got = paired_box_iou_xyxy_np(np.array([convert(b) for b in voc_a]), np.array([convert(b) for b in voc_b]))
    np.testing.assert_array_equal(got, expected)
    assert got[2] == 0.0  # adjacent pixels do not overlap
    assert got[3] == pytest.approx(1 / 220)  # one shared pixel: 1 / (100 + 121 - 1)
    assert got[4] == 1.0  # single-pixel box on itself


def test_multi_image_multi_class_hand_computed():
    gt = make_gt(
        images=[1, 2],
        annotations=[
            (1, 10, [0, 0, 10, 10], 0, 0),  # cat A
            (1, 10, [20, 20, 10, 10], 0, 0),  # cat B
            (1, 20, [0, 0, 20, 20], 1, 0),  # dog C, difficult
            (2, 10, [0, 0, 10, 10], 0, 0),  # cat D
            (2, 20, [50, 50, 10, 10], 0, 0),  # dog E
        ],
        categories=[(10, "cat"), (20, "dog"), (30, "bird")],
    )
    dets = [
        det(1, 10, [0, 0, 10, 10], 0.9),  # TP A
        det(1, 10, [0, 0, 10, 10], 0.8),  # duplicate on A -> FP
        det(2, 10, [0, 0, 10, 10], 0.7),  # TP D
        det(2, 10, [30, 30, 10, 10], 0.6),  # FP
        det(1, 10, [20, 20, 10, 10], 0.5),  # TP B
        det(1, 20, [0, 0, 20, 20], 0.95),  # on difficult C -> ignored
        det(2, 20, [0, 0, 5, 5], 0.9),  # FP
        det(2, 20, [50, 50, 10, 10], 0.85),  # TP E
    ]
    res = evaluate_voc(gt, dets)
    # cat: TP FP TP FP TP, 3 positives (see test_voc_ap_known_sequence).
    assert res["ap_07_11pt"]["cat"] == pytest.approx(8.4 / 11)
    assert res["ap_area"]["cat"] == pytest.approx(34 / 45)
    # dog: the difficult match is dropped, then FP, TP with 1 positive: precision 1/2 at recall 1.
    # (Counted as FP it would give 1/3; counting C as a positive would halve recall.)
    assert res["ap_07_11pt"]["dog"] == pytest.approx(0.5)
    assert res["ap_area"]["dog"] == pytest.approx(0.5)
    assert math.isnan(res["ap_area"]["bird"]) and math.isnan(res["ap_07_11pt"]["bird"])
    assert res["map_area"] == pytest.approx((34 / 45 + 0.5) / 2)
    assert res["map_07_11pt"] == pytest.approx((8.4 / 11 + 0.5) / 2)
    assert res["num_classes_evaluated"] == 2
    assert res["num_gt"] == {"cat": 3, "dog": 1, "bird": 0}
    assert res["num_gt_ignored"] == {"cat": 0, "dog": 1, "bird": 0}
    assert res["num_tp"] == {"cat": 3, "dog": 1, "bird": 0}
    assert res["num_fp"] == {"cat": 2, "dog": 1, "bird": 0}
    assert res["num_det_ignored"] == {"cat": 0, "dog": 1, "bird": 0}
    table = format_voc_table(res)
    assert "VOC07 11-point" in table and "area (VOC2010+)" in table
    assert "n/a (no gt)" in table and "mean (2 classes)" in table


def test_difficult_is_neither_tp_nor_fp_and_not_a_positive():
    gt = make_gt(
        [1],
        [(1, 1, [0, 0, 10, 10], 0, 0), (1, 1, [50, 50, 10, 10], 1, 0)],
        [(1, "a")],
    )
    # The detection on the difficult box ranks first; were it an FP, AP would be 0.5.
    dets = [det(1, 1, [50, 50, 10, 10], 0.9), det(1, 1, [0, 0, 10, 10], 0.8)]
    res = evaluate_voc(gt, dets)
    assert res["ap_area"]["a"] == pytest.approx(1.0)
    assert res["ap_07_11pt"]["a"] == pytest.approx(1.0)
    assert res["num_gt"]["a"] == 1
    assert (res["num_tp"]["a"], res["num_fp"]["a"], res["num_det_ignored"]["a"]) == (1, 0, 1)


def test_crowd_is_treated_like_difficult():
    gt = make_gt(
        [1],
        [(1, 1, [0, 0, 10, 10], 0, 0), (1, 1, [50, 50, 10, 10], 0, 1)],
        [(1, "a")],
    )
    dets = [det(1, 1, [50, 50, 10, 10], 0.9), det(1, 1, [0, 0, 10, 10], 0.8)]
    res = evaluate_voc(gt, dets)
    assert res["ap_area"]["a"] == pytest.approx(1.0)
    assert res["num_gt"]["a"] == 1 and res["num_det_ignored"]["a"] == 1


def test_duplicate_detection_is_false_positive():
    gt = make_gt([1], [(1, 1, [0, 0, 10, 10], 0, 0), (1, 1, [50, 50, 10, 10], 0, 0)], [(1, "a")])
    dets = [
        det(1, 1, [0, 0, 10, 10], 0.9),
        det(1, 1, [0, 0, 10, 10.5], 0.8),  # second detection on the same box
        det(1, 1, [50, 50, 10, 10], 0.7),
    ]
    res = evaluate_voc(gt, dets)
    # TP, FP, TP over 2 positives: 0.5 * 1 + 0.5 * 2/3.
    assert res["ap_area"]["a"] == pytest.approx(5 / 6)
    assert (res["num_tp"]["a"], res["num_fp"]["a"]) == (2, 1)


def test_duplicate_of_difficult_is_still_ignored():
    # The devkit ignores every detection whose best box is difficult, not only the first one.
    gt = make_gt([1], [(1, 1, [0, 0, 10, 10], 0, 0), (1, 1, [50, 50, 10, 10], 1, 0)], [(1, "a")])
    dets = [
        det(1, 1, [50, 50, 10, 10], 0.9),
        det(1, 1, [50, 50, 10, 10], 0.85),
        det(1, 1, [0, 0, 10, 10], 0.8),
    ]
    res = evaluate_voc(gt, dets)
    assert res["ap_area"]["a"] == pytest.approx(1.0)
    assert res["num_det_ignored"]["a"] == 2


def test_best_box_taken_gives_fp_not_second_best():
    # Devkit: the detection's max-IoU box is already detected -> FP, even if another box overlaps enough.
    gt = make_gt([1], [(1, 1, [0, 0, 10, 10], 0, 0), (1, 1, [2, 0, 10, 10], 0, 0)], [(1, "a")])
    dets = [det(1, 1, [0, 0, 10, 10], 0.9), det(1, 1, [0.5, 0, 10, 10], 0.8)]
    res = evaluate_voc(gt, dets)
    assert (res["num_tp"]["a"], res["num_fp"]["a"]) == (1, 1)


def test_iou_exactly_threshold_matches_like_devkit():
    gt = make_gt([1], [(1, 1, [0, 0, 10, 10], 0, 0)], [(1, "a")])
    res = evaluate_voc(gt, [det(1, 1, [0, 0, 10, 5], 0.9)])  # IoU = 50 / 100
    assert res["num_tp"]["a"] == 1 and res["ap_area"]["a"] == pytest.approx(1.0)
    res = evaluate_voc(gt, [det(1, 1, [0, 0, 10, 4.9], 0.9)])
    assert res["num_tp"]["a"] == 0 and res["ap_area"]["a"] == 0.0


def test_score_ties_keep_input_order():
    gt = make_gt([1], [(1, 1, [0, 0, 10, 10], 0, 0), (1, 1, [50, 50, 10, 10], 0, 0)], [(1, "a")])
    tp_first = [det(1, 1, [0, 0, 10, 10], 0.5), det(1, 1, [80, 80, 5, 5], 0.5)]
    assert evaluate_voc(gt, tp_first)["ap_area"]["a"] == pytest.approx(0.5)
    assert evaluate_voc(gt, tp_first[::-1])["ap_area"]["a"] == pytest.approx(0.25)


def test_no_detections_gives_zero_ap_and_unknown_ids_raise():
    gt = make_gt([1], [(1, 1, [0, 0, 10, 10], 0, 0)], [(1, "a")])
    res = evaluate_voc(gt, [])
    assert res["ap_area"]["a"] == 0.0 and res["ap_07_11pt"]["a"] == 0.0 and res["map_area"] == 0.0
    # No ground truth at all: every detection is an FP, no class is evaluated.
    res = evaluate_voc(make_gt([1], [], [(1, "a")]), [det(1, 1, [0, 0, 1, 1], 0.5)])
    assert res["num_fp"]["a"] == 1 and math.isnan(res["map_area"]) and res["num_classes_evaluated"] == 0
    with pytest.raises(ValueError, match=r"category ids \[7\]"):
        evaluate_voc(gt, [det(1, 7, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        evaluate_voc(gt, [det(99, 1, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="record 0"):
        evaluate_voc(gt, [{"image_id": 1, "category_id": 1, "score": 0.5}])


def devkit_reference(gt, dets, cls_id, iou_thresh=0.5):
    """Loop port of VOCevaldet.m / VOCap.m on one class (stable sort like MATLAB's sort)."""
    recs = {}
    npos = 0
    for a in gt["annotations"]:
        if a["category_id"] != cls_id:
            continue
        r = recs.setdefault(a["image_id"], {"bb": [], "diff": [], "det": []})
        x, y, w, h = a["bbox"]
        r["bb"].append((x, y, x + w, y + h))
        r["diff"].append(bool(a["difficult"]))
        r["det"].append(False)
        npos += not a["difficult"]
    dets = [d for d in dets if d["category_id"] == cls_id]
    order = sorted(range(len(dets)), key=lambda i: -dets[i]["score"])
    tp, fp = [], []
    for i in order:
        d = dets[i]
        x, y, w, h = d["bbox"]
        bb = (x, y, x + w, y + h)
        r = recs.get(d["image_id"], {"bb": [], "diff": [], "det": []})
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(r["bb"]):
            iw = min(bb[2], g[2]) - max(bb[0], g[0])
            ih = min(bb[3], g[3]) - max(bb[1], g[1])
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= iou_thresh:
            if not r["diff"][jmax]:
                if not r["det"][jmax]:
                    tp.append(1), fp.append(0)
                    r["det"][jmax] = True
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(0)  # ignored, kept as in the devkit
        else:
            tp.append(0), fp.append(1)
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    with np.errstate(invalid="ignore"):
        prec = ctp / (ctp + cfp)
    ap07 = 0.0
    for t in np.arange(11) / 10:
        p = prec[(rec >= t) & ~np.isnan(prec)]
        ap07 += (p.max() if p.size else 0.0) / 11
    mrec = np.concatenate(([0], rec, [1]))
    mpre = np.concatenate(([0], np.nan_to_num(prec), [0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return ap07, float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def test_matches_loop_port_of_devkit_on_random_data():
    rng = np.random.default_rng(0)
    anns = []
    for img in range(1, 9):
        for _ in range(rng.integers(0, 6)):
            xy = rng.integers(0, 60, size=2)
            wh = rng.integers(5, 40, size=2)
            anns.append((img, int(rng.integers(1, 4)), [*xy, *wh], int(rng.random() < 0.2), 0))
    gt = make_gt(range(1, 9), anns, [(1, "a"), (2, "b"), (3, "c")])
    dets = []
    for a in anns:  # jittered copies of boxes, some in the wrong class
        for _ in range(rng.integers(0, 3)):
            box = np.array(a[2], dtype=float) + rng.normal(0, 3, size=4)
            box[2:] = np.maximum(box[2:], 1)
            cat = a[1] if rng.random() < 0.8 else int(rng.integers(1, 4))
            dets.append(det(a[0], cat, box, float(np.round(rng.random(), 1))))  # rounded: many ties
    for _ in range(15):
        dets.append(
            det(int(rng.integers(1, 9)), int(rng.integers(1, 4)), [*rng.uniform(0, 80, 2), 10, 10], 0.3)
        )
    res = evaluate_voc(gt, dets)
    for cid, name in [(1, "a"), (2, "b"), (3, "c")]:
        ap07, aparea = devkit_reference(gt, dets, cid)
        assert res["ap_07_11pt"][name] == pytest.approx(ap07)
        assert res["ap_area"][name] == pytest.approx(aparea)
