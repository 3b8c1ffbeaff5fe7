"""The Open Images metric (metrics/oid/): the hierarchy, the matching rules on hand-computed cases
(group-of boxes, verified labels, ancestors), AP, the group-of weight, and the submission files. Against
independent references: tests/test_oid_eval_reference.py."""

import csv
import math

import numpy as np
import pytest
from oid_helpers import HIERARCHY, box, det, image, make_gt

from metrics.oid.hierarchy import load_hierarchy
from metrics.oid.metric import evaluate_oid, format_oid_table
from metrics.oid.submission import (
    merge_oid_submissions,
    oid_submission_to_coco_results,
    read_oid_submission,
    write_oid_submission,
)


def test_load_hierarchy_tree_and_parent_map():
    mids = ["/m/a", "/m/m", "/m/d", "/m/c"]
    expected = {"/m/a": [], "/m/m": ["/m/a"], "/m/d": ["/m/a", "/m/m"], "/m/c": []}
    assert load_hierarchy(HIERARCHY, mids) == expected
    assert load_hierarchy({"/m/d": ["/m/m"], "/m/m": ["/m/a"], "/m/a": [], "/m/c": []}, mids) == expected
    # A grandparent still counts when the parent is not a selected class.
    assert load_hierarchy(HIERARCHY, ["/m/d", "/m/a"]) == {"/m/d": ["/m/a"], "/m/a": []}
    # Root skipped, Part links ignored (as the reference).
    full = load_hierarchy(HIERARCHY)
    assert "/m/0bl9f" not in full and "/m/wheel" not in full
    with pytest.raises(ValueError, match="cycle"):
        load_hierarchy({"/m/x": ["/m/y"], "/m/y": ["/m/x"]})


def test_group_of_box_gives_one_tp_at_its_highest_score():
    gt = make_gt(
        [image(1, present=[4])],
        [box(1, 4, [0, 0, 100, 100], group_of=1), box(1, 4, [200, 200, 50, 50])],
    )
    dets = [
        det(1, 4, [10, 10, 20, 20], 0.9),  # inside the group-of box
        det(1, 4, [300, 300, 10, 10], 0.8),  # FP
        det(1, 4, [50, 50, 20, 20], 0.75),  # inside the group-of box: ignored
        det(1, 4, [30, 30, 20, 20], 0.7),  # inside the group-of box: ignored
        det(1, 4, [200, 200, 50, 50], 0.6),  # TP on the ordinary box
    ]
    res = evaluate_oid(gt, dets)
    # Ranked entries: group TP 0.9, FP 0.8, TP 0.6 over 2 positives: 0.5 * 1 + 0.5 * 2/3.
    # (Were the group TP at its lowest score 0.7 it would rank after the FP: 2/3.)
    assert res["ap"]["Car"] == pytest.approx(5 / 6)
    assert res["num_gt"]["Car"] == 2 and res["num_gt_group_of"]["Car"] == 1
    assert (res["num_tp"]["Car"], res["num_fp"]["Car"], res["num_ignored_group_of"]["Car"]) == (2, 1, 2)


def test_duplicate_of_taken_box_goes_on_to_group_of():
    # An ordinary box inside a group-of box: the second detection on it is not a TP for the ordinary box
    # but falls inside the group-of box (reference: group-of matching takes every non-TP detection).
    gt = make_gt(
        [image(1, present=[4])],
        [box(1, 4, [0, 0, 100, 100], group_of=1), box(1, 4, [10, 10, 20, 20])],
    )
    dets = [det(1, 4, [10, 10, 20, 20], 0.9), det(1, 4, [10, 10, 20, 21], 0.8)]
    res = evaluate_oid(gt, dets)
    assert res["ap"]["Car"] == pytest.approx(1.0)
    assert (res["num_tp"]["Car"], res["num_fp"]["Car"]) == (2, 0)


def test_group_of_needs_ioa_at_threshold():
    gt = make_gt([image(1, present=[4])], [box(1, 4, [0, 0, 100, 100], group_of=1)])
    # Half of each detection lies inside the group-of box: IoA = 0.5 matches, 0.49 does not.
    res = evaluate_oid(gt, [det(1, 4, [90, 0, 20, 10], 0.9)])
    assert res["num_tp"]["Car"] == 1 and res["ap"]["Car"] == pytest.approx(1.0)
    res = evaluate_oid(gt, [det(1, 4, [90.2, 0, 20, 10], 0.9)])
    assert res["num_fp"]["Car"] == 1 and res["ap"]["Car"] == 0.0


