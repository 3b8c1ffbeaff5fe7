"""Detect objects in images and draw the results.

    python demo.py --checkpoint runs/RUN/model_050000.pth   # demo_data/samples/ -> demo_data/outputs/
    python demo.py --checkpoint CKPT --images photo.jpg more_photos/ --save_path out/ --class_agnostic_nms

As in the original demo, detections are kept above a final score of --score_thresh (0.5); NMS is
class-aware unless --class_agnostic_nms. Next to each drawn image a JSON file lists its detections.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Sequence

import cv2
import numpy as np

from data.image_io import read_image
from data.image_list import ImageListDataset, find_images
from data.loaders import build_eval_loader
from data.transforms import build_transforms
from engine import predict
from utils.checkpoint import build_model_from_checkpoint
from utils.errors import run_cli
from utils.logger import setup_logging
from utils.options import (
    TRAINING_GROUPS,
    TRAINING_OPTIONS,
    OptionParser,
    amp_dtype_of,
    check_common_args,
    get_common_parser,
    resolve_defaults,
    resolve_device,
)

logger = logging.getLogger("demo")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = OptionParser(
        description=__doc__,
        add_help=add_help,
        parents=[get_common_parser()],
        hidden_groups=TRAINING_GROUPS,
        hidden_options=TRAINING_OPTIONS,
    )
    g = parser.add_argument_group("demo (the original's names are aliases)")
    g.add_argument("--checkpoint", "--model_path", required=True, help="a checkpoint written by train.py")
    g.add_argument(
        "--images",
        "--samples_path",
        nargs="+",
        default=["demo_data/samples"],
        help="image files or folders",
    )
    g.add_argument(
        "--save_path",
        "--outputs_path",
        "--out",
        "--output",
        default="demo_data/outputs",
        help="where annotated images are written",
    )
    g.add_argument(
        "--score_thresh",
        "--final_thresh",
        type=float,
        default=0.5,
        help="final score threshold for drawing",
    )
    return parser


def class_colour(label: int) -> tuple:
    """A stable, well-separated BGR colour per class (golden-ratio hue steps)."""
    hue = int((label * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 220, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw_detections(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
) -> np.ndarray:
    """Draw boxes (xyxy, image pixels) with "name score" captions; returns a BGR image for cv2.imwrite."""
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for box, score, label in zip(boxes, scores, labels):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        colour = class_colour(int(label))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        caption = f"{class_names[int(label)]} {score:.2f}"
        (tw, th), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = max(y1, th + baseline)
        # Keep the caption inside the image: boxes at the right edge get it shifted left.
        tx = max(0, min(x1, canvas.shape[1] - tw))
        cv2.rectangle(canvas, (tx, ty - th - baseline), (tx + tw, ty), colour, -1)
        cv2.putText(
            canvas, caption, (tx, ty - baseline), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    setup_logging()
    resolve_defaults(args)
    check_common_args(args)
    if not 0 <= args.score_thresh <= 1:
        raise SystemExit(f"--score_thresh must be in [0, 1], got {args.score_thresh}")
    device = resolve_device(args.device)
    model, postprocessor, run_args, _ = build_model_from_checkpoint(
        args.checkpoint, args, get_args_parser(), device
    )
    files = find_images(args.images)
    if not files:
        raise SystemExit(f"no images found in {args.images}")
    transforms = build_transforms(
        False, run_args.resize_mode, run_args.input_dim, run_args.min_size, run_args.max_size
    )
    loader = build_eval_loader(
        ImageListDataset(files, transforms),
        run_args.eval_batch_size,
        run_args.num_workers,
        size_divisibility=32 if run_args.resize_mode == "keep_aspect" else 1,
    )
    os.makedirs(args.save_path, exist_ok=True)
    written = []
    amp_dtype = amp_dtype_of(args, device.type)
    for targets, detections, _ in predict(model, postprocessor, loader, device, amp_dtype):
        for target, det in zip(targets, detections):
            keep = det["scores"] >= args.score_thresh
            boxes, scores, labels = (
                det["boxes"][keep].numpy(),
                det["scores"][keep].numpy(),
                det["labels"][keep].numpy(),
            )
            path = target["file_name"]
            stem = os.path.splitext(os.path.basename(path))[0]
            out_path = os.path.join(args.save_path, f"{stem}_det.jpg")
            cv2.imwrite(
                out_path, draw_detections(read_image(path), boxes, scores, labels, run_args.class_names)
            )
            record = {
                "image": path,
                "output": out_path,
                "detections": [
                    {
                        "class": run_args.class_names[int(lab)],
                        "score": round(float(s), 4),
                        "box_xyxy": [round(float(v), 1) for v in b],
                    }
                    for b, s, lab in zip(boxes, scores, labels)
                ],
            }
            with open(os.path.join(args.save_path, f"{stem}_det.json"), "w") as f:
                json.dump(record, f, indent=1)
            logger.info("%s: %d detections -> %s", path, len(boxes), out_path)
            written.append(record)
    return written


if __name__ == "__main__":
    run_cli(main, get_args_parser())
