"""Which ground-truth boxes a detector misses, by object size: the small-object study of issue 17.

    python bench/misses_by_size.py --annotations datasets/shapes/annotations/val.json \
        --results runs/demo/results_model_000800.json                 # score >= 0.5, IoU >= 0.5

A gt box counts as found when a detection of its class with score >= --score overlaps it with IoU >=
--iou; each detection finds at most one box (the highest-scoring detections claim first, each its
best-overlapping unclaimed box, as VOC's matching does). Crowd boxes are left out. Sizes are the
longer side of the box in pixels of the annotation file (the val images' own size), binned at
--edges. Prints a table and one JSON line last: per bin the gt count, the misses and the recall, and
the false positives (detections at --score that found no box).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import UserError, run_cli  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("misses_by_size", add_help=add_help)
    parser.add_argument("--annotations", required=True, help="the split's annotation JSON (common format)")
    parser.add_argument("--results", required=True, help="COCO results JSON written by evaluate.py")
    parser.add_argument("--score", type=float, default=0.5, help="detections at or above this score count")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU a detection needs to find a gt box")
    parser.add_argument(
        "--edges",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[22.0, 48.0, 96.0],
        help="bin edges of the longer box side in pixels (a box of exactly an edge goes below it)",
    )
    return parser


def _xywh_to_xyxy(boxes: List[Sequence[float]]) -> torch.Tensor:
    """[M, 4] xywh lists -> [M, 4] float64 xyxy."""
    return box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")


def found_mask(gt_xyxy: torch.Tensor, det_xyxy: torch.Tensor, det_scores: torch.Tensor, iou: float):
    """Greedy matching of one image and class.

    gt_xyxy [G, 4], det_xyxy [D, 4], det_scores [D] -> (found [G] bool, det_hit [D] bool).
    """
    found = torch.zeros(len(gt_xyxy), dtype=torch.bool)
    hit = torch.zeros(len(det_xyxy), dtype=torch.bool)
    if len(gt_xyxy) == 0 or len(det_xyxy) == 0:
        return found, hit
    ious = box_iou(det_xyxy, gt_xyxy)  # [D, G]
    for d in torch.argsort(det_scores, descending=True, stable=True).tolist():
        # Claimed boxes are out of reach; the detection takes its best remaining box (VOC's rule).
        candidates = ious[d].masked_fill(found, -1.0)
        g = int(candidates.argmax())
        if candidates[g] >= iou:
            found[g] = True
            hit[d] = True
    return found, hit


def misses_by_size(
    coco: Dict[str, Any], results: List[Dict[str, Any]], score: float, iou: float, edges: Sequence[float]
) -> Dict[str, Any]:
    """Per size bin: {"bins": [{"range", "gt", "missed", "recall"}], "false_positives": int}."""
    gts: Dict[tuple, List[List[float]]] = defaultdict(list)
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            gts[(ann["image_id"], ann["category_id"])].append(ann["bbox"])
    dets: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for det in results:
        if det["score"] >= score:
            dets[(det["image_id"], det["category_id"])].append(det)
    longer_sides, found_all, false_positives = [], [], 0
    for key in set(gts) | set(dets):
        gt_xyxy = _xywh_to_xyxy(gts.get(key, []))
        key_dets = dets.get(key, [])
        det_xyxy = _xywh_to_xyxy([d["bbox"] for d in key_dets])
        det_scores = torch.tensor([d["score"] for d in key_dets], dtype=torch.float64)
        found, hit = found_mask(gt_xyxy, det_xyxy, det_scores, iou)
        longer_sides.append((gt_xyxy[:, 2:] - gt_xyxy[:, :2]).amax(dim=1))
        found_all.append(found)
        false_positives += int((~hit).sum())
    sides = torch.cat(longer_sides).numpy() if longer_sides else np.zeros(0)
    found = torch.cat(found_all).numpy() if found_all else np.zeros(0, dtype=bool)
    bin_ids = np.searchsorted(np.asarray(edges), sides, side="left")
    bounds = [0.0, *edges, float("inf")]
    bins = []
    for b in range(len(edges) + 1):
        in_bin = bin_ids == b
        n, missed = int(in_bin.sum()), int((in_bin & ~found).sum())
        bins.append(
            {
                "range": [bounds[b], bounds[b + 1]],
                "gt": n,
                "missed": missed,
                "recall": (n - missed) / n if n else None,
            }
        )
    return {
        "bins": bins,
        "missed": int((~found).sum()),
        "gt": int(len(found)),
        "false_positives": false_positives,
    }


def main(args: argparse.Namespace) -> Dict[str, Any]:
    for path in (args.annotations, args.results):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
    with open(args.annotations) as f:
        coco = json.load(f)
    with open(args.results) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise UserError(
            f"--results {args.results}: expected a COCO results list, got {type(results).__name__}"
        )
    report = misses_by_size(coco, results, args.score, args.iou, args.edges)
    print(f"gt boxes found by a detection with score >= {args.score} at IoU >= {args.iou}")
    print(f"{'longer side (px)':>18} {'gt':>6} {'missed':>7} {'recall':>7}")
    for b in report["bins"]:
        lo, hi = b["range"]
        recall = "-" if b["recall"] is None else f"{b['recall']:.3f}"
        print(f"{f'({lo:g}, {hi:g}]':>18} {b['gt']:>6} {b['missed']:>7} {recall:>7}")
    print(f"missed {report['missed']} of {report['gt']}; false positives {report['false_positives']}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    parser = get_args_parser()
    run_cli(main, parser)
