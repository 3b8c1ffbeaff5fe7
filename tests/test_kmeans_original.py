"""layers/kmeans_original.py: the original codebase's k-means and its shape measure.

Hand-computed cases, and (with FPN_ORIGINAL_REPO set to a checkout of gurkirt/FPN.pytorch1.0) the
original's own kmeans_for_anchors.py and anchorBox on the same synthetic boxes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kmeans_for_anchors
from layers.anchor_sets import original_anchor_fractions, original_anchor_whs
from layers.anchors import load_anchor_file
from layers.kmeans_original import cluster_anchor_whs_original, original_kmeans, shape_quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_REPO = os.environ.get("FPN_ORIGINAL_REPO")


def test_shape_quality_hand_computed():
    anchors = [np.array([[2.0, 4.0]]), np.array([[8.0, 8.0]])]  # pooled over the levels
    # (2, 4) -> 1. (4, 2): best is (2, 4), 4 / (8 + 8 - 4) = 1/3. (2, 2): 4 / 8 = 0.5 exactly, which is
    # NOT recalled (the original's test is IoU > 0.5). (8, 8) -> 1.
    whs = np.array([[2.0, 4.0], [4.0, 2.0], [2.0, 2.0], [8.0, 8.0]])
    q = shape_quality(whs, anchors)
    assert q["average_iou_shape"] == pytest.approx((1 + 1 / 3 + 0.5 + 1) / 4)
    assert q["recall_pct_shape"] == pytest.approx(50.0)
    # Positions play no part: the measure sees (w, h) only.
    assert shape_quality(np.zeros((0, 2)), anchors) == {"average_iou_shape": None, "recall_pct_shape": None}


def test_original_kmeans_hand_computed_mean_update_and_empty_centre():
    whs = np.array([[1.0, 1.0], [1.0, 1.2], [3.0, 3.0], [3.0, 3.6], [0.9, 1.1]])
    seeds = np.array([[1.0, 1.0], [3.0, 3.0], [50.0, 50.0]])
    result = original_kmeans(whs, seeds)
    # Step 1 assigns [0, 0, 1, 1, 0]; centres move to the MEANS; the third has no box and stays.
    np.testing.assert_allclose(result.centres, [[2.9 / 3, 3.3 / 3], [3.0, 3.3], [50.0, 50.0]])
    assert result.assignments.tolist() == [0, 0, 1, 1, 0]
    assert result.num_iters == 1 and result.converged and result.num_empty == 1
    # The first step's line: IoUs with the seeds 1, 1/1.2, 1, 9/10.8, 0.9/1.09; all > 0.5.
    assert result.history[0]["mean_iou"] == pytest.approx((1 + 1 / 1.2 + 1 + 9 / 10.8 + 0.9 / 1.09) / 5)
    assert result.history[0]["recall_pct"] == 100.0


def test_original_kmeans_is_the_mean_not_the_median_and_ties_go_low():
    # One centre: widths 1, 1, 4 -> mean 2 (the median would be 1).
    result = original_kmeans(np.array([[1.0, 1.0], [1.0, 1.0], [4.0, 1.0]]), np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(result.centres, [[2.0, 1.0]])
    # (2, 2) has IoU 0.5 with both (1, 2) and (2, 1): the lower index wins.
    tie = original_kmeans(np.array([[2.0, 2.0]]), np.array([[2.0, 1.0], [1.0, 2.0]]), max_iter=1)
    assert tie.assignments.tolist() == [0]
    with pytest.raises(ValueError, match="max_iter"):
        original_kmeans(np.ones((1, 2)), np.ones((1, 2)), max_iter=0)


def test_original_kmeans_stops_at_max_iter():
    rng = np.random.default_rng(0)
    whs = np.exp(rng.normal(3.0, 0.8, (500, 2)))
    seeds = np.array([[1.0, 1.0], [2.0, 2.0], [400.0, 400.0]])  # far off: many steps to settle
    capped = original_kmeans(whs, seeds, max_iter=1)
    assert capped.num_iters == 1 and not capped.converged
    free = original_kmeans(whs, seeds, max_iter=100)
    assert free.converged and free.num_iters > 1


def test_cluster_anchor_whs_original_keeps_seed_identity_per_level():
    seeds = original_anchor_whs("default", 600)  # the original seeds with its default set
    # Boxes exactly on 14 of the 15 seeds (not P7's last): the centres do not move, the empty one stays.
    whs = np.concatenate([w.double().numpy() for w in seeds])[:14].repeat(3, axis=0)
    centres, summaries = cluster_anchor_whs_original(np.concatenate([whs * 0 + 5, whs + 5], axis=1), 600)
    assert [c.shape for c in centres] == [(3, 2)] * 5
    np.testing.assert_allclose(np.stack(centres), np.stack([w.double().numpy() for w in seeds]), rtol=1e-5)
    assert [s["num_boxes"] for s in summaries] == [9, 9, 9, 9, 6]
    assert summaries[4]["num_empty"] == 1 and summaries[0]["num_empty"] == 0
    assert summaries[0]["mean_iou_init"] == pytest.approx(1.0) and summaries[0]["mean_iou"] == pytest.approx(
        1.0
    )


# ---------------------------------------------------------------------------------------------
# against the original codebase's own code

# Runs in a subprocess: the original's packages (data, models) would clash with ours in one process.
ORIGINAL_SCRIPT = r"""
import contextlib, io, json, sys
import numpy as np
import torch
repo, base_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
import kmeans_for_anchors as okm
from modules.anchor_box_base import anchorBox

