"""Convert PASCAL VOC XML annotations to the common format (COCO-style JSON, one file per split).

From a VOCdevkit (one split file per set, e.g. ``trainval2007.json``; VOC2007/ and VOC2012/ are
linked into the dataset folder, or copied with --copy)::

    python prep/voc.py --devkit ~/data/VOCdevkit --sets 2007:trainval 2012:trainval 2007:test

From any folder of VOC XML files plus a folder of images (LabelImg, CVAT exports, ...), writing
``train.json`` and ``val.json``; the image folder is linked (or copied) as ``<data_root>/NAME/images``::

    python prep/voc.py --xml_dir my/xml --image_dir my/images --dataset mine --val_fraction 0.1 --seed 0
    python prep/voc.py --xml_dir my/xml --image_dir my/images --dataset mine --split_file val_ids.txt

Box convention. VOC stores 1-based inclusive pixel indices: a box covering only the top-left pixel
is ``xmin = ymin = xmax = ymax = 1``. In the continuous pixel coordinates of the common format
(x in [0, width]) that pixel is [0, 1], so ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``
and ``w = xmax - xmin + 1``. Plain continuous IoU on converted boxes then equals the devkit's
"+1" IoU exactly, so metrics/voc.py reproduces the official numbers. Float coordinates (some
tools write them) go through the same formula.

What real files contain, and what happens (every case is counted by reason in the summary):

- ``difficult`` objects are kept with ``"difficult": 1``; a missing ``<difficult>`` means 0 (noted).
- Every image's header is read (no decode; about 0.1 ms per image): an image that cannot be read or
  is cut short ("unreadable image file"), or whose size differs from ``<size>`` ("<size> differs from
  the image", both sizes named; the boxes were drawn on an image of another size), is skipped. A
  missing or invalid ``<size>``: the size is read from the image header (noted).
- Boxes of at most 1 px on a side (``<xmin>`` equal to ``<xmax>``) are kept and noted by file, or
  dropped and counted with ``--tiny_boxes drop``.
- Two image files for one XML (``a.jpg`` and ``a.png``): the first in ``IMAGE_EXTENSIONS`` order is
  used, noted with a warning. Class names that differ only in case (``Cat``, ``cat``) stay separate
  classes, noted with a warning; an object whose name differs only in case from a known class is
  dropped under its own reason.
- An image listed twice in a devkit image set file is converted once (the repeat counted).
- Boxes poking out of the image are clipped to it ("clipped boxes: outside the image"); boxes
  left with zero area by clipping are dropped ("zero area after clipping"), as are boxes with
  xmax < xmin or ymax < ymin ("non-positive size") and boxes without readable coordinates.
- The image is found from the XML file's own stem (trying common extensions), not from
  ``<filename>``; a ``<filename>`` whose stem disagrees is noted.
- A missing image file, a missing XML (devkit) or an XML that cannot be parsed skips the image,
  counted under its reason with the file named, and conversion goes on: one broken file in a
  large custom set should not stop the rest, and the summary says exactly what is missing.
- Objects of classes outside the category list are dropped ("unknown class" in devkit mode,
  "class not in --classes" in folder mode).

Ids. Devkit image ids are ``int(year + digits)``: VOC2007 "000005" -> 2007000005, "2008_000002" ->
2008000002, so splits of both years merge without collisions; box ids are ``image_id * 1000 + k``.
Folder mode numbers images 1, 2, ... in sorted XML file order (before splitting, so an image keeps
its id whichever split it lands in) and boxes 1, 2, ... across both splits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Tuple

import numpy as np

# Run as `python prep/voc.py`, Python puts prep/ (not the repo root) on sys.path; the root is needed
# to import the repo's packages (data/, prep/) without installing anything.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.annotations import save_annotations  # noqa: E402
from prep.common import TINY_BOX_SIZE, ConversionReport, format_summary, link_or_copy, summarize  # noqa: E402
from prep.voc_xml import (  # noqa: E402
    BOX_CONVENTION,
    convert_objects,
    find_image_file,
    image_record,
    parse_voc_xml,
    warn_case_variants,
)
from utils.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# Devkit box ids are image_id * MAX_OBJECTS_PER_IMAGE + k (VOC has at most a few dozen per image).
MAX_OBJECTS_PER_IMAGE = 1000


def voc_image_id(year: str, image_name: str) -> int:
    """VOC2007 "000005" -> 2007000005; "2008_000002" (VOC2012) -> 2008000002."""
    digits = image_name.replace("_", "") if "_" in image_name else year + image_name
    if not digits.isdigit():
        raise UserError(f"VOC{year}: image name {image_name!r} is not of the form 000005 or 2008_000002")
    return int(digits)


def _categories(names: List[str]) -> List[Dict[str, Any]]:
    return [{"id": i + 1, "name": name} for i, name in enumerate(names)]


# ----------------------------------------------------------------------------------------------
# Devkit mode


def parse_set(spec: str) -> Tuple[str, str]:
    """ "2007:trainval" -> ("2007", "trainval")."""
    year, sep, image_set = spec.partition(":")
    if not sep or not year.isdigit() or not image_set:
        raise UserError(f"--sets entry {spec!r} must look like YEAR:SET, e.g. 2007:trainval")
    return year, image_set


def convert_devkit_set(
    devkit: str, year: str, image_set: str, output: str, tiny_boxes: str = "keep"
) -> Dict[str, Any]:
    """Convert ``VOC<year>/ImageSets/Main/<image_set>.txt`` and write ``output``; returns the summary."""
    year_dir = os.path.join(devkit, f"VOC{year}")
    ids_file = os.path.join(year_dir, "ImageSets", "Main", f"{image_set}.txt")
    if not os.path.isfile(ids_file):
        raise UserError(f"{ids_file}: image set file not found (is --devkit the VOCdevkit folder?)")
    with open(ids_file) as f:
        image_names = [line.split()[0] for line in f if line.strip()]
    jpeg_dir = os.path.join(year_dir, "JPEGImages")
    names_in_dir = set(os.listdir(jpeg_dir)) if os.path.isdir(jpeg_dir) else set()
    class_to_category_id = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}

    report = ConversionReport()
    images, annotations = [], []
    seen = set()
    for image_name in image_names:
        if image_name in seen:  # listed again: the image would be converted twice under one id
            report.skip_image("listed again in the image set file", f"{ids_file}: {image_name}")
            continue
        seen.add(image_name)
        image_id = voc_image_id(year, image_name)
        xml_path = os.path.join(year_dir, "Annotations", f"{image_name}.xml")
        if not os.path.isfile(xml_path):
            report.skip_image("missing XML", xml_path)
            continue
        try:
            parsed = parse_voc_xml(xml_path)
        except ValueError:
            report.skip_image("unparseable XML", xml_path)
            continue
        found = find_image_file(jpeg_dir, image_name, names_in_dir, xml_path, report)
        if found is None:
            report.skip_image("missing image file", os.path.join(jpeg_dir, f"{image_name}.jpg"))
            continue
        file_name = f"VOC{year}/JPEGImages/{found}"
        image = image_record(parsed, xml_path, os.path.join(jpeg_dir, found), image_id, file_name, report)
        if image is None:
            continue
        width, height = image["width"], image["height"]
        anns = convert_objects(
            parsed["objects"],
            width,
            height,
            class_to_category_id,
            "unknown class",
            report,
            xml_path,
            tiny_boxes,
        )
        if len(anns) >= MAX_OBJECTS_PER_IMAGE:
            raise UserError(f"{xml_path}: {len(anns)} objects; box ids assume < {MAX_OBJECTS_PER_IMAGE}")
        for k, ann in enumerate(anns):
            annotations.append({"id": image_id * MAX_OBJECTS_PER_IMAGE + k, "image_id": image_id, **ann})
        images.append(image)

    coco = {
        "info": {
            "description": f"PASCAL VOC{year} {image_set}, converted by prep/voc.py",
            "bbox": BOX_CONVENTION,
        },
        "images": images,
        "annotations": annotations,
        "categories": _categories(list(VOC_CLASSES)),
    }
    save_annotations(coco, output)
    return summarize(coco, report, f"{image_set}{year}", output)


def convert_devkit(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    dataset_dir = os.path.join(args.data_root, args.dataset or "voc")
    sets = [parse_set(spec) for spec in args.sets]
    for year in sorted({year for year, _ in sets}):
        # Link first: a clash with an existing folder stops the run before anything is written.
        link_or_copy(
            os.path.join(args.devkit, f"VOC{year}"), os.path.join(dataset_dir, f"VOC{year}"), args.copy
        )
    summaries = {}
    for year, image_set in sets:
        split = f"{image_set}{year}"
        output = os.path.join(dataset_dir, "annotations", f"{split}.json")
        summaries[split] = convert_devkit_set(args.devkit, year, image_set, output, args.tiny_boxes)
    return summaries


# ----------------------------------------------------------------------------------------------
# Folder mode


def read_class_list(text: str) -> List[str]:
    """--classes: a comma list, or a file with one name per line."""
    if os.path.isfile(text):
        with open(text) as f:
            names = [line.strip() for line in f if line.strip()]
    elif text.lower().endswith((".txt", ".csv", ".list")):  # meant as a file
        raise UserError(f"--classes file {text!r} does not exist")
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--classes {text!r}: expected distinct class names, got {names}")
    return names


def split_val(
    stems: List[str], split_file: str | None, val_fraction: float, seed: int
) -> Tuple[set, List[str]]:
    """The stems that go to val, and the --split_file ids that match no XML.

    With ``split_file`` the ids it lists (one per line: stems, or file names such as ``a.jpg``) are
    val. Otherwise ``round(val_fraction * N)`` stems drawn by a permutation seeded with ``seed``
    over the sorted stems: the same files and seed
    give the same split on every machine.
    """
    if split_file is not None:
        with open(split_file) as f:
            listed = [line.strip() for line in f if line.strip()]
        known = set(stems)
        # An entry may be a file name ("a.jpg", "xml/a.xml") as well as a stem.
        listed = [s if s in known else os.path.splitext(os.path.basename(s))[0] for s in listed]
        return {s for s in listed if s in known}, [s for s in listed if s not in known]
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    num_val = int(round(val_fraction * len(stems)))
    order = np.random.default_rng(seed).permutation(len(stems))
    return {stems[i] for i in order[:num_val]}, []


def _folder_xml_names(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """Folder mode's options checked, and the XML files of --xml_dir: (file names, stems), sorted."""
    if not args.dataset:
        raise UserError("--dataset NAME is required with --xml_dir (the output goes to <data_root>/NAME)")
    if not os.path.isdir(args.xml_dir):
        raise UserError(f"--xml_dir {args.xml_dir!r} is not a folder")
    # Every input is checked before the image folder is linked: a bad option leaves nothing behind.
    if args.split_file is not None and not os.path.isfile(args.split_file):
        raise UserError(f"--split_file {args.split_file!r} does not exist")
    if args.split_file is None and not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    xml_names = sorted(f for f in os.listdir(args.xml_dir) if f.lower().endswith(".xml"))
    if not xml_names:
        raise UserError(f"--xml_dir {args.xml_dir!r} holds no .xml file")
    stems = [os.path.splitext(f)[0] for f in xml_names]
    if len(set(stems)) != len(stems):
        raise UserError(f"{args.xml_dir}: several XML files share a stem (e.g. a.xml and a.XML)")
    return xml_names, stems


