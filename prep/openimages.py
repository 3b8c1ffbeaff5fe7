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
"""

from __future__ import annotations

import argparse
import array
import csv
import json
import operator
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence, Tuple

# Runnable as `python prep/openimages.py` from the repository root: Python puts prep/ (not the root)
# on sys.path, and the script imports the `data` package from the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from data.annotations import format_problems, validate_annotations  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
BOX_OPTIONAL_COLUMNS = ("Source", "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")

DROP_REASONS = ("unknown_mid", "class_not_selected", "image_missing", "image_unreadable")
BOX_DROP_REASONS = DROP_REASONS + ("degenerate",)
LABEL_DROP_REASONS = DROP_REASONS + ("duplicate", "conflicting")

# Image status codes from the header read.
_OK, _MISSING, _UNREADABLE = 0, 1, 2

# Flag values as written in the CSV; "" is what an absent optional column reads as.
_FLAG_VALUES = {"0": 0, "1": 1, "-1": -1, "": -1}

# Hex digits of the ImageID used as the integer image id: 13 * 4 = 52 bits, exact in a float64.
_ID_HEX_DIGITS = 13

# Images per chunk of the JSON writer and per validation call (about 35K boxes of OID train: ~50 MB of dicts).
_WRITE_CHUNK = 4096

EXIF_ORIENTATION_TAG = 0x0112


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


# --------------------------------------------------------------------------------------------------
# Classes and hierarchy


def read_class_descriptions(path: str) -> Tuple[List[str], List[str]]:
    """Read ``MID,Name`` rows (no header; a 'LabelName,DisplayName' header is skipped) -> (mids, names)."""
    mids: List[str] = []
    names: List[str] = []
    seen: Dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise UserError(f"{path}:{line_no}: expected 2 fields 'MID,Name', got {len(row)}: {row!r}")
            mid, name = row[0].strip(), row[1].strip()
            if line_no == 1 and mid == "LabelName":
                continue
            if not mid or not name:
                raise UserError(f"{path}:{line_no}: empty MID or name: {row!r}")
            if mid in seen:
                raise UserError(f"{path}:{line_no}: MID {mid!r} already defined on line {seen[mid]}")
            seen[mid] = line_no
            mids.append(mid)
            names.append(name)
    if not mids:
        raise UserError(f"{path}: no classes in the class descriptions file")
    return mids, names


def parse_class_list(value: str) -> List[str]:
    """``--classes``: a file (one per line, blank lines and '#' comments skipped) or a comma list."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8-sig") as f:
            items = [line.strip() for line in f]
        return [item for item in items if item and not item.startswith("#")]
    return [item.strip() for item in value.split(",") if item.strip()]


def select_classes(requested: Sequence[str] | None, mids: List[str], names: List[str]) -> List[int]:
    """Indices into (mids, names) of the requested classes, in the requested order.

    A token matches a MID first, then a name exactly, then a name case-insensitively (must be unique).
    Raises ValueError naming ``--classes`` for unknown, ambiguous or repeated classes.
    """
    if requested is None:
        return list(range(len(mids)))
    index_of_mid = {mid: i for i, mid in enumerate(mids)}
    indices_of_name: Dict[str, List[int]] = {}
    indices_of_lower: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        indices_of_name.setdefault(name, []).append(i)
        indices_of_lower.setdefault(name.lower(), []).append(i)
    selected: List[int] = []
    unknown: List[str] = []
    ambiguous: List[str] = []
    for token in requested:
        if token in index_of_mid:
            candidates = [index_of_mid[token]]
        else:
            candidates = indices_of_name.get(token) or indices_of_lower.get(token.lower(), [])
        if not candidates:
            unknown.append(token)
        elif len(candidates) > 1:
            ambiguous.append(f"{token!r} ({', '.join(mids[i] for i in candidates)})")
        else:
            selected.append(candidates[0])
    problems = []
    if unknown:
        problems.append(f"unknown classes (not a MID or name of the class descriptions): {unknown}")
    if ambiguous:
        problems.append(f"names shared by several MIDs, use the MID: {', '.join(ambiguous)}")
    repeated = sorted({names[i] for i in selected if selected.count(i) > 1})
    if repeated:
        problems.append(f"classes given more than once: {repeated}")
    if not requested:
        problems.append("no classes given")
    if problems:
        raise UserError("--classes: " + "; ".join(problems))
    return selected


def hierarchy_mids(hierarchy: Any, path: str) -> List[str]:
    """All LabelName MIDs of a nested {"LabelName", "Subcategory": [...], "Part": [...]} tree."""
    found: List[str] = []
    stack = [hierarchy]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
            raise UserError(f"{path}: hierarchy node without a string 'LabelName': {str(node)[:200]}")
        found.append(node["LabelName"])
        for key in ("Subcategory", "Part"):
            children = node.get(key, [])
            if not isinstance(children, list):
                raise UserError(f"{path}: {key!r} of {node['LabelName']} must be a list")
            stack.extend(children)
    return found


