"""Convert Open Images (OID V4+) boxes and verified image-level labels to the common annotation format.

Run-book (from the repository root)::

    python prep/openimages.py --split validation \\
        --class_descriptions oid/class-descriptions-boxable.csv \\
        --boxes oid/validation-annotations-bbox.csv \\
        --image_labels oid/validation-annotations-human-imagelabels-boxable.csv \\
        --hierarchy oid/bbox_labels_600_hierarchy.json \\
        --image_dir oid/validation --frequency_bins 3

writes, under ``<data_root>/<dataset>/`` (default ``datasets/openimages/``):

- ``annotations/<split>.json``: the common format (see data/annotations.py);
- ``<split>``: a symlink to ``--image_dir`` (``--copy``: a folder with copies of the kept images);
- ``hierarchy.json``: a verbatim copy of ``--hierarchy``, so evaluation can expand labels to their parents;
- ``class_bins/bin_<i>.txt`` with ``--frequency_bins N``: MIDs, one per line (``train.py --classes FILE``).

What goes into the annotation file and why:

- Boxes: the normalised ``XMin, XMax, YMin, YMax`` times the image size read from the file header
  (PIL reads the header only, no pixels are decoded). Coordinates outside [0, 1] are clipped (counted);
  boxes with zero width or height after that are dropped ("degenerate", counted).
- EXIF orientation: the Open Images boxes refer to the pixels as stored in the file (the dataset's
  note on rotated images gives a separate ``Rotation`` value by which "the image and boxes" should be
  rotated together, i.e. both are stored unrotated). ``data.image_io.read_image`` applies the EXIF
  orientation, so for a file with an orientation tag other than 1 the boxes are transformed the same way
  and width/height are those of the displayed image; such images get ``exif_orientation`` and are counted.
- ``IsGroupOf`` -> ``iscrowd`` (1 only for 1; an unknown -1 becomes 0 and is counted); ``IsOccluded``,
  ``IsTruncated``, ``IsDepiction``, ``IsInside`` -> ``is_occluded`` ... as 1 / 0 / -1 (unknown);
  ``Source`` -> ``source``. Absent optional columns (the challenge files have fewer) read as -1 / "".
- Images: ``id`` = the first 13 hex digits of the ImageID as an integer (< 2**52, exact in float64,
  the same in every split and class subset, so train and validation can be merged; a collision raises),
  ``file_name`` = ``<split>/<ImageID>.jpg``, ``oid_image_id``, and the human-verified labels as sorted
  category ids ``verified_present`` / ``verified_absent`` (duplicates dropped; a label verified both
  present and absent is kept as present; both counted).
- Which images: those with at least one kept box or one verified label of a selected class. Images
  with verified labels but no boxes are kept: their absent labels are the negatives of the OID metric.
  Images whose only boxes were degenerate are dropped (counted): they contain an object we lost.
- Categories: the selected classes (``--classes``, default every class of ``--class_descriptions``) in
  that order, ``id`` = 1..K, ``name``, ``mid``.

Every box row is counted under exactly one outcome, first match wins: ``unknown_mid`` (not in the
class descriptions), ``class_not_selected``, ``image_missing``, ``image_unreadable``, ``degenerate``,
else kept. Label rows likewise, with ``duplicate`` and ``conflicting`` instead of ``degenerate``.

The CSVs stream: a row becomes a few numbers in ``array.array`` columns (about 45 bytes per kept box),
nothing else is kept per row, and the JSON is written a chunk of images at a time (each chunk checked
with ``data.annotations.validate_annotations``) into a temp file that replaces the target at the end.

This script holds the options and ``main``; the stages are in ``prep/oid/``: classes.py (class
descriptions, ``--classes``, hierarchy), csv_stream.py, images.py (headers, EXIF orientation, image ids,
the image folder), convert.py, write.py and summary.py. ``python -m prep.openimages`` runs it too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict

# Runnable as `python prep/openimages.py` from the repository root: Python puts prep/ (not the root)
# on sys.path, and the script imports the `prep` and `data` packages from the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from prep.oid.classes import load_classes, load_hierarchy_file  # noqa: E402
from prep.oid.convert import keep_boxes, keep_labels, order_by_image  # noqa: E402
from prep.oid.csv_stream import ImageIndex, stream_boxes, stream_image_labels, stream_image_labels_empty  # noqa: E402
from prep.oid.images import link_or_copy_images, read_image_headers  # noqa: E402
from prep.oid.summary import build_summary, print_summary  # noqa: E402
from prep.oid.write import write_annotation_file, write_class_bins, write_hierarchy  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert Open Images boxes and verified image-level labels to the common format "
        "(see the module docstring and prep/README.md).",
        add_help=add_help,
        allow_abbrev=False,
    )
    # * Input files
    parser.add_argument("--class_descriptions", required=True, help="CSV 'MID,Name' (the boxable classes)")
    parser.add_argument("--boxes", required=True, help="box annotations CSV (ImageID,Source,LabelName,...)")
    parser.add_argument(
        "--image_labels",
        default=None,
        help="human-verified image-level labels CSV (ImageID,Source,LabelName,Confidence 0/1)",
    )
    parser.add_argument(
        "--hierarchy", default=None, help="bbox_labels_600_hierarchy.json, copied to the dataset folder"
    )
    parser.add_argument("--image_dir", required=True, help="folder of <ImageID>.jpg files of this split")
    # * Output
    parser.add_argument("--split", required=True, help="split name, e.g. train, validation, test")
    parser.add_argument("--dataset", default="openimages", help="dataset folder name under --data_root")
    parser.add_argument("--data_root", default="datasets/", help="root of the dataset folders")
    parser.add_argument(
        "--copy",
        action="store_true",
        help="copy the kept images into <data_root>/<dataset>/<split> instead of symlinking --image_dir",
    )
    # * Classes
    parser.add_argument(
        "--classes",
        default=None,
        help="subset of classes by name or MID: a comma list or a file with one per line (default: all)",
    )
    parser.add_argument(
        "--frequency_bins",
        type=int,
        default=0,
        help="split the classes into N bins of equal size by box count; writes class_bins/bin_<i>.txt",
    )
    # * Misc
    parser.add_argument(
        "-j", "--num_workers", type=int, default=8, help="threads reading image headers (I/O bound)"
    )
    parser.add_argument("--print_top", type=int, default=20, help="classes listed in the summary")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Input files and options, checked before the long work."""
    for option in ("class_descriptions", "boxes", "image_labels", "hierarchy"):
        path = getattr(args, option)
        if path is not None and not os.path.isfile(path):
            raise UserError(f"--{option}: file not found: {path}")
    if not os.path.isdir(args.image_dir):
        raise UserError(f"--image_dir: folder not found: {args.image_dir}")
    if args.frequency_bins < 0:
        raise UserError(f"--frequency_bins must be >= 0, got {args.frequency_bins}")
    image_target = os.path.join(args.data_root, args.dataset, args.split)
    # Checked before the long work too (link_or_copy_images checks again at the end).
    if not args.copy and os.path.exists(image_target) and not os.path.islink(image_target):
        if not os.path.samefile(image_target, args.image_dir):
            raise UserError(
                f"{image_target} exists and is not a symlink; remove it, or use --copy to copy images into it"
            )


