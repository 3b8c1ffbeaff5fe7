import csv
import math

import numpy as np
import pytest

from metrics.oid.hierarchy import load_hierarchy
from metrics.oid.metric import evaluate_oid, format_oid_table
from metrics.oid.submission import (
    merge_oid_submissions,
    oid_submission_to_coco_results,
    read_oid_submission,
    write_oid_submission,
)

# Entity (root, skipped) -> Animal -> Mammal -> Dog; Entity -> Car.
HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/m", "Subcategory": [{"LabelName": "/m/d"}]}]},
        {"LabelName": "/m/c", "Part": [{"LabelName": "/m/wheel"}]},
    ],
}
CATEGORIES = [
    {"id": 1, "name": "Animal", "mid": "/m/a"},
    {"id": 2, "name": "Mammal", "mid": "/m/m"},
    {"id": 3, "name": "Dog", "mid": "/m/d"},
    {"id": 4, "name": "Car", "mid": "/m/c"},
]


def image(i, present=(), absent=(), **extra):
    return {
        "id": i,
        "file_name": f"validation/img{i}.jpg",
        "width": 400,
        "height": 400,
        "verified_present": list(present),
        "verified_absent": list(absent),
        **extra,
    }


def box(img, cat, xywh, group_of=0):
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in xywh], "iscrowd": group_of}


def make_gt(images, boxes):
    anns = [
        {"id": i + 1, "area": b["bbox"][2] * b["bbox"][3], "difficult": 0, **b} for i, b in enumerate(boxes)
    ]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def det(img, cat, xywh, score):
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in xywh], "score": score}


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


# The dict path of the hierarchy expansion: the reference that utils/oid_arrays.oid_gt_arrays (what
# evaluate_oid uses) vectorises; test_array_expansion_equals_the_dict_path compares the two.


def _category_maps(gt, ancestors):
    """(ancestors, descendants): category id -> category ids."""
    id_of_mid = {c["mid"]: int(c["id"]) for c in gt["categories"]}
    anc_by_cat = {
        int(c["id"]): [id_of_mid[a] for a in ancestors.get(c["mid"], []) if a in id_of_mid]
        for c in gt["categories"]
    }
    desc_by_cat = {cid: [] for cid in anc_by_cat}
    for cid, ancs in anc_by_cat.items():
        for a in ancs:
            desc_by_cat[a].append(cid)
    return anc_by_cat, desc_by_cat


def expand_ground_truth(gt, ancestors):
    """Expanded copy of a common-format OID ground truth: each box copied to every ancestor class (copies
    numbered after the last id, with ``expanded_from``), verified-present labels plus their ancestors and
    verified-absent labels plus their descendants (sorted)."""
    anc_by_cat, desc_by_cat = _category_maps(gt, ancestors)
    next_id = max((int(a["id"]) for a in gt["annotations"]), default=0) + 1
    extra = []
    for a in gt["annotations"]:
        for anc in anc_by_cat.get(int(a["category_id"]), ()):
            extra.append({**a, "id": next_id, "category_id": anc, "expanded_from": a.get("id")})
            next_id += 1
    images = []
    for img in gt["images"]:
        present, absent = set(img.get("verified_present", ())), set(img.get("verified_absent", ()))
        for c in list(present):
            present.update(anc_by_cat.get(c, ()))
        for c in list(absent):
            absent.update(desc_by_cat.get(c, ()))
        images.append({**img, "verified_present": sorted(present), "verified_absent": sorted(absent)})
    return {**gt, "images": images, "annotations": list(gt["annotations"]) + extra}


def select_categories(gt, category_ids):
    """The ground truth of ``category_ids`` only (in that order); every image is kept."""
    category_ids = [int(c) for c in category_ids]
    by_id = {int(c["id"]): c for c in gt["categories"]}
    keep = set(category_ids)
    images = [
        {
            **img,
            "verified_present": [c for c in img.get("verified_present", ()) if int(c) in keep],
            "verified_absent": [c for c in img.get("verified_absent", ()) if int(c) in keep],
        }
        for img in gt["images"]
    ]
    return {
        **gt,
        "images": images,
        "annotations": [a for a in gt["annotations"] if int(a["category_id"]) in keep],
        "categories": [by_id[c] for c in category_ids],
    }


