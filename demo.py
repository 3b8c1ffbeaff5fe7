"""Detect objects in images and draw the results.

    python demo.py --checkpoint runs/RUN/model_050000.pth   # demo_data/samples/ -> demo_data/outputs/
    python demo.py --checkpoint CKPT --images photo.jpg more_photos/ --save_path out/ --class_agnostic_nms

As in the original demo, detections are kept above a final score of --score_thresh (0.5); NMS is
class-aware unless --class_agnostic_nms. The model runs through ``engine.Detector`` (the checkpoint's
resize and ``--amp``). Outputs keep each input's path relative to the folder holding all inputs and its
format (``val/x.png`` -> ``<save_path>/val/x_det.png``), plus ``x_det.json`` listing the detections;
names that still collide (``x.png``, ``x.jpg``) keep the extension (``x_png_det.png``). Drawing: see
utils/draw.py (sizes scale with the image, best score on top, fonts with the class names' glyphs).
With --skip_bad_images an unreadable image is skipped and counted instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List

import cv2

from data.image_io import read_image
from data.image_list import ImageListDataset, find_images
from data.loaders import build_eval_loader, loader_options
from engine import Detector
from utils.draw import draw_detections
from utils.errors import UserError, run_cli
from utils.logger import setup_logging
from utils.options import (
    check_common_args,
    get_checkpoint_script_parser,
    resolve_defaults,
)
from utils.output_paths import output_stems, unique_files

logger = logging.getLogger("demo")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser, g = get_checkpoint_script_parser(__doc__, "demo (the original's names are aliases)", add_help)
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


def counting_skips(batches: Iterable, skipped: List[str]) -> Iterator:
    """Pass the loader's batches through, collecting the names of the skipped (unreadable) images."""
    for images, targets, batch_skipped in batches:
        skipped.extend(batch_skipped)
        yield images, targets, batch_skipped


def check_skipped(skipped: List[str], allowed: bool) -> None:
    if skipped and not allowed:
        raise UserError(
            f"cannot read image {skipped[0]!r} (pass --skip_bad_images to skip and count unreadable images)"
        )


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    setup_logging()
    resolve_defaults(args)
    check_common_args(args)
    if not 0 <= args.score_thresh <= 1:
        raise SystemExit(f"--score_thresh must be in [0, 1], got {args.score_thresh}")
    files, _ = unique_files(find_images(args.images))
    if not files:
        raise UserError(f"no images found in {args.images}")
    stems = output_stems(files)
    detector = Detector.from_checkpoint(args.checkpoint, args.device, cli_args=args, parser=get_args_parser())
    # The dataset always skips unreadable files, so that a worker process hands back the file's name;
    # without --skip_bad_images the first one stops the run with that name.
    loader = build_eval_loader(
        ImageListDataset(files, detector.transforms, skip_bad_images=True),
        detector.batch_size,
        detector.args.num_workers,
        size_divisibility=detector.collate.size_divisibility,
        **loader_options(detector.args, detector.device),
    )
    written: List[Dict[str, Any]] = []
    skipped: List[str] = []
    for targets, detections, _ in detector.predict_batches(counting_skips(loader, skipped)):
        check_skipped(skipped, args.skip_bad_images)
        for target, detection in zip(targets, detections):
            index, path = int(target["image_id"]), target["file_name"]
            result = detector.format(detection, args.score_thresh)
            boxes, scores, labels = (result[k].numpy() for k in ("boxes", "scores", "labels"))
            # The drawing keeps the input's format: png stays png, jpg stays jpg.
            out_path = os.path.join(args.save_path, stems[index] + "_det" + os.path.splitext(path)[1])
            os.makedirs(os.path.dirname(out_path), exist_ok=True)
            drawn = draw_detections(read_image(path), boxes, scores, labels, detector.class_names)
            if not cv2.imwrite(out_path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
                raise UserError(f"could not write {out_path!r}")
            record = {
                "image": path,
                "output": out_path,
                "detections": [
                    {"class": name, "score": round(float(s), 4), "box_xyxy": [round(float(v), 1) for v in b]}
                    for b, s, name in zip(boxes, scores, result["label_names"])
                ],
            }
            with open(os.path.join(args.save_path, stems[index] + "_det.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, ensure_ascii=False)
            logger.info("%s: %d detections -> %s", path, len(boxes), out_path)
            written.append(record)
    check_skipped(skipped, args.skip_bad_images)
    if skipped:
        logger.warning(
            "%d of %d images were unreadable and skipped (--skip_bad_images): %s",
            len(skipped),
            len(files),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    logger.info("wrote %d drawn images and %d JSON files to %s", len(written), len(written), args.save_path)
    return written


if __name__ == "__main__":
    run_cli(main, get_args_parser())
