"""Convert a COCO ``instances_*.json`` (2014 or 2017) to the common format, one split per run::

    python prep/coco.py --ann annotations/instances_val2017.json --image_dir val2017 --split val2017
    python prep/coco.py --ann annotations/instances_train2017.json --image_dir train2017 --split train2017

writes ``<data_root>/coco/annotations/<split>.json`` and links the image folder as
``<data_root>/coco/<split>`` (``--copy`` copies it); ``file_name`` becomes ``<split>/<file_name>``.

Kept as they are, so that detections written later are scored by the official tools (pycocotools,
the evaluation server) without any mapping: image ids, category ids (the category list keeps the
file's order, its position is the training label), annotation ids, ``iscrowd``, and ``area``
(COCO's ``area`` is the SEGMENTATION area, which COCOeval uses for the small/medium/large ranges,
not the box area). Segmentations, keypoints, licenses and image URLs are dropped to keep files
small.

Counted in the summary by reason (nothing is dropped silently):

- boxes with ``w <= 0`` or ``h <= 0`` are dropped ("zero area (w <= 0 or h <= 0)");
- boxes whose ``image_id`` or ``category_id`` is not in the file are dropped, a few ids named;
- boxes reaching outside the image are clipped ("outside the image"; COCO has some that overshoot
  by a fraction of a pixel), or dropped if nothing is left ("zero area after clipping");
- images whose file is not in ``--image_dir`` are skipped, and their boxes dropped ("on a skipped image");
- every image's header is read (no decode, about 0.1 ms per image): an image that cannot be read or is
  cut short ("unreadable image file"), or whose ``width`` / ``height`` differ from the file's (both
  sizes named), is skipped with its boxes;
- boxes of at most 1 px on a side are kept and noted, or dropped and counted with ``--tiny_boxes drop``;
- records without the required fields, or with an annotation id that is not an integer, are dropped
  or skipped; class names that differ only in case are noted with a warning.

Two image records of one file, and a file without categories, are errors: which boxes belong to
which record cannot be told, and there would be nothing to train.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Dict, List

# Run as `python prep/coco.py`, Python puts prep/ (not the repo root) on sys.path; the root is needed
# to import the repo's packages (data/, prep/) without installing anything.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.annotations import save_annotations  # noqa: E402
from prep.common import (  # noqa: E402
    TINY_BOX_SIZE,
    ConversionReport,
    case_variants,
    checked_image_size,
    format_summary,
    is_tiny_box,
    link_or_copy,
    summarize,
)
from utils.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_coco_json(path: str) -> Dict[str, Any]:
    """Parse a COCO instances file; ValueError naming the file if it is missing, not JSON or not COCO."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: COCO annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid JSON file: {e}") from e
    if not isinstance(coco, dict):
        raise UserError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise UserError(f"{path}: missing or non-list field {key!r}; is this an instances_*.json file?")
    for i, category in enumerate(coco["categories"]):
        if not (
            isinstance(category, dict)
            and _is_int(category.get("id"))
            and isinstance(category.get("name"), str)
        ):
            raise UserError(f"{path}: categories[{i}] needs an integer id and a name, got {category!r}")
    if not coco["categories"]:
        raise UserError(f"{path}: the category list is empty, so there is no class to train or score")
    return coco


