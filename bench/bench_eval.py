"""Timing of the evaluators at full dataset sizes, on synthetic detections (no data needed).

    python bench/bench_eval.py            # VOC07 test, COCO val2017 and Open Images validation sizes
    python bench/bench_eval.py --small    # a quick run of the same code (the unit test uses it)

Cases (sizes of the real sets; boxes log-normal in size, detections are jittered copies of the ground
truth, copies in a wrong class and random boxes, scores higher for the good copies):

- voc: 4,952 images, 20 classes, 2.4 boxes per image (VOC07 test has 12,032 objects), 10 % difficult,
  100 detections per image -> ``metrics.voc.evaluate_voc`` (both AP definitions).
- coco: 5,000 images, 80 classes, 7.3 boxes per image (val2017: 36,781), 1 % crowd, 100 detections per
  image. The ground truth and the results are written to JSON files once, and each backend of
  ``metrics.coco.evaluate_coco`` (pycocotools, the reference, and faster-coco-eval) scores the same
  two files, reading included. Our VOC evaluator also scores that case (``voc_on_coco_s``).
- oid: 40,000 images, 500 classes in a 3-level hierarchy (the official nested JSON format), 7.3 boxes
  per image of leaf and inner classes, 10 % group-of, verified present / absent image labels, 50
  detections per image -> ``metrics.oid.metric.evaluate_oid`` with the hierarchy (expansion included).

Prints one JSON line last: seconds per evaluator (``*_s``), the mAPs (so a speed-up that changed a
number shows), and ``ratio_coco_fast_vs_pycocotools`` = faster-coco-eval seconds / pycocotools seconds
on the same files (target <= 0.33).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics.coco import COCO_STAT_NAMES, evaluate_coco  # noqa: E402
from metrics.oid.metric import evaluate_oid  # noqa: E402
from metrics.voc import evaluate_voc  # noqa: E402
from utils.errors import run_cli  # noqa: E402

FULL = {
    "voc": {"num_images": 4952, "num_classes": 20, "gt_per_image": 2.4, "dets_per_image": 100},
    "coco": {"num_images": 5000, "num_classes": 80, "gt_per_image": 7.3, "dets_per_image": 100},
    "oid": {"num_images": 40000, "num_classes": 500, "gt_per_image": 7.3, "dets_per_image": 50},
}
SMALL = {
    "voc": {"num_images": 200, "num_classes": 20, "gt_per_image": 2.4, "dets_per_image": 30},
    "coco": {"num_images": 100, "num_classes": 80, "gt_per_image": 7.3, "dets_per_image": 30},
    "oid": {"num_images": 300, "num_classes": 60, "gt_per_image": 7.3, "dets_per_image": 20},
}


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench evaluators", add_help=add_help)
    parser.add_argument("--small", action="store_true", help="small sizes, for a quick check of the script")
    parser.add_argument("--cases", default="voc,coco,oid", help="comma list of voc, coco, oid")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def random_boxes(rng: np.random.Generator, n: int, width: float, height: float) -> np.ndarray:
    """n boxes xywh (float64[n, 4], abs px) inside a width x height image, sqrt(area) log-normal."""
    side = np.exp(rng.normal(np.log(0.15 * min(width, height)), 0.8, n))
    ratio = np.exp(rng.normal(0.0, 0.5, n))  # h / w
    w = np.clip(side / np.sqrt(ratio), 2.0, width)
    h = np.clip(side * np.sqrt(ratio), 2.0, height)
    x = rng.uniform(0, 1, n) * (width - w)
    y = rng.uniform(0, 1, n) * (height - h)
    return np.stack([x, y, w, h], axis=1)


def synthetic_case(
    rng: np.random.Generator,
    num_images: int,
    num_classes: int,
    gt_per_image: float,
    dets_per_image: int,
    difficult_frac: float = 0.0,
    crowd_frac: float = 0.0,
    class_weights: np.ndarray | None = None,
) -> tuple[dict, list[dict]]:
    """A common-format ground truth (500 x 375 images) and COCO results for it.

    Detections per image: one jittered copy of each box per 3 detections drawn for it (IoU mostly
    above 0.5), a few copies labelled with a wrong class, the rest random boxes of the image's classes.
    """
    width, height = 500.0, 375.0
    num_gt = rng.poisson(gt_per_image, num_images).clip(1, None)
    img_of_gt = np.repeat(np.arange(num_images), num_gt)
    g = len(img_of_gt)
    p = None if class_weights is None else class_weights / class_weights.sum()
    cls_of_gt = rng.choice(num_classes, size=g, p=p)
    gt_boxes = random_boxes(rng, g, width, height)
    difficult = rng.random(g) < difficult_frac
    crowd = rng.random(g) < crowd_frac

    # Detections: jittered copies of the gt (a third of the budget), then random boxes.
    num_copies = min(dets_per_image // 3, 1_000_000)
    src = rng.integers(0, g, size=num_images * num_copies)
    src = src[np.argsort(img_of_gt[src], kind="stable")]
    copy_boxes = gt_boxes[src] * np.exp(rng.normal(0, 0.08, (len(src), 4))) * [1, 1, 1, 1]
    copy_boxes[:, :2] = gt_boxes[src, :2] + rng.normal(0, 0.08, (len(src), 2)) * gt_boxes[src, 2:]
    copy_cls = np.where(rng.random(len(src)) < 0.1, rng.integers(0, num_classes, len(src)), cls_of_gt[src])
    copy_img = img_of_gt[src]
    copy_score = rng.beta(4, 2, len(src))
    num_rand = num_images * dets_per_image - len(src)
    rand_img = rng.integers(0, num_images, num_rand)
    rand_boxes = random_boxes(rng, num_rand, width, height)
    rand_cls = rng.choice(num_classes, size=num_rand, p=p)
    rand_score = rng.beta(1.5, 6, num_rand)

    det_img = np.concatenate([copy_img, rand_img])
    det_cls = np.concatenate([copy_cls, rand_cls])
    det_boxes = np.concatenate([copy_boxes, rand_boxes]).round(2)
    det_score = np.concatenate([copy_score, rand_score]).round(5)

    images = [
        {"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": int(width), "height": int(height)}
        for i in range(num_images)
    ]
    areas = gt_boxes[:, 2] * gt_boxes[:, 3]
    annotations = [
        {
            "id": k + 1,
            "image_id": i + 1,
            "category_id": c + 1,
            "bbox": b,
            "area": a,
            "iscrowd": int(cr),
            "difficult": int(d),
        }
        for k, (i, c, b, a, cr, d) in enumerate(
            zip(
                img_of_gt.tolist(),
                cls_of_gt.tolist(),
                gt_boxes.round(2).tolist(),
                areas.tolist(),
                crowd.tolist(),
                difficult.tolist(),
            )
        )
    ]
    categories = [{"id": c + 1, "name": f"class_{c + 1}"} for c in range(num_classes)]
    detections = [
        {"image_id": i + 1, "category_id": c + 1, "bbox": b, "score": s}
        for i, c, b, s in zip(det_img.tolist(), det_cls.tolist(), det_boxes.tolist(), det_score.tolist())
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def synthetic_hierarchy(rng: np.random.Generator, num_classes: int) -> tuple[dict, list[int]]:
    """A 3-level tree over MIDs /m/c1.. in the official nested format, and each class's depth.

    A tenth of the classes are top level, a fifth their children, the rest leaves under those.
    """
    top = max(num_classes // 10, 1)
    mid_level = max(num_classes // 5, 1)
    parent = np.full(num_classes, -1)
    parent[top : top + mid_level] = rng.integers(0, top, mid_level)
    parent[top + mid_level :] = rng.integers(top, top + mid_level, num_classes - top - mid_level)
    children: dict[int, list[int]] = {}
    for c, p in enumerate(parent.tolist()):
        children.setdefault(p, []).append(c)

    def node(c: int) -> dict:
        out: dict[str, Any] = {"LabelName": f"/m/c{c + 1}"}
        if c in children:
            out["Subcategory"] = [node(k) for k in children[c]]
        return out

    tree = {"LabelName": "/m/0bl9f", "Subcategory": [node(c) for c in children[-1]]}
    depth = np.where(parent < 0, 0, np.where(parent < top, 1, 2))
    return tree, depth.tolist()


def synthetic_oid(
    rng: np.random.Generator, num_images: int, num_classes: int, gt_per_image: float, dets_per_image: int
) -> tuple[dict, list[dict], dict]:
    """An Open Images-like ground truth (group-of boxes, verified labels, MIDs), detections, hierarchy."""
    tree, depth = synthetic_hierarchy(rng, num_classes)
    # Boxes mostly on leaves, as in Open Images (parents get theirs through the expansion).
    weights = np.where(np.asarray(depth) == 2, 1.0, 0.2)
    gt, dets = synthetic_case(
        rng, num_images, num_classes, gt_per_image, dets_per_image, crowd_frac=0.1, class_weights=weights
    )
    for c in gt["categories"]:
        c["mid"] = f"/m/c{c['id']}"
    classes_of_image: dict[int, set] = {}
    for a in gt["annotations"]:
        classes_of_image.setdefault(a["image_id"], set()).add(a["category_id"])
    extra_present = rng.integers(1, num_classes + 1, (num_images, 2)).tolist()
    absent = rng.integers(1, num_classes + 1, (num_images, 4)).tolist()
    for img, more, neg in zip(gt["images"], extra_present, absent):
        present = classes_of_image.get(img["id"], set()) | set(more)
        img["verified_present"] = sorted(present)
        img["verified_absent"] = sorted(set(neg) - present)
    return gt, dets, tree


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    sizes = SMALL if args.small else FULL
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(FULL))
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {sorted(FULL)}")
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {"small": bool(args.small), "python": platform.python_version()}
    if "voc" in cases:
        gt, dets = synthetic_case(rng, **sizes["voc"], difficult_frac=0.1)
        res, out["voc_s"] = timed(evaluate_voc, gt, dets)
        out["voc_num_detections"] = len(dets)
        out["voc_map_area"] = res["map_area"]
        print(f"voc: {len(dets)} detections, {out['voc_s']:.2f} s", flush=True)
    if "coco" in cases:
        gt, dets = synthetic_case(rng, **sizes["coco"], crowd_frac=0.01)
        with tempfile.TemporaryDirectory() as tmp:
            gt_path, det_path = os.path.join(tmp, "gt.json"), os.path.join(tmp, "dets.json")
            with open(gt_path, "w") as f:
                json.dump(gt, f)
            with open(det_path, "w") as f:
                json.dump(dets, f)
            del gt, dets
            ref, out["coco_pycocotools_s"] = timed(evaluate_coco, gt_path, det_path, backend="pycocotools")
            print(f"coco pycocotools: {out['coco_pycocotools_s']:.2f} s", flush=True)
            fast, out["coco_faster_s"] = timed(evaluate_coco, gt_path, det_path, backend="faster")
            print(f"coco faster-coco-eval: {out['coco_faster_s']:.2f} s", flush=True)
            with open(gt_path) as f:
                gt = json.load(f)
            with open(det_path) as f:
                dets = json.load(f)
            voc, out["voc_on_coco_s"] = timed(evaluate_voc, gt, dets)
        out["coco_num_detections"] = len(dets)
        out["coco_AP_pycocotools"] = ref["AP"]
        out["coco_AP_faster"] = fast["AP"]
        # Summation order differs in C++: equal to about 1e-16, not bit for bit.
        out["coco_12_max_abs_diff"] = max(abs(ref[k] - fast[k]) for k in COCO_STAT_NAMES)
        out["voc_on_coco_map_area"] = voc["map_area"]
        out["ratio_coco_fast_vs_pycocotools"] = out["coco_faster_s"] / out["coco_pycocotools_s"]
        out["ratio_voc_vs_pycocotools"] = out["voc_on_coco_s"] / out["coco_pycocotools_s"]
    if "oid" in cases:
        gt, dets, tree = synthetic_oid(rng, **sizes["oid"])
        res, out["oid_s"] = timed(evaluate_oid, gt, dets, hierarchy=tree)
        out["oid_num_detections"] = len(dets)
        out["oid_map"] = res["map"]
        print(f"oid: {len(dets)} detections, {out['oid_s']:.2f} s", flush=True)
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser(add_help=True))
