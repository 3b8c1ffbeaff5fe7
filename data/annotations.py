"""Load, validate and save the common annotation format (COCO-style JSON, one file per split).

Every dataset is converted (by the scripts in ``prep/``) to
``<data_root>/<dataset>/annotations/<split>.json``:

- ``images``: ``id`` (int), ``file_name`` (relative to ``<data_root>/<dataset>/``), ``width``, ``height``
  (pixels, > 0), plus optional extra fields (Open Images ``verified_present`` / ``verified_absent``).
- ``annotations``: ``id``, ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in absolute pixels
  (continuous coordinates, ``0 <= x <= x + w <= width``), ``area``, ``iscrowd`` (0/1), optional
  ``difficult`` (0/1, default 0), plus optional extra fields kept as they are.
- ``categories``: ``id`` (the original id, kept so that COCO results can be written), ``name``. The
  POSITION of a category in this list is its training label (0..K-1).

``validate_annotations`` reports every problem it finds, each naming the file and the record, so a
broken file is fixed in one pass rather than one error at a time. ``load_annotations`` raises a
``ValueError`` listing them. Boxes may exceed the image by ``BOX_TOLERANCE`` pixels: converters clip
exactly, but float rounding of ``x + w`` (and COCO's own boxes) can land a hair past the border.
Zero-width or zero-height boxes are accepted here (converters drop them and count them); negative,
non-finite or non-numeric sizes are not.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from typing import Any, Dict, Iterable, List

import numpy as np

from utils.errors import UserError

logger = logging.getLogger(__name__)

REQUIRED_IMAGE_FIELDS = ("id", "file_name", "width", "height")
REQUIRED_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
REQUIRED_CATEGORY_FIELDS = ("id", "name")

# Pixels a box may extend past the image border before it counts as "outside the image".
BOX_TOLERANCE = 1.0

# load_annotations lists at most this many problems in its error message.
MAX_LISTED_PROBLEMS = 20


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `true` as an id is a bug in the file, not an id.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _record_name(section: str, index: int, record: Any) -> str:
    """'image id=7' when the record has a usable id, else its position: 'images[3]'."""
    if isinstance(record, dict) and _is_int(record.get("id")):
        return f"{section[:-1] if section != 'categories' else 'category'} id={record['id']}"
    return f"{section}[{index}]"


def _missing_fields(record: Any, required: tuple) -> List[str]:
    if not isinstance(record, dict):
        return list(required)
    return [f for f in required if f not in record]


def _check_ids(section: str, records: List[Any], problems: List[str], source: str) -> Dict[int, Any]:
    """Index the records of one section by id, reporting ids that are not ints or repeat."""
    by_id: Dict[int, Any] = {}
    duplicates: Dict[int, int] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record:
            continue  # reported as a missing field by the caller
        record_id = record["id"]
        if not _is_int(record_id):
            problems.append(f"{source}: {section}[{i}]: id must be an integer, got {record_id!r}")
            continue
        if record_id in by_id:
            duplicates[record_id] = duplicates.get(record_id, 1) + 1
        else:
            by_id[record_id] = record
    for record_id, count in duplicates.items():
        name = _record_name(section, 0, {"id": record_id})
        problems.append(f"{source}: {name}: duplicate id ({count} {section} share it)")
    return by_id


def _check_images(images: List[Any], problems: List[str], source: str) -> None:
    for i, image in enumerate(images):
        name = _record_name("images", i, image)
        missing = _missing_fields(image, REQUIRED_IMAGE_FIELDS)
        if not isinstance(image, dict):
            problems.append(f"{source}: {name}: expected an object, got {type(image).__name__}")
            continue
        if missing:
            problems.append(f"{source}: {name}: missing required field(s) {', '.join(missing)}")
        file_name = image.get("file_name")
        if "file_name" in image and (not isinstance(file_name, str) or not file_name):
            problems.append(f"{source}: {name}: file_name must be a non-empty string, got {file_name!r}")
        elif isinstance(file_name, str) and os.path.isabs(file_name):
            problems.append(
                f"{source}: {name}: file_name must be relative to the dataset folder, "
                f"got the absolute path {file_name!r}"
            )
        for key in ("width", "height"):
            if key in image and not (_is_finite_number(image[key]) and image[key] > 0):
                problems.append(f"{source}: {name}: {key} must be a finite number > 0, got {image[key]!r}")


def _check_file_names(images: List[Any], problems: List[str], source: str) -> None:
    """One record per image file: a file listed under two ids trains twice (once as background, when
    one record has no box) and is scored twice."""
    ids_of: Dict[str, List[Any]] = {}
    for i, image in enumerate(images):
        if isinstance(image, dict) and isinstance(image.get("file_name"), str) and image["file_name"]:
            ids_of.setdefault(os.path.normpath(image["file_name"]), []).append(
                image.get("id", f"images[{i}]")
            )
    for file_name, ids in ids_of.items():
        if len(ids) > 1:
            problems.append(
                f"{source}: image file {file_name!r} is listed {len(ids)} times (image ids "
                f"{', '.join(map(repr, ids[:5]))}): merge them into one image record with all its boxes"
            )


def _check_categories(categories: List[Any], problems: List[str], source: str) -> None:
    for i, category in enumerate(categories):
        name = _record_name("categories", i, category)
        if not isinstance(category, dict):
            problems.append(f"{source}: {name}: expected an object, got {type(category).__name__}")
            continue
        missing = _missing_fields(category, REQUIRED_CATEGORY_FIELDS)
        if missing:
            problems.append(f"{source}: {name}: missing required field(s) {', '.join(missing)}")
        elif not isinstance(category["name"], str) or not category["name"].strip():
            problems.append(f"{source}: {name}: name must be a non-empty string, got {category['name']!r}")


def _check_bbox(bbox: Any, image: Any, name: str, problems: List[str], source: str) -> None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        problems.append(f"{source}: {name}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        return
    if not all(math.isfinite(v) for v in bbox):
        problems.append(f"{source}: {name}: bbox has non-finite values {bbox!r}")
        return
    x, y, w, h = bbox
    if w < 0 or h < 0:
        problems.append(f"{source}: {name}: bbox has negative width or height {bbox!r}")
        return
    if not isinstance(image, dict):
        return
    width, height = image.get("width"), image.get("height")
    if not (_is_finite_number(width) and _is_finite_number(height)):
        return  # the image's own problem is reported with the image
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        problems.append(
            f"{source}: {name}: bbox {bbox!r} lies outside image id={image['id']} "
            f"({width} x {height}) by more than {tol:g} px"
        )


def _check_annotations(
    annotations: List[Any],
    images_by_id: Dict[int, Any],
    categories_by_id: Dict[int, Any],
    problems: List[str],
    source: str,
) -> None:
    for i, ann in enumerate(annotations):
        name = _record_name("annotations", i, ann)
        if not isinstance(ann, dict):
            problems.append(f"{source}: {name}: expected an object, got {type(ann).__name__}")
            continue
        missing = _missing_fields(ann, REQUIRED_ANNOTATION_FIELDS)
        if missing:
            problems.append(f"{source}: {name}: missing required field(s) {', '.join(missing)}")
        image = None
        if "image_id" in ann:
            image = images_by_id.get(ann["image_id"]) if _is_int(ann["image_id"]) else None
            if image is None:
                problems.append(f"{source}: {name}: unknown image_id {ann['image_id']!r}")
        if "category_id" in ann:
            known = _is_int(ann["category_id"]) and ann["category_id"] in categories_by_id
            if not known:
                problems.append(f"{source}: {name}: unknown category_id {ann['category_id']!r}")
        if "bbox" in ann:
            _check_bbox(ann["bbox"], image, name, problems, source)
        if "area" in ann and not (_is_finite_number(ann["area"]) and ann["area"] >= 0):
            problems.append(f"{source}: {name}: area must be a finite number >= 0, got {ann['area']!r}")
        for key in ("iscrowd", "difficult"):
            if key in ann and ann[key] not in (0, 1):  # True/False compare equal to 1/0 and pass
                problems.append(f"{source}: {name}: {key} must be 0 or 1, got {ann[key]!r}")


def _types_are(values: Iterable[Any], allowed: tuple) -> bool:
    return set(map(type, values)) <= set(allowed)


def _looks_valid(images: List[Any], annotations: List[Any], categories: List[Any]) -> bool:
    """Vectorised all-or-nothing version of the checks below: True only if none of them would fail.

    The per-record checks cost microseconds per box, which is minutes for Open Images; a valid
    file (the usual case) is accepted here in a fraction of that, and only a file with problems
    goes through the slow path that names them.
    """
    # A missing field or a record that is not an object raises here (KeyError, TypeError, ...);
    # the caller takes any exception as "not valid" and runs the detailed checks.
    image_ids = [r["id"] for r in images]
    file_names = [r["file_name"] for r in images]
    image_whs = [(r["width"], r["height"]) for r in images]
    category_ids = [r["id"] for r in categories]
    if not all(isinstance(r["name"], str) and r["name"].strip() for r in categories):
        return False
    ann_ids = [r["id"] for r in annotations]
    ann_image_ids = [r["image_id"] for r in annotations]
    ann_category_ids = [r["category_id"] for r in annotations]
    bboxes = [r["bbox"] for r in annotations]
    areas = [r["area"] for r in annotations]
    flags = [r["iscrowd"] for r in annotations] + [r.get("difficult", 0) for r in annotations]
    if not (
        _types_are(image_ids, (int,))
        and _types_are(category_ids, (int,))
        and _types_are(ann_ids, (int,))
        and _types_are(ann_image_ids, (int,))
        and _types_are(ann_category_ids, (int,))
        and _types_are(file_names, (str,))
        and _types_are(itertools.chain.from_iterable(image_whs), (int, float))
        and _types_are(areas, (int, float))
        and _types_are(bboxes, (list,))
        and _types_are(itertools.chain.from_iterable(bboxes), (int, float))
        and set(flags) <= {0, 1}
    ):
        return False
    if not all(file_names) or any(map(os.path.isabs, file_names)):
        return False
    # One record per file; names that normpath would change ("a//b", "./a") go to the detailed check.
    if len(set(file_names)) != len(file_names) or any(
        "//" in n or "./" in n or n.endswith("/") for n in file_names
    ):
        return False
    for ids in (image_ids, category_ids, ann_ids):
        if len(set(ids)) != len(ids):
            return False

    image_whs_arr = np.asarray(image_whs, dtype=np.float64).reshape(-1, 2)
    if not (np.isfinite(image_whs_arr).all() and (image_whs_arr > 0).all()):
        return False
    boxes = np.asarray(bboxes, dtype=np.float64)  # [M, 4] xywh; ragged lists raise ValueError
    if len(bboxes) and boxes.shape != (len(bboxes), 4):
        return False
    boxes = boxes.reshape(-1, 4)
    areas_arr = np.asarray(areas, dtype=np.float64)
    if not (np.isfinite(boxes).all() and (boxes[:, 2:] >= 0).all()):
        return False
    if not (np.isfinite(areas_arr).all() and (areas_arr >= 0).all()):
        return False
    if not set(ann_category_ids) <= set(category_ids):
        return False
    # Look every box's image up by id: position of its image_id among the sorted image ids.
    image_ids_arr = np.asarray(image_ids, dtype=np.int64)
    order = np.argsort(image_ids_arr)
    sorted_ids = image_ids_arr[order]
    ann_image_ids_arr = np.asarray(ann_image_ids, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ann_image_ids_arr).clip(max=max(len(sorted_ids) - 1, 0))
    if len(ann_image_ids_arr) and (len(sorted_ids) == 0 or (sorted_ids[pos] != ann_image_ids_arr).any()):
        return False
    whs = image_whs_arr[order[pos]] if len(ann_image_ids_arr) else np.zeros((0, 2))  # [M, 2]
    tol = BOX_TOLERANCE
    inside = (boxes[:, :2] >= -tol).all(1) & (boxes[:, :2] + boxes[:, 2:] <= whs + tol).all(1)
    return bool(inside.all())


def validate_annotations(coco: Dict[str, Any], source: str) -> List[str]:
    """Check a dict in the common format and return every problem found (empty list: valid).

    Args:
        coco (dict): parsed annotation file with ``images``, ``annotations`` and ``categories``.
        source (str): the file name to put in front of every message.

    Returns:
        list[str]: one message per problem, e.g. ``"train.json: annotation id=12: unknown image_id 99"``.
        Detected: missing sections or required fields, ids that are not integers, duplicate ids,
        unknown ``image_id`` / ``category_id``, non-finite or non-positive image sizes, bboxes that
        are not 4 finite numbers, negative box width/height, boxes outside the image by more than
        ``BOX_TOLERANCE`` px, negative area, ``iscrowd`` / ``difficult`` not 0/1, absolute file names,
        an image file listed by more than one image record.
    """
    if not isinstance(coco, dict):
        return [f"{source}: expected a JSON object at the top level, got {type(coco).__name__}"]
    problems: List[str] = []
    sections = {}
    for section in ("images", "annotations", "categories"):
        value = coco.get(section)
        if not isinstance(value, list):
            problems.append(f"{source}: missing or non-list top-level field {section!r}")
            value = []
        sections[section] = value

    if not problems:
        try:
            valid = _looks_valid(sections["images"], sections["annotations"], sections["categories"])
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError):
            valid = False
        if valid:
            return []
    _check_images(sections["images"], problems, source)
    _check_categories(sections["categories"], problems, source)
    _check_file_names(sections["images"], problems, source)
    images_by_id = _check_ids("images", sections["images"], problems, source)
    categories_by_id = _check_ids("categories", sections["categories"], problems, source)
    _check_ids("annotations", sections["annotations"], problems, source)
    _check_annotations(sections["annotations"], images_by_id, categories_by_id, problems, source)
    return problems


def format_problems(problems: List[str], source: str, limit: int = MAX_LISTED_PROBLEMS) -> str:
    """One message for a ValueError: the file, the number of problems, the first ``limit`` of them."""
    lines = [f"{source}: {len(problems)} problem(s) in the annotation file:"]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def load_annotations(path: str) -> Dict[str, Any]:
    """Read and validate an annotation file in the common format.

    Args:
        path (str): ``<data_root>/<dataset>/annotations/<split>.json``.

    Returns:
        dict: the parsed file (``images``, ``annotations``, ``categories``, and whatever else it holds).

    Raises:
        ValueError: the file is missing, is not valid JSON, or fails ``validate_annotations``; the
        message names the file and lists up to ``MAX_LISTED_PROBLEMS`` problems with their record ids.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: annotation file not found (convert the dataset with a script in prep/)")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid JSON annotation file: {e}") from e
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"{path}: cannot read the annotation file: {e.strerror or e}") from e
    problems = validate_annotations(coco, path)
    if problems:
        raise UserError(format_problems(problems, path))
    return coco


def save_annotations(coco: Dict[str, Any], path: str, validate: bool = True) -> None:
    """Write an annotation file atomically (temp file in the same folder, then ``os.replace``).

    A reader never sees a half-written file, and an interrupted conversion leaves the previous file
    in place. Missing parent folders are created.

    Args:
        coco (dict): annotations in the common format.
        path (str): output file.
        validate (bool): refuse to write (``ValueError`` listing the problems) a file that
            ``load_annotations`` would reject.
    """
    if validate:
        problems = validate_annotations(coco, path)
        if problems:
            raise UserError(format_problems(problems, path))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Same folder as the target so that os.replace is a rename, not a copy across file systems.
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "w", encoding="utf-8") as f:
            # Compact separators: COCO/Open Images files are large, indentation would double them.
            json.dump(coco, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except ValueError as e:  # json.dump met NaN/inf in a field that validation does not look at
        raise UserError(f"{path}: cannot write the annotations: {e}") from e
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    logger.info("wrote %s (%d images, %d boxes)", path, len(coco["images"]), len(coco["annotations"]))