def convert_images(
    images: List[Any], split: str, image_dir: str, report: ConversionReport, source: str
) -> Dict[int, Dict[str, Any]]:
    """Image records in the common format ({id: record}, file order kept); skipped ones are counted.

    Raises:
        ValueError: naming ``source``, when two images share an id (which box belongs where is unknowable).
    """
    names_in_dir = set(os.listdir(image_dir))
    converted: Dict[int, Dict[str, Any]] = {}
    id_of_file: Dict[str, int] = {}
    for i, image in enumerate(images):
        if (
            not isinstance(image, dict)
            or any(k not in image for k in _IMAGE_FIELDS)
            or not _is_int(image["id"])
        ):
            report.skip_image("image record without id, file_name, width or height", f"images[{i}]")
            continue
        width, height = image["width"], image["height"]
        if not (_is_finite(width) and _is_finite(height) and width > 0 and height > 0):
            report.skip_image("invalid image size", f"image id={image['id']}: {width} x {height}")
            continue
        file_name = image["file_name"]
        if file_name not in names_in_dir and not os.path.isfile(os.path.join(image_dir, file_name)):
            report.skip_image("missing image file", os.path.join(image_dir, file_name))
            continue
        if image["id"] in converted:
            raise UserError(f"{source}: images[{i}]: duplicate image id {image['id']}")
        other = id_of_file.setdefault(os.path.normpath(file_name), image["id"])
        if other != image["id"]:
            raise UserError(
                f"{source}: images[{i}] (id {image['id']}) and image id {other} are both {file_name!r}: "
                "an image listed twice trains twice (once as background where one record has no box); "
                "merge the two records"
            )
        where = f"image id={image['id']}"
        if checked_image_size(os.path.join(image_dir, file_name), (width, height), report, where) is None:
            continue
        converted[image["id"]] = {
            "id": image["id"],
            "file_name": f"{split}/{file_name}",
            "width": width,
            "height": height,
        }
    return converted