def annotation_info(args: argparse.Namespace) -> Dict[str, Any]:
    """The annotation file's ``info``: where it came from."""
    return {
        "description": f"Open Images {args.split}, converted by prep/openimages.py",
        "boxes": os.path.basename(args.boxes),
        "image_labels": os.path.basename(args.image_labels) if args.image_labels else None,
        "class_descriptions": os.path.basename(args.class_descriptions),
    }


class _Stopwatch:
    """Seconds of each stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._start
        self._start = now


def main(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Convert one split; returns ``{split: summary}`` like the other converters (see print_summary)."""
    check_args(args)
    dataset_root = os.path.join(args.data_root, args.dataset)
    classes = load_classes(args.class_descriptions, args.classes)
    if args.frequency_bins > classes.num_classes:
        raise UserError(
            f"--frequency_bins {args.frequency_bins} exceeds the {classes.num_classes} selected classes"
        )
    hierarchy, not_in_hierarchy = load_hierarchy_file(args.hierarchy, classes.mids)
    stopwatch = _Stopwatch()

    # 1. Stream the CSVs: only rows of selected classes become (compact) columns.
    images = ImageIndex()
    boxes = stream_boxes(args.boxes, classes.label_of_mid, images)
    if args.image_labels is not None:
        labels = stream_image_labels(args.image_labels, classes.label_of_mid, images)
    else:
        labels = stream_image_labels_empty()
    stopwatch.lap("read_csv")
    # 2. Image headers: size and EXIF orientation, or missing / unreadable.
    headers = read_image_headers(args.image_dir, images.keys, args.num_workers)
    stopwatch.lap("read_image_headers")
    # 3. Boxes and labels of readable images (oriented, clipped, deduplicated), grouped by image.
    kept_boxes = keep_boxes(boxes, headers)
    kept_labels = keep_labels(labels, headers["status"], classes.num_classes)
    cols = order_by_image(images.keys, headers, kept_boxes, kept_labels)
    stopwatch.lap("convert")
    # 4. The annotation file, a chunk of images at a time.
    annotation_file = os.path.join(dataset_root, "annotations", f"{args.split}.json")
    write_annotation_file(annotation_file, cols, classes, args.split, annotation_info(args))
    stopwatch.lap("write_json")
    # 5. Images folder, hierarchy, class bins.
    image_folder = os.path.join(dataset_root, args.split)
    boxes_per_class = cols.boxes_per_class(classes.num_classes)
    outputs = {
        "image_folder": image_folder,
        "image_folder_mode": link_or_copy_images(args.image_dir, image_folder, cols.file_names, args.copy),
        "hierarchy_file": write_hierarchy(dataset_root, hierarchy),
        "class_bins": write_class_bins(dataset_root, boxes_per_class, classes, args.frequency_bins),
    }
    summary = build_summary(
        split=args.split,
        annotation_file=annotation_file,
        classes=classes,
        not_in_hierarchy=not_in_hierarchy,
        boxes=boxes,
        labels=labels,
        headers=headers,
        kept_boxes=kept_boxes,
        kept_labels=kept_labels,
        cols=cols,
        timings=stopwatch.seconds,
        outputs=outputs,
    )
    print_summary(summary, args.print_top)
    return {args.split: summary}


if __name__ == "__main__":
    run_cli(main, get_args_parser(add_help=True))