def test_expand_ground_truth():
    gt = make_gt(
        [image(1, present=[3]), image(2, absent=[2]), image(3, present=[4], absent=[1])],
        [box(1, 3, [0, 0, 50, 50]), box(3, 4, [0, 0, 10, 10], group_of=1)],
    )
    out = expand_ground_truth(gt, load_hierarchy(HIERARCHY, [c["mid"] for c in CATEGORIES]))
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in out["annotations"]] == [
        (1, 3, 0),
        (3, 4, 1),
        (1, 1, 0),
        (1, 2, 0),
    ]
    assert [a["id"] for a in out["annotations"]] == [1, 2, 3, 4]
    assert out["annotations"][2]["expanded_from"] == 1
    assert [(i["verified_present"], i["verified_absent"]) for i in out["images"]] == [
        ([1, 2, 3], []),
        ([], [2, 3]),
        ([4], [1, 2, 3]),
    ]
    assert len(gt["annotations"]) == 2 and gt["images"][0]["verified_present"] == [3]  # input untouched


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


@pytest.mark.parametrize("seed,weight", [(3, 1.0), (4, 1.0), (5, 1.0), (3, 0.5), (4, 0.25), (5, 0.0)])
def test_matches_loop_port_of_reference_on_random_data(seed, weight):
    rng = np.random.default_rng(seed)
    images, boxes, dets = [], [], []
    for i in range(1, 25):
        cats = rng.choice([1, 2, 3, 4], size=rng.integers(0, 4), replace=False).tolist()
        images.append(image(i, present=cats[:1], absent=cats[1:2]))
        for c in cats[:1] + cats[2:]:
            for _ in range(rng.integers(1, 4)):
                xy, wh = rng.uniform(0, 250, 2), rng.uniform(20, 140, 2)
                boxes.append(box(i, c, [*xy, *wh], group_of=int(rng.random() < 0.3)))
        for _ in range(rng.integers(0, 10)):
            xy, wh = rng.uniform(0, 250, 2), rng.uniform(10, 140, 2)
            dets.append(det(i, int(rng.integers(1, 5)), [*xy, *wh], float(rng.random())))
    for b in boxes:  # jittered hits, several per box
        for _ in range(rng.integers(0, 3)):
            xywh = np.array(b["bbox"]) + rng.normal(0, 4, 4)
            xywh[2:] = np.maximum(xywh[2:], 1)
            dets.append(det(b["image_id"], b["category_id"], xywh, float(rng.random())))
        if b["iscrowd"]:  # small detections inside group-of boxes
            for _ in range(rng.integers(0, 4)):
                x, y, w, h = b["bbox"]
                sub = [x + rng.uniform(0, w / 2), y + rng.uniform(0, h / 2), w / 3, h / 3]
                dets.append(det(b["image_id"], b["category_id"], sub, float(rng.random())))
    gt = make_gt(images, boxes)
    res = evaluate_oid(gt, dets, group_of_weight=weight)
    for c in CATEGORIES:
        expected = reference_ap(gt, dets, c["id"], group_of_weight=weight)
        assert res["ap"][c["name"]] == pytest.approx(expected, nan_ok=True)


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