real_lists = okm.make_object_lists
okm.make_object_lists = lambda *a, **k: real_lists(*a, **k)[:3]  # its script predates the 4th value
calls = []
real_jaccard = okm.jaccard


def recording_jaccard(a, b):
    out = real_jaccard(a, b)
    calls.append((b.clone(), out.clone()))
    return out


okm.jaccard = recording_jaccard
with contextlib.redirect_stdout(io.StringIO()):
    okm.kmean_whs(base_dir)  # voc then coco: initial, 10 steps, final train, val = 13 calls each


def measure(overlaps):  # its lines: 100 * sum(best > 0.5) / count, mean(best)
    best = overlaps.max(1)[0]
    return {"recall_pct": 100.0 * float((best > 0.5).sum()) / best.numel(), "average_iou": float(best.mean())}


calls = calls[:13]  # voc
result = {
    "seeds": calls[0][0][:, 2:].tolist(),
    "initial": measure(calls[0][1]),
    "centres": calls[-2][0][:, 2:].tolist(),
    "train": measure(calls[-2][1]),
    "val": measure(calls[-1][1]),
}
# pdf9 / pdf6 as get_priors_recall.py's just_whs measures them (its anchorBox call there predates
# the anchor_type argument).
boxes = okm.get_dataset_boxes(base_dir, "voc", ["train2007", "val2007", "train2012", "val2012"])
for name, scales in (("pdf9", [1.0, 1.34, 1.67]), ("pdf6", [1.0, 1.5])):
    with contextlib.redirect_stdout(io.StringIO()):
        anchors = anchorBox("pdf9", input_dim=600, scale_ratios=scales).forward().numpy()
    anchors[:, :2] = 0
    result[name] = measure(real_jaccard(boxes, torch.from_numpy(np.unique(anchors, axis=0))))
print(json.dumps(result))
"""


def _synthetic_fraction_boxes(rng, per_seed):
    """Box (w, h) as fractions of the image, scattered around the default set's 15 shapes."""
    seeds = np.concatenate([w.double().numpy() for w in original_anchor_whs("default", 600)]) / 600
    whs = np.concatenate([s * np.exp(rng.normal(0.0, 0.2, (per_seed, 2))) for s in seeds])
    whs = np.clip(whs, 0.005, 0.98)
    xy = rng.uniform(0.0, 1.0, whs.shape) * (1.0 - whs)
    return np.concatenate([xy, xy + whs], axis=1)  # [N, 4] x1 y1 x2 y2 fractions


