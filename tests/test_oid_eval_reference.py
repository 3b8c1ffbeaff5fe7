"""The Open Images metric (metrics/oid/) against independent references: a loop port of the official
OpenImagesChallengeEvaluator on random data, and the dict path of the hierarchy expansion that
metrics.oid.arrays.oid_gt_arrays vectorises. Hand-computed cases: tests/test_oid_eval.py."""

import numpy as np
import pytest
from oid_helpers import CATEGORIES, HIERARCHY, box, det, image, make_gt

from metrics.oid.hierarchy import load_hierarchy
from metrics.oid.metric import evaluate_oid

# The dict path of the hierarchy expansion: the reference that metrics.oid.arrays.oid_gt_arrays (what
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


def _inter(p, q):
    return max(0, min(p[2], q[2]) - max(p[0], q[0])) * max(0, min(p[3], q[3]) - max(p[1], q[1]))


def _area(p):
    return (p[2] - p[0]) * (p[3] - p[1])


def reference_image_entries(d, normal, group, thr, group_of_weight):
    """(scores, labels) one image adds for one class: ``d`` its detections sorted by falling score,
    ``normal`` / ``group`` its plain and group-of boxes (xyxy)."""
    scores, labels = [], []
    to_xyxy = lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])  # noqa: E731
    tp = [False] * len(d)
    taken = [False] * len(normal)
    for i, x in enumerate(d):
        b = to_xyxy(x["bbox"])
        if normal:
            ious = [_inter(b, q) / (_area(b) + _area(q) - _inter(b, q)) for q in normal]
            j = int(np.argmax(ious))
            if ious[j] >= thr and not taken[j]:
                tp[i], taken[j] = True, True
    group_score = [0.0] * len(group)
    in_group = [False] * len(d)
    for i, x in enumerate(d):
        b = to_xyxy(x["bbox"])
        if group and not tp[i]:
            ioas = [_inter(b, q) / _area(b) for q in group]
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
    return scores, labels


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
        image_scores, image_labels = reference_image_entries(d, normal, group, thr, group_of_weight)
        scores += image_scores
        labels += image_labels
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