def test_detection_of_unverified_class_is_ignored():
    gt = make_gt(
        [image(1, present=[4]), image(2, present=[3])],
        [box(1, 4, [0, 0, 50, 50]), box(2, 3, [0, 0, 50, 50])],
    )
    dets = [
        det(1, 3, [100, 100, 50, 50], 0.99),  # Dog in image 1: neither verified nor boxed there
        det(2, 3, [0, 0, 50, 50], 0.5),  # TP
    ]
    res = evaluate_oid(gt, dets)
    assert res["ap"]["Dog"] == pytest.approx(1.0)  # as an FP it would rank first: AP 0.5
    assert res["num_ignored_unverified"]["Dog"] == 1 and res["num_fp"]["Dog"] == 0


def test_class_with_box_but_no_image_label_is_evaluated():
    # The reference evaluates the union of image-level labels and box labels.
    gt = make_gt([image(1), image(2)], [box(1, 3, [0, 0, 50, 50])])
    dets = [det(1, 3, [200, 200, 50, 50], 0.9), det(1, 3, [0, 0, 50, 50], 0.5)]
    res = evaluate_oid(gt, dets)
    assert res["ap"]["Dog"] == pytest.approx(0.5)
    assert res["num_fp"]["Dog"] == 1


def test_detection_of_verified_absent_class_is_false_positive():
    gt = make_gt(
        [image(1, present=[3]), image(2, absent=[3]), image(3, absent=[2])],
        [box(1, 3, [0, 0, 50, 50])],
    )
    tp = det(1, 3, [0, 0, 50, 50], 0.5)
    res = evaluate_oid(gt, [det(2, 3, [0, 0, 50, 50], 0.9), tp])
    assert res["ap"]["Dog"] == pytest.approx(0.5)
    assert res["num_fp"]["Dog"] == 1
    # Mammal verified absent in image 3 expands to its descendant Dog with the hierarchy.
    dets = [det(3, 3, [0, 0, 50, 50], 0.9), tp]
    assert evaluate_oid(gt, dets)["num_ignored_unverified"]["Dog"] == 1
    res = evaluate_oid(gt, dets, hierarchy=HIERARCHY)
    assert res["ap"]["Dog"] == pytest.approx(0.5) and res["num_fp"]["Dog"] == 1


def test_child_ground_truth_counts_for_ancestors():
    gt = make_gt([image(1, present=[3])], [box(1, 3, [0, 0, 50, 50])])
    dets = [
        det(1, 1, [0, 0, 50, 50], 0.9),
        det(1, 2, [1, 1, 50, 50], 0.8),
        det(1, 2, [200, 200, 50, 50], 0.95),
    ]
    res = evaluate_oid(gt, dets, hierarchy=HIERARCHY)
    assert res["ap"]["Animal"] == pytest.approx(1.0)
    # Mammal: FP 0.95 then TP 0.8 over 1 positive.
    assert res["ap"]["Mammal"] == pytest.approx(0.5)
    assert res["num_gt"] == {"Animal": 1, "Mammal": 1, "Dog": 1, "Car": 0}
    assert res["ap"]["Dog"] == 0.0  # a positive without detections
    assert math.isnan(res["ap"]["Car"])
    assert res["map"] == pytest.approx((1.0 + 0.5 + 0.0) / 3) and res["num_classes_evaluated"] == 3
    # Without the hierarchy the parents have no ground truth and are not verified: detections ignored.
    flat = evaluate_oid(gt, dets)
    assert math.isnan(flat["ap"]["Animal"]) and flat["num_ignored_unverified"]["Mammal"] == 2
    table = format_oid_table(res)
    assert "Mammal" in table and "/m/m" in table and "mAP (3 classes with ground truth)" in table


def test_all_point_ap_on_known_sequence():
    # 4 positives; ranked TP, FP, FP, TP, TP: precision 1, 1/2, 1/3, 1/2, 3/5 at recall 1/4 ... 3/4.
    # Envelope: 1 on [0, 1/4], 3/5 on (1/4, 3/4], nothing beyond: 1/4 + 2 * 1/4 * 3/5 = 0.55.
    gts = [box(1, 4, [100 * i, 0, 50, 50]) for i in range(4)]
    gt = make_gt([image(1, present=[4])], gts)
    dets = [
        det(1, 4, [0, 0, 50, 50], 0.9),
        det(1, 4, [0, 200, 50, 50], 0.8),
        det(1, 4, [0, 300, 50, 50], 0.7),
        det(1, 4, [100, 0, 50, 50], 0.6),
        det(1, 4, [200, 0, 50, 50], 0.5),
    ]
    assert evaluate_oid(gt, dets)["ap"]["Car"] == pytest.approx(0.55)