def _write_original_annots(path, splits):
    annotations = {}
    for split, boxes in splits.items():
        for i in range(0, len(boxes), 3):
            annos = [{"bbox": b.tolist(), "label": 0} for b in boxes[i : i + 3]]
            annotations[f"{split}/{i:06d}"] = {"set": split, "annos": annos}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"classes": ["thing"], "annotations": annotations}, f)


def _write_ours(path, boxes, width=800, height=600):
    images, anns = [], []
    for i in range(0, len(boxes), 3):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": width, "height": height})
        for b in boxes[i : i + 3]:
            x1, y1, x2, y2 = b * [width, height, width, height]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)


@pytest.mark.skipif(not ORIGINAL_REPO, reason="set FPN_ORIGINAL_REPO to a checkout of gurkirt/FPN.pytorch1.0")
def test_method_original_and_shape_measure_equal_the_original_codebase(tmp_path):
    rng = np.random.default_rng(0)
    train, val = _synthetic_fraction_boxes(rng, 150), _synthetic_fraction_boxes(rng, 40)
    voc_train = dict(zip(["train2007", "val2007", "train2012", "val2012"], np.array_split(train, 4)))
    _write_original_annots(str(tmp_path / "orig" / "voc" / "annots.json"), {**voc_train, "test2007": val})
    coco = _synthetic_fraction_boxes(rng, 30)  # its script clusters coco too; not compared
    _write_original_annots(
        str(tmp_path / "orig" / "coco" / "annots.json"), {"train2017": coco, "val2017": coco}
    )
    done = subprocess.run(
        [sys.executable, "-c", ORIGINAL_SCRIPT, ORIGINAL_REPO, str(tmp_path / "orig") + "/"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])

    # Ours, end to end: the same boxes on 800 x 600 images, squashed to 600 x 600 as training does.
    ann_dir = tmp_path / "ours" / "voc" / "annotations"
    _write_ours(str(ann_dir / "train.json"), train)
    _write_ours(str(ann_dir / "val.json"), val)
    out = tmp_path / "voc_original_method.json"
    argv = ["--data_root", str(tmp_path / "ours"), "--dataset", "voc", "--method", "original"]
    argv += ["--input_dim", "600", "--out", str(out)]
    report = kmeans_for_anchors.main(kmeans_for_anchors.get_args_parser().parse_args(argv))

    # The centres: theirs are in np.unique (seed-sorted) order, ours keep the seed's level and slot.
    ours_seeds = np.concatenate(original_anchor_fractions("default", 600)).astype(np.float32)
    their_seeds = np.array(theirs["seeds"], dtype=np.float32)
    order = [int(np.abs(ours_seeds - s).sum(axis=1).argmin()) for s in their_seeds]
    assert sorted(order) == list(range(15))
    np.testing.assert_array_equal(ours_seeds[order], their_seeds)  # bit for bit: ties break alike
    whs, meta = load_anchor_file(str(out))
    assert meta["layout"] == "original" and meta["method"] == "original"
    ours_centres = np.concatenate([w.double().numpy() for w in whs]) / 600
    np.testing.assert_allclose(ours_centres[order], np.array(theirs["centres"]), rtol=1e-5, atol=1e-7)

    one_box = {"train": 100.0 / len(train), "val": 100.0 / len(val)}  # float32 vs float64 at IoU 0.5
    rows = {split: {r["name"]: r for r in report["splits"][split]["rows"]} for split in ("train", "val")}
    pairs = [
        ("train", "default", theirs["initial"]),
        ("train", "pdf9", theirs["pdf9"]),
        ("train", "pdf6", theirs["pdf6"]),
        ("train", "clustered", theirs["train"]),
        ("val", "clustered", theirs["val"]),
    ]
    for split, name, their in pairs:
        row = rows[split][name]
        assert row["average_iou_shape"] == pytest.approx(their["average_iou"], abs=1e-5), (split, name)
        assert abs(row["recall_pct_shape"] - their["recall_pct"]) <= one_box[split] + 1e-9, (split, name)