# --------------------------------------------------------------------------------------------------
# CSV streaming


def _open_csv(path: str, required: Sequence[str]):
    """Open a CSV and check its header -> (file positioned at the first row, header column names)."""
    # utf-8-sig: a byte-order mark would otherwise stick to the first column name.
    f = open(path, encoding="utf-8-sig", newline="")
    header = [name.strip() for name in f.readline().rstrip("\r\n").split(",")]
    missing = [name for name in required if name not in header]
    if missing:
        f.close()
        raise UserError(f"{path}: header {header} lacks the column(s) {missing}")
    return f, header


def _row_error(path: str, line_no: int, line: str, num_columns: int, error: Exception) -> ValueError:
    num_fields = line.count(",") + 1
    if num_fields != num_columns:
        detail = f"{num_fields} fields, the header has {num_columns} (quoted fields are not supported)"
    else:
        detail = f"bad value ({error})"
    return ValueError(f"{path}:{line_no}: {detail}: {line.strip()[:200]!r}")


class _ImageIndex:
    """ImageID string -> dense index, in order of first appearance."""

    def __init__(self):
        self.index: Dict[str, int] = {}
        self.keys: List[str] = []

    def __len__(self) -> int:
        return len(self.keys)


def stream_boxes(path: str, label_of_mid: Dict[str, int], images: _ImageIndex) -> Dict[str, Any]:
    """Read the box CSV row by row; keep only boxes of selected classes, as compact columns.

    ``label_of_mid`` maps every known MID to its label (0..K-1) or -1 (known, not selected).
    Returns dict of numpy columns: image_index int32 [B], label int32 [B], coords float64 [B, 4]
    (XMin, XMax, YMin, YMax normalised), flags int8 [B, 5] (occluded, truncated, group_of, depiction,
    inside: 1 / 0 / -1), source_code int16 [B] (index into ``sources``), plus ``num_rows``,
    ``unknown_mid``, ``class_not_selected`` (row counts), ``unknown_mids`` (dict MID -> rows) and
    ``seconds`` / ``cpu_seconds`` of the pass.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    image_index = array.array("i")
    labels = array.array("i")
    coords = array.array("d")
    # Source and the five flags take few distinct values: one dict lookup codes all six per row.
    attribute_codes = array.array("h")
    code_of_attributes: Dict[Tuple[str, ...], int] = {}
    unknown_mids: Dict[str, int] = {}
    num_not_selected = 0
    num_rows = 0
    index_of_image, image_keys = images.index, images.keys

    f, header = _open_csv(path, BOX_COLUMNS)
    num_columns = len(header)
    get_box = operator.itemgetter(*[header.index(name) for name in BOX_COLUMNS])
    # Absent optional columns (the challenge files have fewer) point at a "" appended to each row.
    pad = any(name not in header for name in BOX_OPTIONAL_COLUMNS)
    get_attributes = operator.itemgetter(
        *[header.index(name) if name in header else num_columns for name in BOX_OPTIONAL_COLUMNS]
    )
    with f:
        line_no = 1
        for line_no, line in enumerate(f, start=2):
            try:
                fields = line.rstrip("\r\n").split(",")
                if len(fields) != num_columns:
                    if not line.strip():
                        continue
                    raise UserError("wrong number of fields")
                key, mid, xmin, xmax, ymin, ymax = get_box(fields)
                num_rows += 1
                label = label_of_mid.get(mid)
                if label is None:
                    unknown_mids[mid] = unknown_mids.get(mid, 0) + 1
                    continue
                if label < 0:
                    num_not_selected += 1
                    continue
                coords.extend((float(xmin), float(xmax), float(ymin), float(ymax)))
                if pad:
                    fields.append("")
                attributes = get_attributes(fields)
                code = code_of_attributes.get(attributes)
                if code is None:
                    bad = [v for v in attributes[1:] if v not in _FLAG_VALUES]
                    if bad:
                        raise UserError(f"flag values {bad} are not 0, 1 or -1")
                    code = code_of_attributes[attributes] = len(code_of_attributes)
                attribute_codes.append(code)
                index = index_of_image.get(key)
                if index is None:
                    index = index_of_image[key] = len(image_keys)
                    image_keys.append(key)
                image_index.append(index)
                labels.append(label)
            except (ValueError, KeyError) as e:
                raise _row_error(path, line_no, line, num_columns, e) from None

    # Decode the attribute codes: one row per distinct (source, flags...) combination.
    table = list(code_of_attributes)
    sources = sorted({attributes[0] for attributes in table})
    source_of_code = np.array([sources.index(a[0]) for a in table], dtype=np.int16).reshape(-1)
    flags_of_code = np.array([[_FLAG_VALUES[v] for v in a[1:]] for a in table], dtype=np.int8).reshape(-1, 5)
    codes = np.frombuffer(attribute_codes, dtype=np.int16) if len(attribute_codes) else np.zeros(0, np.int16)
    num_boxes = len(labels)
    return {
        "image_index": np.frombuffer(image_index, dtype=np.int32) if num_boxes else np.zeros(0, np.int32),
        "label": np.frombuffer(labels, dtype=np.int32) if num_boxes else np.zeros(0, np.int32),
        "coords": (np.frombuffer(coords, dtype=np.float64) if num_boxes else np.zeros(0)).reshape(-1, 4),
        "flags": flags_of_code[codes],
        "source_code": source_of_code[codes],
        "sources": sources,
        "num_rows": num_rows,
        "unknown_mid": sum(unknown_mids.values()),
        "unknown_mids": unknown_mids,
        "class_not_selected": num_not_selected,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def stream_image_labels(path: str, label_of_mid: Dict[str, int], images: _ImageIndex) -> Dict[str, Any]:
    """Read the human-verified image-level labels; keep (image, label, present) of selected classes.

    Confidence must be 0 (verified absent) or 1 (verified present): the machine-generated label files
    have fractional confidences and are rejected with a ValueError naming the row.
    Returns image_index int32 [L], label int32 [L], present int8 [L], and row counts as stream_boxes.
    """
    image_index = array.array("i")
    labels = array.array("i")
    present = array.array("b")
    unknown_mids: Dict[str, int] = {}
    num_not_selected = 0
    num_rows = 0
    index_of_image, image_keys = images.index, images.keys
    confidence_values = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
    f, header = _open_csv(path, LABEL_COLUMNS)
    num_columns = len(header)
    getter = operator.itemgetter(*[header.index(name) for name in LABEL_COLUMNS])
    with f:
        line_no = 1
        for line_no, line in enumerate(f, start=2):
            try:
                fields = line.rstrip("\r\n").split(",")
                if len(fields) != num_columns:
                    if not line.strip():
                        continue
                    raise UserError("wrong number of fields")
                key, mid, confidence = getter(fields)
                num_rows += 1
                value = confidence_values.get(confidence)
                if value is None:
                    raise UserError(
                        f"Confidence {confidence!r} is not 0 or 1 (a machine-generated label file? "
                        "--image_labels takes the human-verified labels)"
                    )
                label = label_of_mid.get(mid)
                if label is None:
                    unknown_mids[mid] = unknown_mids.get(mid, 0) + 1
                    continue
                if label < 0:
                    num_not_selected += 1
                    continue
                index = index_of_image.get(key)
                if index is None:
                    index = index_of_image[key] = len(image_keys)
                    image_keys.append(key)
                image_index.append(index)
                labels.append(label)
                present.append(value)
            except (ValueError, KeyError) as e:
                raise _row_error(path, line_no, line, num_columns, e) from None
    n = len(labels)
    return {
        "image_index": np.frombuffer(image_index, dtype=np.int32) if n else np.zeros(0, np.int32),
        "label": np.frombuffer(labels, dtype=np.int32) if n else np.zeros(0, np.int32),
        "present": np.frombuffer(present, dtype=np.int8) if n else np.zeros(0, np.int8),
        "num_rows": num_rows,
        "unknown_mid": sum(unknown_mids.values()),
        "unknown_mids": unknown_mids,
        "class_not_selected": num_not_selected,
    }


# --------------------------------------------------------------------------------------------------
# Images


def read_image_header(path: str) -> Tuple[int, int, int, int, str]:
    """(status, width, height, exif_orientation, error) of an image file, from its header only.

    width, height are those of the stored pixel matrix (PIL's ``size`` ignores EXIF orientation).
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
            except Exception:  # a broken EXIF block does not make the pixels unreadable
                orientation = 1
    except FileNotFoundError:
        return _MISSING, 0, 0, 1, "missing"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return _UNREADABLE, 0, 0, 1, str(e)
    if width <= 0 or height <= 0:
        return _UNREADABLE, 0, 0, 1, f"size {width} x {height}"
    if orientation not in range(1, 9):
        orientation = 1  # readers (OpenCV, PIL) ignore invalid values too
    return _OK, width, height, orientation, ""


def _read_image_headers_batch(paths: List[str]) -> List[Tuple[int, int, int, int, str]]:
    return [read_image_header(path) for path in paths]


def read_image_headers(image_dir: str, keys: List[str], num_workers: int) -> Dict[str, Any]:
    """Header of ``<image_dir>/<key>.jpg`` for every key -> status/width/height/orientation arrays [M]."""
    paths = [os.path.join(image_dir, f"{key}.jpg") for key in keys]
    if num_workers > 1 and len(paths) > 1:
        # Threads, not processes: the time goes to opening files (I/O), and the results are tiny.
        # Batches of paths: one future per image costs more than reading its header.
        batches = [paths[i : i + 1024] for i in range(0, len(paths), 1024)]
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            results = [r for batch in pool.map(_read_image_headers_batch, batches) for r in batch]
    else:
        results = _read_image_headers_batch(paths)
    status = np.array([r[0] for r in results], dtype=np.int8)
    errors = [(paths[i], results[i][4]) for i in np.flatnonzero(status == _UNREADABLE)]
    return {
        "status": status,
        "width": np.array([r[1] for r in results], dtype=np.int64),
        "height": np.array([r[2] for r in results], dtype=np.int64),
        "orientation": np.array([r[3] for r in results], dtype=np.int8),
        "unreadable": errors,
        "missing": [paths[i] for i in np.flatnonzero(status == _MISSING)],
    }


def apply_exif_orientation(coords: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Map normalised boxes from the stored pixel matrix to the image displayed after EXIF orientation.

    Args:
        coords (ndarray[B, 4]): XMin, XMax, YMin, YMax, normalised to the stored image.
        orientation (ndarray[B]): EXIF orientation 1..8 of each box's image.

    Returns:
        ndarray[B, 4]: XMin, XMax, YMin, YMax normalised to the displayed image (whose width is the
        stored height for orientations 5..8).
    """
    x0, x1, y0, y1 = coords.T
    o = orientation
    # (u, v) -> displayed (u', v'):  2: (1-u, v)  3: (1-u, 1-v)  4: (u, 1-v)  5: (v, u)
    # 6 (rotate 90 CW): (1-v, u)  7: (1-v, 1-u)  8 (rotate 90 CCW): (v, 1-u)
    swap = o >= 5
    u0, u1 = np.where(swap, y0, x0), np.where(swap, y1, x1)
    v0, v1 = np.where(swap, x0, y0), np.where(swap, x1, y1)
    flip_u = np.isin(o, (2, 3, 6, 7))
    flip_v = np.isin(o, (3, 4, 7, 8))
    u0, u1 = np.where(flip_u, 1.0 - u1, u0), np.where(flip_u, 1.0 - u0, u1)
    v0, v1 = np.where(flip_v, 1.0 - v1, v0), np.where(flip_v, 1.0 - v0, v1)
    return np.stack([u0, u1, v0, v1], axis=1)


def image_ids_from_keys(keys: Sequence[str]) -> np.ndarray:
    """Integer image ids: the first 13 hex digits of each ImageID (< 2**52); raises on bad or clashing ids."""
    ids = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        try:
            ids[i] = int(key[:_ID_HEX_DIGITS], 16)
        except ValueError:
            raise UserError(
                f"ImageID {key!r} is not hexadecimal (Open Images ids are 16 hex digits); "
                "the integer image ids are derived from it"
            ) from None
    unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if len(unique) != len(ids):
        clash = unique[counts > 1][0]
        names = [keys[i] for i in np.flatnonzero(ids == clash)]
        raise UserError(f"ImageIDs {names} share their first {_ID_HEX_DIGITS} hex digits (image id {clash})")
    return ids


def link_or_copy_images(image_dir: str, target: str, file_names: Sequence[str], copy: bool) -> str:
    """Make ``target`` hold the images: a symlink to image_dir's absolute path, or (copy) a folder with
    copies of ``file_names`` only (a class subset needs a fraction of the 1.7M train images).

    A symlink left by an earlier run is replaced (by a link to the current image_dir, or by a folder
    with --copy); an existing real folder is refreshed with --copy and refused without it.

    Returns:
        str: "linked", "copied" or "already in place" (target is image_dir itself), as prep/common.py.
    """
    if os.path.exists(target) and not os.path.islink(target) and os.path.samefile(image_dir, target):
        return "already in place"
    if os.path.islink(target):
        os.remove(target)
    elif os.path.exists(target) and not copy:
        raise UserError(
            f"{target} exists and is not a symlink; remove it, or use --copy to copy images into it"
        )
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    if not copy:
        os.symlink(os.path.abspath(image_dir), target, target_is_directory=True)
        return "linked"
    os.makedirs(target, exist_ok=True)
    for name in file_names:
        src, dst = os.path.join(image_dir, name), os.path.join(target, name)
        if not (os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src)):
            shutil.copyfile(src, dst)
    return "copied"


# --------------------------------------------------------------------------------------------------
# Writing


def write_annotations_streaming(
    path: str,
    categories: List[Dict[str, Any]],
    info: Dict[str, Any],
    num_images: int,
    image_records,
    annotation_records,
    chunk_size: int = _WRITE_CHUNK,
) -> None:
    """Write the common format a chunk of images at a time, atomically (temp files, then os.replace).

    ``data.annotations.save_annotations`` takes the whole dict, which for the 14M boxes of the Open
    Images train set would be tens of GB of Python objects. Here ``image_records(a, b)`` and
    ``annotation_records(a, b)`` build the records of images a..b-1 and their boxes; each chunk is checked
    with ``validate_annotations`` (the chunk's boxes only refer to the chunk's images; ids are unique by
    construction) and written with the same compact separators.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    tmp_boxes = tmp_path + ".boxes"
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    try:
        with open(tmp_path, "w", encoding="utf-8") as f, open(tmp_boxes, "w+", encoding="utf-8") as g:
            f.write('{"info":' + dumps(info) + ',"categories":' + dumps(categories) + ',"images":[')
            first = True
            for a in range(0, num_images, chunk_size):
                b = min(a + chunk_size, num_images)
                images, annotations = image_records(a, b), annotation_records(a, b)
                chunk = {"images": images, "annotations": annotations, "categories": categories}
                problems = validate_annotations(chunk, path)
                if problems:
                    raise UserError(format_problems(problems, path))
                f.write(("" if a == 0 else ",") + dumps(images)[1:-1])
                if annotations:
                    g.write(("" if first else ",") + dumps(annotations)[1:-1])
                    first = False
            f.write('],"annotations":[')
            g.seek(0)
            shutil.copyfileobj(g, f, 1 << 24)
            f.write("]}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        for p in (tmp_path, tmp_boxes):
            if os.path.exists(p):
                os.remove(p)


def frequency_bins(num_boxes_per_class: np.ndarray, num_bins: int) -> List[np.ndarray]:
    """Split classes into num_bins bins of (nearly) equal class counts, most frequent first.

    Classes are sorted by box count, descending (ties: class order); ``np.array_split`` gives the first
    ``K % num_bins`` bins one class more. Returns class indices per bin, in that sorted order.
    """
    order = np.argsort(-num_boxes_per_class, kind="stable")
    return np.array_split(order, num_bins)


# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Convert one split; returns ``{split: summary}`` like the other converters (see print_summary)."""
    for option in ("class_descriptions", "boxes", "image_labels", "hierarchy"):
        path = getattr(args, option)
        if path is not None and not os.path.isfile(path):
            raise UserError(f"--{option}: file not found: {path}")
    if not os.path.isdir(args.image_dir):
        raise UserError(f"--image_dir: folder not found: {args.image_dir}")
    if args.frequency_bins < 0:
        raise UserError(f"--frequency_bins must be >= 0, got {args.frequency_bins}")
    dataset_root = os.path.join(args.data_root, args.dataset)
    image_target = os.path.join(dataset_root, args.split)
    # Checked before the long work too (link_or_copy_images checks again at the end).
    if not args.copy and os.path.exists(image_target) and not os.path.islink(image_target):
        if not os.path.samefile(image_target, args.image_dir):
            raise UserError(
                f"{image_target} exists and is not a symlink; remove it, or use --copy to copy images into it"
            )

    all_mids, all_names = read_class_descriptions(args.class_descriptions)
    requested = parse_class_list(args.classes) if args.classes is not None else None
    selected = select_classes(requested, all_mids, all_names)
    mids = [all_mids[i] for i in selected]
    names = [all_names[i] for i in selected]
    num_classes = len(mids)
    if args.frequency_bins > num_classes:
        raise UserError(f"--frequency_bins {args.frequency_bins} exceeds the {num_classes} selected classes")
    label_of_mid = dict.fromkeys(all_mids, -1)
    label_of_mid.update({mid: label for label, mid in enumerate(mids)})

    hierarchy = None
    if args.hierarchy is not None:
        with open(args.hierarchy, encoding="utf-8") as f:
            try:
                hierarchy = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"--hierarchy: {args.hierarchy} is not valid JSON: {e}") from e
        in_hierarchy = set(hierarchy_mids(hierarchy, args.hierarchy))
        not_in_hierarchy = [mid for mid in mids if mid not in in_hierarchy]
    else:
        not_in_hierarchy = []

    # 1. Stream the CSVs: only rows of selected classes become (compact) columns.
    images = _ImageIndex()
    timings = {}
    start = time.perf_counter()
    boxes = stream_boxes(args.boxes, label_of_mid, images)
    if args.image_labels is not None:
        labels = stream_image_labels(args.image_labels, label_of_mid, images)
    else:
        labels = stream_image_labels_empty()

    # 2. Image headers: size and EXIF orientation, or missing / unreadable.
    timings["read_csv"] = time.perf_counter() - start
    start = time.perf_counter()
    headers = read_image_headers(args.image_dir, images.keys, args.num_workers)
    timings["read_image_headers"] = time.perf_counter() - start
    start = time.perf_counter()
    status = headers["status"]

    # 3. Boxes: drop by image status, orient, clip, denormalise, drop degenerate.
    box_status = status[boxes["image_index"]]
    keep = box_status == _OK
    box_image = boxes["image_index"][keep]
    box_label = boxes["label"][keep]
    box_flags = boxes["flags"][keep]
    box_source = boxes["source_code"][keep]
    coords = boxes["coords"][keep]
    orientation = headers["orientation"][box_image]
    rotated = orientation != 1
    if rotated.any():
        coords = coords.copy()
        coords[rotated] = apply_exif_orientation(coords[rotated], orientation[rotated])
    outside = ((coords < 0) | (coords > 1)).any(axis=1)  # NaN is neither: dropped as degenerate below
    coords = np.clip(coords, 0.0, 1.0)
    swap = headers["orientation"] >= 5  # displayed width = stored height
    display_w = np.where(swap, headers["height"], headers["width"])
    display_h = np.where(swap, headers["width"], headers["height"])
    img_w, img_h = display_w[box_image], display_h[box_image]
    x1, x2 = coords[:, 0] * img_w, coords[:, 1] * img_w
    y1, y2 = coords[:, 2] * img_h, coords[:, 3] * img_h
    valid = (x2 > x1) & (y2 > y1)  # False for NaN too
    dropped_boxes = {
        "unknown_mid": boxes["unknown_mid"],
        "class_not_selected": boxes["class_not_selected"],
        "image_missing": int((box_status == _MISSING).sum()),
        "image_unreadable": int((box_status == _UNREADABLE).sum()),
        "degenerate": int((~valid).sum()),
    }
    num_clipped = int((outside & valid).sum())
    box_image, box_label, box_flags, box_source = (
        box_image[valid],
        box_label[valid],
        box_flags[valid],
        box_source[valid],
    )
    x1, y1, x2, y2 = x1[valid], y1[valid], x2[valid], y2[valid]

    # 4. Labels: drop by image status, duplicates, conflicts (present wins).
    label_status = status[labels["image_index"]]
    keep = label_status == _OK
    pair = labels["image_index"][keep].astype(np.int64) * max(num_classes, 1) + labels["label"][keep]
    present = labels["present"][keep]
    # Unique (pair, present) triples; then a pair both present and absent keeps only present.
    triples = np.unique(pair * 2 + present)
    num_duplicates = int(keep.sum()) - len(triples)
    pair_u, present_u = triples // 2, triples % 2
    is_conflict = (present_u == 0) & np.isin(pair_u, pair_u[present_u == 1])
    pair_u, present_u = pair_u[~is_conflict], present_u[~is_conflict]
    label_image, label_label = pair_u // max(num_classes, 1), pair_u % max(num_classes, 1)
    dropped_labels = {
        "unknown_mid": labels["unknown_mid"],
        "class_not_selected": labels["class_not_selected"],
        "image_missing": int((label_status == _MISSING).sum()),
        "image_unreadable": int((label_status == _UNREADABLE).sum()),
        "duplicate": num_duplicates,
        "conflicting": int(is_conflict.sum()),
    }

    # 5. Kept images, in ImageID order; ranks give the order of boxes and labels in the file.
    num_touched = len(images)
    has_box = np.bincount(box_image, minlength=num_touched) > 0
    has_label = np.bincount(label_image, minlength=num_touched) > 0
    kept_images = np.flatnonzero((status == _OK) & (has_box | has_label))
    num_no_annotations = int(((status == _OK) & ~has_box & ~has_label).sum())
    keys = np.array(images.keys, dtype=object)[kept_images]
    order = np.argsort(keys.astype(str), kind="stable") if len(keys) else np.zeros(0, np.int64)
    kept_images, keys = kept_images[order], keys[order]
    num_images = len(kept_images)
    image_ids = image_ids_from_keys(list(keys))
    rank = np.full(num_touched, -1, dtype=np.int64)
    rank[kept_images] = np.arange(num_images)

    box_rank = rank[box_image]
    box_order = np.argsort(box_rank, kind="stable")  # stable: CSV order within an image
    box_rank = box_rank[box_order]
    box_start = np.searchsorted(box_rank, np.arange(num_images + 1))
    label_rank = rank[label_image]
    label_order = np.lexsort((label_label, label_rank))
    label_rank = label_rank[label_order]
    label_cat = (label_label[label_order] + 1).astype(np.int64)
    label_present = present_u[label_order].astype(bool)
    label_start = np.searchsorted(label_rank, np.arange(num_images + 1))

    # Rounded to 1e-6 px: removes float noise like 293.05753600000003 and keeps everything real.
    bx = np.round(x1[box_order], 6)
    by = np.round(y1[box_order], 6)
    bw = np.round(x2[box_order] - x1[box_order], 6)
    bh = np.round(y2[box_order] - y1[box_order], 6)
    barea = np.round(bw * bh, 6)
    bcat = box_label[box_order].astype(np.int64) + 1
    bflags = box_flags[box_order]
    biscrowd = (bflags[:, 2] == 1).astype(np.int64)
    bsource = box_source[box_order]
    sources = boxes["sources"]
    kept_w, kept_h = display_w[kept_images], display_h[kept_images]
    kept_orientation = headers["orientation"][kept_images]

    def image_records(a: int, b: int) -> List[Dict[str, Any]]:
        records = []
        lo, hi = label_start[a], label_start[b]
        cats, pres, starts = (
            label_cat[lo:hi].tolist(),
            label_present[lo:hi].tolist(),
            label_start[a : b + 1] - lo,
        )
        for j, i in enumerate(range(a, b)):
            s, e = starts[j], starts[j + 1]
            record = {
                "id": int(image_ids[i]),
                "file_name": f"{args.split}/{keys[i]}.jpg",
                "width": int(kept_w[i]),
                "height": int(kept_h[i]),
                "oid_image_id": keys[i],
                "verified_present": [c for c, p in zip(cats[s:e], pres[s:e]) if p],
                "verified_absent": [c for c, p in zip(cats[s:e], pres[s:e]) if not p],
            }
            if kept_orientation[i] != 1:
                record["exif_orientation"] = int(kept_orientation[i])
            records.append(record)
        return records

    def annotation_records(a: int, b: int) -> List[Dict[str, Any]]:
        lo, hi = int(box_start[a]), int(box_start[b])
        if lo == hi:
            return []
        img_ids = image_ids[box_rank[lo:hi]].tolist()
        columns = zip(
            range(lo + 1, hi + 1),
            img_ids,
            bcat[lo:hi].tolist(),
            bx[lo:hi].tolist(),
            by[lo:hi].tolist(),
            bw[lo:hi].tolist(),
            bh[lo:hi].tolist(),
            barea[lo:hi].tolist(),
            biscrowd[lo:hi].tolist(),
            bflags[lo:hi].tolist(),
            bsource[lo:hi].tolist(),
        )
        return [
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": crowd,
                "is_occluded": fl[0],
                "is_truncated": fl[1],
                "is_depiction": fl[3],
                "is_inside": fl[4],
                "source": sources[src],
            }
            for ann_id, image_id, cat, x, y, w, h, area, crowd, fl, src in columns
        ]

    annotation_file = os.path.join(dataset_root, "annotations", f"{args.split}.json")
    categories = [
        {"id": label + 1, "name": name, "mid": mid} for label, (name, mid) in enumerate(zip(names, mids))
    ]
    info = {
        "description": f"Open Images {args.split}, converted by prep/openimages.py",
        "boxes": os.path.basename(args.boxes),
        "image_labels": os.path.basename(args.image_labels) if args.image_labels else None,
        "class_descriptions": os.path.basename(args.class_descriptions),
    }
    timings["convert"] = time.perf_counter() - start
    start = time.perf_counter()
    write_annotations_streaming(
        annotation_file, categories, info, num_images, image_records, annotation_records
    )

    timings["write_json"] = time.perf_counter() - start

    # 6. Images folder, hierarchy, class bins.
    image_mode = link_or_copy_images(args.image_dir, image_target, [f"{k}.jpg" for k in keys], args.copy)
    hierarchy_file = None
    if hierarchy is not None:
        hierarchy_file = os.path.join(dataset_root, "hierarchy.json")
        with open(hierarchy_file, "w", encoding="utf-8") as f:
            json.dump(hierarchy, f, indent=1)

    boxes_per_class = np.bincount(bcat - 1, minlength=num_classes)
    bins = []
    if args.frequency_bins > 0:
        bin_dir = os.path.join(dataset_root, "class_bins")
        os.makedirs(bin_dir, exist_ok=True)
        for name in os.listdir(bin_dir):  # bins of an earlier run with more bins would linger
            if name.startswith("bin_") and name.endswith(".txt"):
                os.remove(os.path.join(bin_dir, name))
        for i, classes in enumerate(frequency_bins(boxes_per_class, args.frequency_bins)):
            bin_file = os.path.join(bin_dir, f"bin_{i}.txt")
            with open(bin_file, "w", encoding="utf-8") as f:
                f.write("".join(f"{mids[c]}\n" for c in classes))
            counts = boxes_per_class[classes]
            bins.append(
                {
                    "file": bin_file,
                    "mids": [mids[c] for c in classes],
                    "names": [names[c] for c in classes],
                    "min_boxes": int(counts.min()),
                    "max_boxes": int(counts.max()),
                    "num_boxes": int(counts.sum()),
                }
            )

    num_images_with_boxes = int(has_box[kept_images].sum())
    # Key names shared with the other converters (prep/common.py summarize) come first.
    summary = {
        "split": args.split,
        "output": annotation_file,
        "num_images": num_images,
        "num_images_without_boxes": num_images - num_images_with_boxes,
        "num_boxes": len(bx),
        "num_difficult": 0,
        "num_crowd": int(biscrowd.sum()),
        "boxes_per_class": {name: int(n) for name, n in zip(names, boxes_per_class)},
        "clipped_boxes": {"outside the image": num_clipped},
        "dropped_boxes": dropped_boxes,
        "skipped_images": {
            "image_missing": len(headers["missing"]),
            "image_unreadable": len(headers["unreadable"]),
            "all boxes degenerate": num_no_annotations,
        },
        "notes": {
            "EXIF orientation applied": int((kept_orientation != 1).sum()),
            "IsGroupOf unknown (iscrowd 0)": int((bflags[:, 2] == -1).sum()),
        },
        "examples": {
            "image_missing": headers["missing"][:5],
            "image_unreadable": [f"{path}: {error}" for path, error in headers["unreadable"][:5]],
        },
        # Open Images only.
        "num_classes": num_classes,
        "num_classes_without_boxes": int((boxes_per_class == 0).sum()),
        "num_verified_present": int(label_present.sum()),
        "num_verified_absent": int((~label_present).sum()),
        "dropped_labels": dropped_labels,
        "unknown_mids": dict(
            sorted(
                _merge_counts(boxes["unknown_mids"], labels["unknown_mids"]).items(), key=lambda kv: -kv[1]
            )
        ),
        "classes_not_in_hierarchy": not_in_hierarchy,
        "num_box_rows": boxes["num_rows"],
        "num_label_rows": labels["num_rows"],
        "box_rows_per_s": boxes["num_rows"] / max(boxes["seconds"], 1e-9),
        "box_rows_per_cpu_s": boxes["num_rows"] / max(boxes["cpu_seconds"], 1e-9),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "image_folder": image_target,
        "image_folder_mode": image_mode,
        "hierarchy_file": hierarchy_file,
        "class_bins": bins,
    }
    print_summary(summary, args.print_top)
    return {args.split: summary}


def stream_image_labels_empty() -> Dict[str, Any]:
    """The result of stream_image_labels without a labels file."""
    return {
        "image_index": np.zeros(0, np.int32),
        "label": np.zeros(0, np.int32),
        "present": np.zeros(0, np.int8),
        "num_rows": 0,
        "unknown_mid": 0,
        "unknown_mids": {},
        "class_not_selected": 0,
    }


def _merge_counts(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
    merged = dict(a)
    for key, n in b.items():
        merged[key] = merged.get(key, 0) + n
    return merged


def _format_counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in counts.items())


def print_summary(summary: Dict[str, Any], top: int) -> None:
    s = summary
    print(f"{s['split']}: {s['output']}")
    print(f"  image folder: {s['image_folder']} ({s['image_folder_mode']})")
    if s["hierarchy_file"]:
        print(f"  hierarchy: {s['hierarchy_file']}")
    print(
        f"  rows read: {s['num_box_rows']} boxes ({s['box_rows_per_s']:,.0f} rows/s, "
        f"{s['box_rows_per_cpu_s']:,.0f} per CPU second), {s['num_label_rows']} image labels"
    )
    print("  seconds: " + ", ".join(f"{k}={v:.1f}" for k, v in s["seconds"].items()))
    print(f"  images: {s['num_images']} ({s['num_images_without_boxes']} with verified labels only)")
    print(
        f"  boxes: {s['num_boxes']} (group-of (iscrowd=1) {s['num_crowd']}, "
        f"clipped to the image {s['clipped_boxes']['outside the image']})"
    )
    print(f"  dropped boxes: {_format_counts(s['dropped_boxes'])}")
    print(f"  skipped images: {_format_counts(s['skipped_images'])}")
    for reason, examples in s["examples"].items():
        for example in examples:
            print(f"    {reason}: {example}")
    print(f"  notes: {_format_counts(s['notes'])}")
    print(f"  verified labels: {s['num_verified_present']} present, {s['num_verified_absent']} absent")
    print(f"  dropped labels: {_format_counts(s['dropped_labels'])}")
    if s["unknown_mids"]:
        listed = list(s["unknown_mids"].items())[:10]
        print(f"  unknown MIDs ({len(s['unknown_mids'])}; rows): {_format_counts(dict(listed))}")
    if s["classes_not_in_hierarchy"]:
        print(f"  classes not in the hierarchy: {s['classes_not_in_hierarchy']}")
    ranked = sorted(s["boxes_per_class"].items(), key=lambda kv: -kv[1])
    print(
        f"  {s['num_classes']} classes ({s['num_classes_without_boxes']} without boxes); "
        f"top {min(top, len(ranked))} by boxes:"
    )
    width = max((len(name) for name, _ in ranked[:top]), default=0)
    for name, n in ranked[:top]:
        print(f"    {name:<{width}} {n}")
    for i, b in enumerate(s["class_bins"]):
        print(
            f"  bin {i}: {len(b['mids'])} classes, {b['min_boxes']}..{b['max_boxes']} boxes per class, "
            f"{b['num_boxes']} boxes -> {b['file']}"
        )


if __name__ == "__main__":
    run_cli(main, get_args_parser(add_help=True))
