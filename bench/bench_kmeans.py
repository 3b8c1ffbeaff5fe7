"""Timing of kmeans_for_anchors.py on a synthetic COCO-size training set (no data needed).

    python bench/bench_kmeans.py                         # 860K boxes on 118K images, square 600 + keep-aspect
    python bench/bench_kmeans.py --modes square --num_boxes 100000

COCO train2017 stand-in: 118,287 images of COCO's common sizes (640 x 480, 640 x 427, 480 x 640, ...),
860,001 boxes (7.3 per image) whose sqrt(area) is log-normal (median 50 px, sigma 1.0 in log) and
aspect ratio h / w log-normal (sigma 0.6), clipped to the image and placed uniformly inside it.
It times the same functions the script runs after reading the annotation files: the rescaling
(``resize_boxes``), the clustering of each ``--methods`` entry (per-level median k-means, the
original's joint mean k-means), and the report (7 anchor sets; best IoU on the real grid, and the
original's shape measure).
Prints one JSON line: wall seconds (``*_s``) and process CPU seconds (``*_cpu_s``; with --threads 1 the
better figure on a shared machine, where wall time depends on the other jobs).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.box_sets import resize_boxes  # noqa: E402
from layers.anchor_report import cluster_and_report  # noqa: E402

# (height, width) of frequent COCO train2017 images, and how often each is drawn.
COCO_LIKE_SIZES = np.array(
    [[480, 640], [427, 640], [640, 480], [425, 640], [640, 427], [424, 640], [512, 640]]
)
COCO_LIKE_WEIGHTS = np.array([0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05])


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench kmeans_for_anchors", add_help=add_help)
    parser.add_argument("--num_images", type=int, default=118287)
    parser.add_argument("--num_boxes", type=int, default=860001)
    parser.add_argument("--modes", default="square,keep_aspect", help="resize modes to time, comma list")
    parser.add_argument(
        "--methods", default="per_level,original", help="clusterings to time (kmeans_for_anchors --method)"
    )
    parser.add_argument("--input_dim", type=int, default=600)
    parser.add_argument("--min_size", type=int, default=600)
    parser.add_argument("--max_size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine"
    )
    return parser


def synthetic_coco(num_images: int, num_boxes: int, seed: int):
    """(heights [M], widths [M], boxes xywh [G, 4], image_idxs [G]) with log-normal box shapes."""
    rng = np.random.default_rng(seed)
    sizes = COCO_LIKE_SIZES[rng.choice(len(COCO_LIKE_SIZES), size=num_images, p=COCO_LIKE_WEIGHTS)]
    heights, widths = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    image_idxs = rng.integers(0, num_images, size=num_boxes)
    side = np.exp(rng.normal(np.log(50.0), 1.0, num_boxes))
    ratio = np.exp(rng.normal(0.0, 0.6, num_boxes))  # h / w
    w = np.clip(side / np.sqrt(ratio), 1.0, widths[image_idxs])
    h = np.clip(side * np.sqrt(ratio), 1.0, heights[image_idxs])
    x = rng.uniform(0.0, 1.0, num_boxes) * (widths[image_idxs] - w)
    y = rng.uniform(0.0, 1.0, num_boxes) * (heights[image_idxs] - h)
    return heights, widths, np.stack([x, y, w, h], axis=1), image_idxs


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    heights, widths, xywh, image_idxs = synthetic_coco(args.num_images, args.num_boxes, args.seed)
    flags = np.zeros(len(xywh), dtype=bool)
    result = {
        "bench": "kmeans_for_anchors",
        "num_images": args.num_images,
        "num_boxes": args.num_boxes,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for mode in [m for m in args.modes.split(",") if m]:
        t0 = time.perf_counter()
        box_set = resize_boxes(
            heights,
            widths,
            xywh,
            image_idxs,
            flags,
            flags,
            mode,
            args.input_dim,
            args.min_size,
            args.max_size,
        )
        resize_s = time.perf_counter() - t0
        side = args.min_size if mode == "keep_aspect" else args.input_dim
        for method in [m for m in args.methods.split(",") if m]:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                report = cluster_and_report(
                    box_set, None, out=os.path.join(tmp, "anchors.json"), method=method, input_side=side
                )
                total_s = time.perf_counter() - t0
            rows = report["splits"]["train"]["rows"]
            result[f"{mode}_{method}"] = {
                "num_input_sizes": len(box_set["input_sizes"]),
                "resize_s": round(resize_s, 3),
                "kmeans_s": round(report["clustering"]["seconds"], 3),
                "kmeans_cpu_s": round(report["clustering"]["cpu_seconds"], 3),
                "kmeans_iters_per_level": [s["num_iters"] for s in report["clustering"]["levels"]],
                "report_s": round(report["report_seconds"], 3),
                "report_cpu_s": round(report["report_cpu_seconds"], 3),
                "total_s": round(resize_s + total_s, 3),
                # grid measure (ours) and shape measure (the original's table), per anchor set
                "recall_pct": {r["name"]: round(r["recall_pct"], 2) for r in rows},
                "recall_pct_shape": {r["name"]: round(r["recall_pct_shape"], 2) for r in rows},
            }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