def test_invalid_boxes_removed_and_unknown_ids_raise():
    gt = make_gt([image(1, present=[4])], [box(1, 4, [0, 0, 50, 50])])
    res = evaluate_oid(gt, [det(1, 4, [10, 10, 0, 5], 0.9), det(1, 4, [0, 0, 50, 50], 0.5)])
    assert res["num_invalid"]["Car"] == 1 and res["ap"]["Car"] == pytest.approx(1.0)
    res = evaluate_oid(gt, [])
    assert res["ap"]["Car"] == 0.0 and res["map"] == 0.0 and res["num_classes_evaluated"] == 1
    res = evaluate_oid(make_gt([image(1, present=[4])], []), [det(1, 4, [0, 0, 5, 5], 0.5)])
    assert res["num_fp"]["Car"] == 1 and math.isnan(res["map"])
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        evaluate_oid(gt, [det(9, 4, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match=r"category ids \[8\]"):
        evaluate_oid(gt, [det(1, 8, [0, 0, 5, 5], 0.5)])


def group_of_weight_case():
    """Car in image 1: an ordinary box A and group-of boxes G1, G2; Dog in image 2: one group-of box G3."""
    gt = make_gt(
        [image(1, present=[4]), image(2, present=[3])],
        [
            box(1, 4, [0, 0, 100, 100]),  # A
            box(1, 4, [200, 0, 200, 200], group_of=1),  # G1
            box(1, 4, [0, 200, 200, 200], group_of=1),  # G2: no detection inside
            box(2, 3, [100, 100, 200, 200], group_of=1),  # G3, Dog's only box
        ],
    )
    dets = [
        det(1, 4, [0, 0, 100, 100], 0.9),  # TP on A
        det(1, 4, [120, 120, 40, 40], 0.85),  # FP: touches no box
        det(1, 4, [220, 20, 50, 50], 0.8),  # inside G1: G1's true positive at 0.8
        det(1, 4, [300, 100, 50, 50], 0.7),  # inside G1: absorbed
        det(1, 4, [2, 2, 98, 98], 0.4),  # duplicate on A, outside G1/G2: FP
        det(2, 3, [0, 0, 50, 50], 0.95),  # outside G3: FP
        det(2, 3, [150, 150, 50, 50], 0.7),  # inside G3: G3's true positive at 0.7
        det(2, 3, [110, 110, 30, 30], 0.3),  # inside G3: absorbed
    ]
    return gt, dets


@pytest.mark.parametrize(
    "weight, car_ap, dog_ap",
    [
        # Car entries by score: TP 1 (0.9), FP (0.85), TP w (0.8), FP (0.4); positives 1 + 2w.
        # w = 1: precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3 -> 1/3 * 1 + 1/3 * 2/3 = 5/9.
        # Dog entries: FP (0.95), TP w (0.7); positives w: precision 0, w / (1 + w) at recall 0, 1.
        (1.0, 5 / 9, 1 / 2),
        # w = 0.5: precision 1, 1/2, 1.5/2.5, 1.5/3.5 at recall 1/2, 1/2, 3/4, 3/4 -> 1/2 + 1/4 * 0.6.
        (0.5, 0.5 + 0.25 * 0.6, 0.5 / 1.5),
        # w = 0: group-of boxes are ignore regions; Car: TP, FP, FP over 1 positive; Dog has no positives.
        (0.0, 1.0, float("nan")),
    ],
)
def test_group_of_weight_hand_computed(weight, car_ap, dog_ap):
    gt, dets = group_of_weight_case()
    res = evaluate_oid(gt, dets, group_of_weight=weight)
    assert res["ap"]["Car"] == pytest.approx(car_ap)
    assert res["ap"]["Dog"] == pytest.approx(dog_ap, nan_ok=True)
    assert res["num_positives"]["Car"] == pytest.approx(1 + 2 * weight)
    assert res["num_positives"]["Dog"] == pytest.approx(weight)
    assert res["num_gt"]["Car"] == 3 and res["num_gt_group_of"]["Car"] == 2
    num_group_tp = 1 if weight > 0 else 0
    assert res["num_tp_group_of"]["Car"] == res["num_tp_group_of"]["Dog"] == num_group_tp
    assert (res["num_tp"]["Car"], res["num_fp"]["Car"]) == (1 + num_group_tp, 2)
    assert res["num_ignored_group_of"]["Car"] == 2 - num_group_tp
    assert res["map"] == pytest.approx(np.nanmean([car_ap, dog_ap]))
    assert res["group_of_weight"] == weight
    table = format_oid_table(res)
    assert "#diff" in table and (weight == 1.0) == ("group-of weight" not in table)


def test_group_of_weight_one_is_the_default_and_out_of_range_raises():
    gt, dets = group_of_weight_case()
    default = evaluate_oid(gt, dets)
    assert (default["ap"]["Car"], default["ap"]["Dog"]) == (pytest.approx(5 / 9), pytest.approx(1 / 2))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="group_of_weight must be in"):
            evaluate_oid(gt, dets, group_of_weight=bad)


def test_pr_curve_is_the_precision_envelope():
    gt, dets = group_of_weight_case()
    curve = evaluate_oid(gt, dets)["pr_curves"]["Car"]
    # Car at w = 1: recall 1/3 at precision 1, 2/3 at 2/3 (envelope), never above 2/3.
    thresholds = np.linspace(0, 1, 101)
    expected = np.where(thresholds <= 1 / 3, 1.0, np.where(thresholds <= 2 / 3, 2 / 3, 0.0))
    assert np.allclose(curve, expected, atol=1e-6)


def submission_gt():
    images = [
        image(1, oid_image_id="000026e7ee790996"),
        {**image(2), "file_name": "validation/0001eeaf4aed83f9.jpg", "width": 200, "height": 100},
        image(3, oid_image_id="ffff21932da3ed01"),
    ]
    return make_gt(images, [])


def test_submission_round_trip(tmp_path):
    gt = submission_gt()
    dets = [
        det(1, 4, [40, 80, 120, 40.5], 0.25),
        det(1, 3, [0, 0, 400, 400], 0.875),
        det(2, 1, [20, 10, 100, 50], 0.5),
    ]
    path = str(tmp_path / "sub.csv")
    assert write_oid_submission(dets, gt, path) == 3
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    assert rows[1] == [
        "000026e7ee790996",
        "/m/d 0.875 0.000000 0.000000 1.000000 1.000000 /m/c 0.25 0.100000 0.200000 0.400000 0.301250",
    ]
    assert rows[2] == ["0001eeaf4aed83f9", "/m/a 0.5 0.100000 0.100000 0.600000 0.600000"]
    assert rows[3] == ["ffff21932da3ed01", ""]  # every image gets a row

    preds = read_oid_submission(path)
    assert preds["ffff21932da3ed01"] == []
    assert preds["0001eeaf4aed83f9"] == [("/m/a", 0.5, 0.1, 0.1, 0.6, 0.6)]
    back = oid_submission_to_coco_results(preds, gt)
    key = lambda d: (d["image_id"], d["category_id"])  # noqa: E731
    for a, b in zip(sorted(back, key=key), sorted(dets, key=key)):
        assert key(a) == key(b) and a["score"] == b["score"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)


def test_merge_submissions(tmp_path):
    gt = submission_gt()
    p1, p2, out = str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), str(tmp_path / "merged.csv")
    write_oid_submission([det(1, 4, [0, 0, 40, 40], 0.5)], {**gt, "images": gt["images"][:2]}, p1)
    write_oid_submission(
        [det(1, 3, [0, 0, 40, 40], 0.25), det(3, 3, [0, 0, 4, 4], 0.75)],
        {**gt, "images": [gt["images"][2], gt["images"][0]]},
        p2,
    )
    stats = merge_oid_submissions([p1, p2], out)
    assert stats["num_images"] == 3 and stats["num_predictions"] == 3
    merged = read_oid_submission(out)
    assert list(merged) == ["000026e7ee790996", "0001eeaf4aed83f9", "ffff21932da3ed01"]
    assert [p[0] for p in merged["000026e7ee790996"]] == ["/m/c", "/m/d"]
    assert merged["0001eeaf4aed83f9"] == []
    assert merged["ffff21932da3ed01"] == [("/m/d", 0.75, 0.0, 0.0, 0.01, 0.01)]


def test_bad_submission_raises(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("ImageId,PredictionString\nabc,/m/a 0.5 0 0 1\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: prediction string of abc"):
        read_oid_submission(str(path))
    path.write_text("ImageID,Predictions\n")
    with pytest.raises(ValueError, match="header must be ImageId,PredictionString"):
        read_oid_submission(str(path))