def _checked_box(
    bbox: Any, image: Dict[str, Any], name: str, report: ConversionReport, tiny_boxes: str
) -> List[float] | None:
    """The box [x, y, w, h] clipped to the image; None (counted in ``report``) when it is dropped."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
        report.drop_box("bbox is not 4 finite numbers", name)
        return None
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        report.drop_box("zero area (w <= 0 or h <= 0)", name)
        return None
    width, height = image["width"], image["height"]
    if x < 0 or y < 0 or x + w > width or y + h > height:
        x1, y1 = max(x, 0), max(y, 0)
        x2, y2 = min(x + w, width), min(y + h, height)
        if x2 <= x1 or y2 <= y1:
            report.drop_box("zero area after clipping", name)
            return None
        report.clip_box("outside the image", name)
        x, y, w, h = x1, y1, x2 - x1, y2 - y1
    if is_tiny_box(w, h):
        example = f"{name}: {w:g} x {h:g}"
        if tiny_boxes == "drop":
            report.drop_box(f"at most {TINY_BOX_SIZE:g} px wide or high (--tiny_boxes drop)", example)
            return None
        report.note(f"box at most {TINY_BOX_SIZE:g} px wide or high (kept; --tiny_boxes drop)", example)
    return [x, y, w, h]


def convert_annotations(
    annotations: List[Any],
    images: Dict[int, Dict[str, Any]],
    skipped_image_ids: set,
    category_ids: set,
    report: ConversionReport,
    source: str,
    tiny_boxes: str = "keep",
) -> List[Dict[str, Any]]:
    """Box records in the common format; every dropped or clipped box is counted in ``report``.

    Boxes of at most ``TINY_BOX_SIZE`` px on a side are kept (noted) or dropped (``tiny_boxes="drop"``).

    Raises:
        ValueError: naming ``source``, when two boxes share an id (COCOeval looks boxes up by id).
    """
    converted = []
    seen_ids = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or any(k not in ann for k in _ANNOTATION_FIELDS):
            report.drop_box("record without id, image_id, category_id or bbox", f"annotations[{i}]")
            continue
        if not _is_int(ann["id"]):
            report.drop_box("annotation id is not an integer", f"annotations[{i}]: id {ann['id']!r}")
            continue
        name = f"annotation id={ann['id']}"
        if ann["id"] in seen_ids:
            raise UserError(f"{source}: annotations[{i}]: duplicate annotation id {ann['id']!r}")
        seen_ids.add(ann["id"])
        image = images.get(ann["image_id"]) if _is_int(ann["image_id"]) else None
        if image is None:
            if _is_int(ann["image_id"]) and ann["image_id"] in skipped_image_ids:
                report.drop_box("on a skipped image", name)
            else:
                report.drop_box("unknown image_id", f"{name} (image_id {ann['image_id']!r})")
            continue
        if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
            report.drop_box("unknown category_id", f"{name} (category_id {ann['category_id']!r})")
            continue
        box = _checked_box(ann["bbox"], image, name, report, tiny_boxes)
        if box is None:
            continue
        x, y, w, h = box
        area = ann.get("area")
        if not (_is_finite(area) and area >= 0):
            report.note("no valid area: box area used", name)
            area = w * h
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            report.note("iscrowd not 0/1: taken as crowd", name)
            iscrowd = 1
        converted.append(
            {
                "id": ann["id"],
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": int(iscrowd),
            }
        )
    return converted


def default_split(ann_path: str) -> str:
    """instances_val2017.json -> val2017."""
    stem = os.path.splitext(os.path.basename(ann_path))[0]
    return stem[len("instances_") :] if stem.startswith("instances_") else stem


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a COCO instances_*.json to the common format (see prep/README.md).",
        add_help=add_help,
    )
    parser.add_argument("--ann", required=True, help="COCO instances_*.json")
    parser.add_argument(
        "--image_dir", required=True, help="folder holding the split's images (e.g. val2017/)"
    )
    parser.add_argument(
        "--split", default=None, help="split name (default: from --ann, instances_val2017 -> val2017)"
    )
    parser.add_argument("--dataset", default="coco", help="dataset folder name (default: coco)")
    parser.add_argument("--data_root", default="datasets/", help="output root (default: datasets/)")
    parser.add_argument(
        "--copy", action="store_true", help="copy the images into the dataset folder instead of linking"
    )
    parser.add_argument(
        "--tiny_boxes",
        default="keep",
        choices=("keep", "drop"),
        help=f"boxes at most {TINY_BOX_SIZE:g} px wide or high: keep them (the default; noted with their "
        "ids) or drop them (counted)",
    )
    return parser


def main(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Convert one split, write it, print the summary and return {split: summary}."""
    split = args.split or default_split(args.ann)
    if not split or "/" in split or split in (".", "..", "annotations"):
        raise UserError(f"--split {split!r} is not usable as a folder name")
    source = read_coco_json(args.ann)
    dataset_dir = os.path.join(args.data_root, args.dataset)
    # Link first: a clash with an existing folder stops the run before anything is written.
    link_or_copy(args.image_dir, os.path.join(dataset_dir, split), args.copy)

    report = ConversionReport()
    images = convert_images(source["images"], split, args.image_dir, report, args.ann)
    skipped_image_ids = {
        im["id"] for im in source["images"] if isinstance(im, dict) and _is_int(im.get("id"))
    } - set(images)
    category_ids = {c["id"] for c in source["categories"]}
    annotations = convert_annotations(
        source["annotations"], images, skipped_image_ids, category_ids, report, args.ann, args.tiny_boxes
    )
    for group in case_variants([c["name"] for c in source["categories"]]):
        logger.warning("%s: class names %s differ only in case; they are separate classes", args.ann, group)
        report.note("class names that differ only in case (separate classes)", " / ".join(map(repr, group)))
    categories = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in source["categories"]]
    info = dict(source.get("info") or {})
    info["converted_by"] = "prep/coco.py (segmentations dropped, file_name prefixed with the split folder)"
    coco = {
        "info": info,
        "images": list(images.values()),
        "annotations": annotations,
        "categories": categories,
    }

    output = os.path.join(dataset_dir, "annotations", f"{split}.json")
    save_annotations(coco, output)
    summary = summarize(coco, report, split, output)
    print(format_summary(summary))
    return {split: summary}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main, get_args_parser(add_help=True))
