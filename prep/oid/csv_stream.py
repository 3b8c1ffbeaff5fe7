"""Streaming the Open Images CSVs: boxes and human-verified image-level labels.

A row becomes a few numbers in ``array.array`` columns (about 45 bytes per kept box) and nothing else
is kept per row (the train split has about 14M box rows). Rows of classes that are not
selected, or of MIDs the class descriptions lack, are only counted. Rows are split on commas: quoted
fields are not supported (the box and label files have none), and a row whose field count differs from
the header's is an error naming the file and line.
"""

from __future__ import annotations

import array
import operator
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from utils.errors import UserError

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
BOX_OPTIONAL_COLUMNS = ("Source", "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")

# Flag values as written in the CSV; "" is what an absent optional column reads as.
_FLAG_VALUES = {"0": 0, "1": 1, "-1": -1, "": -1}


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


class ImageIndex:
    """ImageID string -> dense index, in order of first appearance."""

    def __init__(self):
        self.index: Dict[str, int] = {}
        self.keys: List[str] = []

    def __len__(self) -> int:
        return len(self.keys)


def stream_boxes(path: str, label_of_mid: Dict[str, int], images: ImageIndex) -> Dict[str, Any]:
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


def stream_image_labels(path: str, label_of_mid: Dict[str, int], images: ImageIndex) -> Dict[str, Any]:
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