def convert_folder(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    xml_names, stems = _folder_xml_names(args)
    given_classes = read_class_list(args.classes) if args.classes else None
    dataset_dir = os.path.join(args.data_root, args.dataset)
    images_link = os.path.join(dataset_dir, "images")
    link_or_copy(args.image_dir, images_link, args.copy)
    parsed_by_stem: Dict[str, Any] = {}
    for xml_name, stem in zip(xml_names, stems):
        try:
            parsed_by_stem[stem] = parse_voc_xml(os.path.join(args.xml_dir, xml_name))
        except ValueError as e:
            parsed_by_stem[stem] = e  # counted in the split the image falls in
    found_names = sorted(
        {
            obj["name"]
            for p in parsed_by_stem.values()
            if isinstance(p, dict)
            for obj in p["objects"]
            if obj["name"] is not None
        }
    )
    class_names = given_classes if given_classes is not None else found_names
    if not class_names:
        raise UserError(
            f"--xml_dir {args.xml_dir!r}: no <object> with a <name> in any of the {len(xml_names)} XML "
            "files, so there is no class (give --classes to convert background-only images)"
        )
    class_to_category_id = {name: i + 1 for i, name in enumerate(class_names)}

    val_stems, unmatched = split_val(stems, args.split_file, args.val_fraction, args.seed)
    names_in_dir = set(os.listdir(images_link))
    image_id_of = {stem: i + 1 for i, stem in enumerate(stems)}
    next_ann_id = 1
    summaries = {}
    for split in ("train", "val"):
        report = ConversionReport()
        if split == "train":
            warn_case_variants(class_names, report, args.xml_dir)
        if split == "val":
            for stem in unmatched:
                report.note("--split_file id without an XML", stem)
        images, annotations = [], []
        for xml_name, stem in zip(xml_names, stems):
            if (stem in val_stems) != (split == "val"):
                continue
            xml_path = os.path.join(args.xml_dir, xml_name)
            parsed = parsed_by_stem[stem]
            if isinstance(parsed, ValueError):
                report.skip_image("unparseable XML", xml_path)
                continue
            found = find_image_file(images_link, stem, names_in_dir, xml_path, report)
            if found is None:
                report.skip_image("missing image file", os.path.join(args.image_dir, f"{stem}.*"))
                continue
            image_path = os.path.join(images_link, found)
            image = image_record(parsed, xml_path, image_path, image_id_of[stem], f"images/{found}", report)
            if image is None:
                continue
            reason = "class not in --classes" if args.classes else "unknown class"
            anns = convert_objects(
                parsed["objects"],
                image["width"],
                image["height"],
                class_to_category_id,
                reason,
                report,
                xml_path,
                args.tiny_boxes,
            )
            for ann in anns:
                annotations.append({"id": next_ann_id, "image_id": image["id"], **ann})
                next_ann_id += 1
            images.append(image)
        coco = {
            "info": {"description": f"{args.xml_dir}, converted by prep/voc.py", "bbox": BOX_CONVENTION},
            "images": images,
            "annotations": annotations,
            "categories": _categories(class_names),
        }
        output = os.path.join(dataset_dir, "annotations", f"{split}.json")
        save_annotations(coco, output)
        summaries[split] = summarize(coco, report, split, output)
    return summaries


# ----------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert PASCAL VOC XML annotations to the common format (see prep/README.md).",
        add_help=add_help,
    )
    parser.add_argument(
        "--data_root",
        default="datasets/",
        help="output root: <data_root>/<dataset>/annotations/ (default: datasets/)",
    )
    parser.add_argument("--dataset", default=None, help="dataset folder name (default 'voc' with --devkit)")
    parser.add_argument(
        "--copy", action="store_true", help="copy the images into the dataset folder instead of linking"
    )
    parser.add_argument(
        "--tiny_boxes",
        default="keep",
        choices=("keep", "drop"),
        help=f"boxes at most {TINY_BOX_SIZE:g} px wide or high (e.g. <xmin> equal to <xmax>): keep them "
        "(the default; they are reported by file) or drop them (counted)",
    )

    # * VOCdevkit mode
    g = parser.add_argument_group("VOCdevkit mode")
    g.add_argument("--devkit", default=None, help="VOCdevkit folder holding VOC2007/, VOC2012/")
    g.add_argument(
        "--sets",
        nargs="+",
        default=["2007:trainval", "2012:trainval", "2007:test"],
        help="YEAR:SET entries, each written to <SET><YEAR>.json "
        "(default: 2007:trainval 2012:trainval 2007:test)",
    )

    # * Folder mode
    g = parser.add_argument_group("folder mode (any VOC XML files + images; writes train.json and val.json)")
    g.add_argument("--xml_dir", default=None, help="folder of VOC XML files")
    g.add_argument("--image_dir", default=None, help="folder of the images, found by the XML file stem")
    g.add_argument(
        "--classes",
        default=None,
        help="comma list or file fixing the class order (default: the sorted names found); "
        "objects of other classes are dropped and counted",
    )
    g.add_argument(
        "--split_file",
        default=None,
        help="file of XML stems, one per line, that go to val (the rest to train); overrides --val_fraction",
    )
    g.add_argument(
        "--val_fraction", type=float, default=0.1, help="fraction of the images drawn for val (default: 0.1)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the --val_fraction draw (default: 0)")
    return parser


def main(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Convert, write the split files, print a summary per split and return {split: summary}."""
    if (args.devkit is None) == (args.xml_dir is None):
        raise UserError("give either --devkit DIR or --xml_dir DIR --image_dir DIR --dataset NAME")
    if args.xml_dir is not None and args.image_dir is None:
        raise UserError("--xml_dir needs --image_dir")
    summaries = convert_devkit(args) if args.devkit is not None else convert_folder(args)
    for summary in summaries.values():
        print(format_summary(summary))
    return summaries


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main, get_args_parser(add_help=True))