def reference_ap(gt, dets, cls_id, thr=0.5, group_of_weight=1.0):
    """Loop port of OpenImagesChallengeEvaluator for one class (no difficult boxes).

    per_image_evaluation._compute_tp_fp_for_single_class gives each hit group-of box one entry with
    label group_of_weight (kept when its score > 0 and the weight > 0);
    ObjectDetectionEvaluation adds group_of_weight positives per group-of box;
    metrics.compute_precision_recall: precision = cum_tp / (cum_tp + cum_fp), fp = label <= 0.
    """
    verified = {img["id"]: set(img["verified_present"]) | set(img["verified_absent"]) for img in gt["images"]}
    for a in gt["annotations"]:
        verified[a["image_id"]].add(a["category_id"])
    num_gt = sum(
        (group_of_weight if a["iscrowd"] else 1.0) for a in gt["annotations"] if a["category_id"] == cls_id
    )
    scores, labels = [], []
    for img in gt["images"]:
        g = [a for a in gt["annotations"] if a["image_id"] == img["id"] and a["category_id"] == cls_id]
        d = [x for x in dets if x["image_id"] == img["id"] and x["category_id"] == cls_id]
        if cls_id not in verified[img["id"]] or not d:
            continue
        d = sorted(d, key=lambda x: -x["score"])
        to_xyxy = lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])  # noqa: E731
        normal = [to_xyxy(a["bbox"]) for a in g if not a["iscrowd"]]
        group = [to_xyxy(a["bbox"]) for a in g if a["iscrowd"]]

        def inter(p, q):
            return max(0, min(p[2], q[2]) - max(p[0], q[0])) * max(0, min(p[3], q[3]) - max(p[1], q[1]))

        def area(p):
            return (p[2] - p[0]) * (p[3] - p[1])

        tp = [False] * len(d)
        taken = [False] * len(normal)
        for i, x in enumerate(d):
            b = to_xyxy(x["bbox"])
            if normal:
                ious = [inter(b, q) / (area(b) + area(q) - inter(b, q)) for q in normal]
                j = int(np.argmax(ious))
                if ious[j] >= thr and not taken[j]:
                    tp[i], taken[j] = True, True
        group_score = [0.0] * len(group)
        in_group = [False] * len(d)
        for i, x in enumerate(d):
            b = to_xyxy(x["bbox"])
            if group and not tp[i]:
                ioas = [inter(b, q) / area(b) for q in group]
                j = int(np.argmax(ioas))
                if ioas[j] >= thr:
                    in_group[i] = True
                    group_score[j] = max(group_score[j], x["score"])
        for i, x in enumerate(d):
            if not in_group[i]:
                scores.append(x["score"])
                labels.append(float(tp[i]))
        for s in group_score:
            if s > 0 and group_of_weight > 0:
                scores.append(s)
                labels.append(group_of_weight)
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-np.array(scores), kind="mergesort")
    tp = np.array(labels)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(tp <= 0)
    precision, recall = ctp / (ctp + cfp), ctp / num_gt
    # metrics.compute_average_precision
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    idx = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


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


def test_array_expansion_equals_the_dict_path():
    """oid_gt_arrays (what evaluate_oid uses) against expand_ground_truth + select_categories +
    gt_to_arrays on a random 3-level hierarchy, with and without a class subset."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_eval import synthetic_oid

    from metrics.oid.arrays import oid_gt_arrays
    from metrics.voc import gt_to_arrays

    gt, _dets, tree = synthetic_oid(np.random.default_rng(3), 60, 30, 5.0, 5)
    ancestors = load_hierarchy(tree, [c["mid"] for c in gt["categories"]])
    assert sum(map(len, ancestors.values())) > 30  # a real hierarchy: most classes have ancestors
    subset = [7, 2, 25, 1, 30]
    for category_ids in (None, subset):
        expanded = expand_ground_truth(gt, ancestors)
        if category_ids is not None:
            expanded = select_categories(expanded, category_ids)
        ref = gt_to_arrays(expanded)
        gta, keys, categories = oid_gt_arrays(gt, ancestors, category_ids)
        for col in ("img", "cls", "boxes", "difficult", "iscrowd"):
            np.testing.assert_array_equal(gta[col], ref[col], err_msg=col)
        assert gta["class_names"] == ref["class_names"] and categories == expanded["categories"]
        k = len(categories)
        ref_keys = {
            i * k + ref["category_index"][c]
            for i, img in enumerate(expanded["images"])
            for c in img["verified_present"] + img["verified_absent"]
        }
        ref_keys |= set((ref["img"] * k + ref["cls"]).tolist())
        assert keys.tolist() == sorted(ref_keys)
