"""Generate "shapes", the synthetic detection set the project ships as its default dataset.

    python prep/shapes.py                                   # datasets/shapes, seed 0, 1000 + 200 images
    python prep/shapes.py --seed 1 --num_train 5000         # another draw, a larger training set
    python prep/shapes.py --samples_dir demo_data/samples   # only 4 sample images for demo.py

Output, in the common format (see data/annotations.py):

    <data_root>/<dataset>/images/{train,val}/NNNNNN.png
    <data_root>/<dataset>/annotations/{train,val}.json   categories circle (id 1), square (2), triangle (3)

What an image holds (background, clutter, 1-6 circles / squares / triangles, noise) and the rules for
overlaps and contrast: prep/shapes_render.py, which draws the images.

Determinism: image i of split s is drawn from ``np.random.default_rng([seed, s, i])`` and written as
PNG (lossless), so the same seed and options give byte-identical images and annotation files.
Image ids: train 1_000_000 + i, val 2_000_000 + i (unique across splits, so the splits can be
merged); annotation id = image id * 100 + k for the image's k-th object (k = 1..99).
Annotation ``area`` is the box area w * h (what COCO's size ranges see for detections too).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

# `python prep/shapes.py` puts prep/ on sys.path, not the repo root that holds the data package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.annotations import save_annotations  # noqa: E402
from prep.shapes_render import CLASSES, SPLITS, ShapesConfig, image_rng, render_image  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger(__name__)

IMAGE_ID_OFFSET = 1_000_000


def _write_png(path: str, image_rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f"{path}: OpenCV could not encode the image as PNG")
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(encoded.tobytes())
    os.replace(tmp_path, path)


def _render_and_write(
    task: Tuple[str, str, int, int, ShapesConfig],
) -> Tuple[List[int], List[List[float]], int, int]:
    """Worker: draw image ``index`` of ``split``, write its PNG; return (labels, boxes xyxy, rejected,
    low_contrast) as in ``render_image``."""
    dataset_root, split, index, seed, cfg = task
    image, labels, boxes, debug = render_image(image_rng(seed, split, index), cfg)
    _write_png(os.path.join(dataset_root, "images", split, f"{index:06d}.png"), image)
    return labels.tolist(), boxes.tolist(), debug["rejected"], debug["low_contrast"]


def generate_split(
    dataset_root: str, split: str, num_images: int, seed: int, cfg: ShapesConfig, num_workers: int = 0
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Write ``images/<split>/*.png`` and ``annotations/<split>.json`` under ``dataset_root``.

    ``num_workers`` > 0 draws images in that many processes; the output does not depend on it.
    Returns (the annotation dict, its statistics).
    """
    image_dir = os.path.join(dataset_root, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    # Files left by an earlier, larger run would sit unannotated next to this one's: remove them.
    ours = {f"{i:06d}.png" for i in range(num_images)}
    stale = [f for f in os.listdir(image_dir) if re.fullmatch(r"\d{6}\.png", f) and f not in ours]
    for f in stale:
        os.remove(os.path.join(image_dir, f))
    if stale:
        logger.info("removed %d stale image(s) from %s", len(stale), image_dir)
    tasks = [(dataset_root, split, i, seed, cfg) for i in range(num_images)]
    if num_workers > 0 and num_images > 1:
        with multiprocessing.Pool(num_workers) as pool:
            results = pool.map(
                _render_and_write, tasks, chunksize=max(1, min(32, num_images // (4 * num_workers)))
            )
    else:
        results = [_render_and_write(task) for task in tasks]
    images, annotations = [], []
    for i, (labels, boxes, _, _) in enumerate(results):
        image_id = SPLITS[split] * IMAGE_ID_OFFSET + i
        file_name = f"images/{split}/{i:06d}.png"
        images.append(
            {"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size}
        )
        for k, (label, (x1, y1, x2, y2)) in enumerate(zip(labels, boxes), start=1):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": image_id * 100 + k,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "difficult": 0,
                }
            )
    coco = {
        "info": {
            "description": "synthetic shapes (prep/shapes.py)",
            "seed": seed,
            "split": split,
            **vars(cfg),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(CLASSES)],
    }
    save_annotations(coco, os.path.join(dataset_root, "annotations", f"{split}.json"))
    stats = split_statistics(coco)
    stats["rejected_shapes"] = sum(r[2] for r in results)
    stats["low_contrast_shapes"] = sum(r[3] for r in results)
    return coco, stats


def split_statistics(coco: Dict[str, Any]) -> Dict[str, Any]:
    """Images, boxes per class, boxes per image (min/mean/max), box side ranges [min, max] of one split."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    category_ids = np.array([a["category_id"] for a in coco["annotations"]], np.int64)
    bboxes = np.array([a["bbox"] for a in coco["annotations"]], np.float64).reshape(-1, 4)
    image_index = {im["id"]: i for i, im in enumerate(coco["images"])}
    per_image = np.bincount(
        np.array([image_index[a["image_id"]] for a in coco["annotations"]], np.int64),
        minlength=len(image_index),
    )
    w, h = bboxes[:, 2], bboxes[:, 3]

    def value_range(x: np.ndarray) -> List[float]:
        return [float(x.min()), float(x.max())] if len(x) else [0.0, 0.0]

    return {
        "images": len(coco["images"]),
        "boxes": len(bboxes),
        "boxes_per_class": {names[c]: int((category_ids == c).sum()) for c in names},
        "boxes_per_image": {
            "min": int(value_range(per_image)[0]),
            "mean": float(per_image.mean()) if len(per_image) else 0.0,
            "max": int(value_range(per_image)[1]),
        },
        "box_width": value_range(w),
        "box_height": value_range(h),
        "box_sqrt_area": value_range(np.sqrt(w * h)),
    }


def write_samples(out_dir: str, num: int = 4, seed: int = 0, cfg: ShapesConfig | None = None) -> List[str]:
    """Write ``num`` images from the "samples" stream (not in train or val) as ``shapes_NN.png``."""
    cfg = cfg or ShapesConfig()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(num):
        image, _, _, _ = render_image(image_rng(seed, "samples", i), cfg)
        paths.append(os.path.join(out_dir, f"shapes_{i:02d}.png"))
        _write_png(paths[-1], image)
    return paths


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Generate the synthetic shapes detection set", add_help=add_help)
    parser.add_argument("--data_root", default="datasets", help="output goes to <data_root>/<dataset>/")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--seed", default=0, type=int, help="same seed + options = byte-identical output")
    parser.add_argument("--num_train", default=1000, type=int)
    parser.add_argument("--num_val", default=200, type=int)
    parser.add_argument(
        "-j",
        "--num_workers",
        default=min(os.cpu_count() or 1, 8),
        type=int,
        help="processes drawing images (0: none); the output does not depend on it",
    )
    # * Image content (see the module docstring)
    parser.add_argument("--image_size", default=256, type=int, help="square images, pixels")
    parser.add_argument("--min_size", default=12.0, type=float, help="smallest object, longer box side (px)")
    parser.add_argument(
        "--max_size",
        default=None,
        type=float,
        help="largest object, longer box side (px); default 0.75 * image_size",
    )
    parser.add_argument("--max_aspect", default=2.0, type=float, help="box aspect ratio w/h in [1/A, A]")
    parser.add_argument("--min_shapes", default=1, type=int, help="fewest objects per image")
    parser.add_argument("--max_shapes", default=6, type=int, help="most objects per image")
    parser.add_argument(
        "--min_visible",
        default=0.6,
        type=float,
        help="an earlier object keeps at least this fraction of its pixels visible",
    )
    parser.add_argument(
        "--noise", default=6.0, type=float, help="largest per-pixel noise sigma (0-255 scale)"
    )
    # * Samples for demo.py
    parser.add_argument(
        "--samples_dir",
        default=None,
        help="write only --num_samples sample images (shapes_NN.png) here, not the dataset",
    )
    parser.add_argument("--num_samples", default=4, type=int)
    return parser


def config_from_args(args: argparse.Namespace) -> ShapesConfig:
    cfg = ShapesConfig(
        image_size=args.image_size,
        min_size=args.min_size,
        max_size=args.max_size if args.max_size is not None else 0.75 * args.image_size,
        max_aspect=args.max_aspect,
        min_shapes=args.min_shapes,
        max_shapes=args.max_shapes,
        min_visible=args.min_visible,
        noise=args.noise,
    )
    cfg.check()
    return cfg


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Generate the set (or the samples) and return its statistics ({"splits": {split: stats}, ...})."""
    cfg = config_from_args(args)
    start = time.perf_counter()
    if args.samples_dir:
        paths = write_samples(args.samples_dir, args.num_samples, args.seed, cfg)
        print(f"wrote {len(paths)} sample images to {args.samples_dir}")
        return {"samples": paths, "seconds": time.perf_counter() - start}
    dataset_root = os.path.join(args.data_root, args.dataset)
    stats: Dict[str, Any] = {"dataset_root": dataset_root, "splits": {}}
    for split, num in (("train", args.num_train), ("val", args.num_val)):
        if num < 0:
            raise UserError(f"--num_{split} must be >= 0, got {num}")
        _, stats["splits"][split] = generate_split(dataset_root, split, num, args.seed, cfg, args.num_workers)
    stats["seconds"] = time.perf_counter() - start
    print(f"shapes dataset in {dataset_root} (seed {args.seed}, {stats['seconds']:.1f} s)")
    for split, s in stats["splits"].items():
        per_class = ", ".join(f"{name} {n}" for name, n in s["boxes_per_class"].items())
        bpi = s["boxes_per_image"]
        print(
            f"  {split:5s}: {s['images']} images, {s['boxes']} boxes ({per_class}); boxes/image "
            f"min {bpi['min']} mean {bpi['mean']:.2f} max {bpi['max']}; box w {s['box_width'][0]:.0f}-"
            f"{s['box_width'][1]:.0f}, h {s['box_height'][0]:.0f}-{s['box_height'][1]:.0f}, sqrt(area) "
            f"{s['box_sqrt_area'][0]:.1f}-{s['box_sqrt_area'][1]:.1f} px; "
            f"{s['rejected_shapes']} shape(s) left out (no placement kept earlier ones visible), "
            f"{s['low_contrast_shapes']} drawn with low contrast"
        )
    return stats


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(main, get_args_parser(add_help=True))
