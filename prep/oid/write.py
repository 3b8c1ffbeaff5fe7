"""Writing a converted Open Images split: the annotation JSON, a chunk of images at a time, the hierarchy
and the class bins."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from typing import Any, Dict, List

import numpy as np

from data.annotations import format_problems, validate_annotations
from prep.oid.classes import SelectedClasses
from prep.oid.convert import SplitColumns, annotation_records, image_records
from utils.errors import UserError

# Images per chunk of the JSON writer and per validation call (about 35K boxes of OID train: ~50 MB of dicts).
_WRITE_CHUNK = 4096


def write_annotation_file(
    path: str, cols: SplitColumns, classes: SelectedClasses, split: str, info: Dict[str, Any]
) -> None:
    """The common-format annotation file of the converted split (see ``write_annotations_streaming``)."""
    categories = [
        {"id": label + 1, "name": name, "mid": mid}
        for label, (name, mid) in enumerate(zip(classes.names, classes.mids))
    ]
    write_annotations_streaming(
        path,
        categories,
        info,
        cols.num_images,
        partial(image_records, cols, split),
        partial(annotation_records, cols),
    )


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


def write_hierarchy(dataset_root: str, hierarchy: Any) -> str | None:
    """``<dataset_root>/hierarchy.json``, the ``--hierarchy`` JSON (None: nothing written, None returned)."""
    if hierarchy is None:
        return None
    hierarchy_file = os.path.join(dataset_root, "hierarchy.json")
    with open(hierarchy_file, "w", encoding="utf-8") as f:
        json.dump(hierarchy, f, indent=1)
    return hierarchy_file


def write_class_bins(
    dataset_root: str, boxes_per_class: np.ndarray, classes: SelectedClasses, num_bins: int
) -> List[Dict[str, Any]]:
    """``--frequency_bins``: ``<dataset_root>/class_bins/bin_<i>.txt``, the MIDs of bin i one per line.

    Returns one dict per bin (file, mids, names, min_boxes, max_boxes, num_boxes); none when num_bins is 0.
    """
    bins: List[Dict[str, Any]] = []
    if num_bins <= 0:
        return bins
    mids, names = classes.mids, classes.names
    bin_dir = os.path.join(dataset_root, "class_bins")
    os.makedirs(bin_dir, exist_ok=True)
    for name in os.listdir(bin_dir):  # bins of an earlier run with more bins would linger
        if name.startswith("bin_") and name.endswith(".txt"):
            os.remove(os.path.join(bin_dir, name))
    for i, members in enumerate(frequency_bins(boxes_per_class, num_bins)):
        bin_file = os.path.join(bin_dir, f"bin_{i}.txt")
        with open(bin_file, "w", encoding="utf-8") as f:
            f.write("".join(f"{mids[c]}\n" for c in members))
        counts = boxes_per_class[members]
        bins.append(
            {
                "file": bin_file,
                "mids": [mids[c] for c in members],
                "names": [names[c] for c in members],
                "min_boxes": int(counts.min()),
                "max_boxes": int(counts.max()),
                "num_boxes": int(counts.sum()),
            }
        )
    return bins
