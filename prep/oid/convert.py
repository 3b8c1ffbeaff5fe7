"""From the streamed CSV columns and the image headers to the records of the annotation file.

Every box row is counted under exactly one outcome, first match wins: ``unknown_mid`` (not in the
class descriptions), ``class_not_selected`` (both counted while streaming), ``image_missing``,
``image_unreadable``, ``degenerate`` (``keep_boxes``), else kept. Label rows likewise, with ``duplicate``
and ``conflicting`` (``keep_labels``) instead of ``degenerate``. Everything here is vectorised over the
rows; only the records of one chunk of images at a time become Python dicts (``image_records``,
``annotation_records``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from prep.oid.images import (
    IMAGE_MISSING,
    IMAGE_OK,
    IMAGE_UNREADABLE,
    apply_exif_orientation,
    image_ids_from_keys,
)

DROP_REASONS = ("unknown_mid", "class_not_selected", "image_missing", "image_unreadable")
BOX_DROP_REASONS = DROP_REASONS + ("degenerate",)
LABEL_DROP_REASONS = DROP_REASONS + ("duplicate", "conflicting")


def displayed_sizes(headers: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """(width, height) [M] of each image as displayed: orientations 5..8 swap the stored sides."""
    swap = headers["orientation"] >= 5
    return (
        np.where(swap, headers["height"], headers["width"]),
        np.where(swap, headers["width"], headers["height"]),
    )


def keep_boxes(boxes: Dict[str, Any], headers: Dict[str, Any]) -> Dict[str, Any]:
    """Boxes of readable images, oriented, clipped and denormalised; degenerate ones dropped.

    Args:
        boxes: ``stream_boxes``'s columns (normalised to the stored image).
        headers: ``read_image_headers``'s arrays [M], indexed by the boxes' ``image_index``.

    Returns:
        dict with the kept boxes' columns ``image_index``, ``label``, ``flags``, ``source_code`` (into
        ``sources``) and ``x1``, ``y1``, ``x2``, ``y2`` (float64, pixels of the displayed image),
        ``dropped`` (reason -> rows, ``BOX_DROP_REASONS`` in order) and ``num_clipped`` (kept boxes that
        reached outside the image).
    """
    box_status = headers["status"][boxes["image_index"]]
    keep = box_status == IMAGE_OK
    box_image = boxes["image_index"][keep]
    coords = boxes["coords"][keep]
    orientation = headers["orientation"][box_image]
    rotated = orientation != 1
    if rotated.any():
        coords = coords.copy()
        coords[rotated] = apply_exif_orientation(coords[rotated], orientation[rotated])
    outside = ((coords < 0) | (coords > 1)).any(axis=1)  # NaN is neither: dropped as degenerate below
    coords = np.clip(coords, 0.0, 1.0)
    display_w, display_h = displayed_sizes(headers)
    img_w, img_h = display_w[box_image], display_h[box_image]
    x1, x2 = coords[:, 0] * img_w, coords[:, 1] * img_w
    y1, y2 = coords[:, 2] * img_h, coords[:, 3] * img_h
    valid = (x2 > x1) & (y2 > y1)  # False for NaN too
    dropped = {
        "unknown_mid": boxes["unknown_mid"],
        "class_not_selected": boxes["class_not_selected"],
        "image_missing": int((box_status == IMAGE_MISSING).sum()),
        "image_unreadable": int((box_status == IMAGE_UNREADABLE).sum()),
        "degenerate": int((~valid).sum()),
    }
    return {
        "image_index": box_image[valid],
        "label": boxes["label"][keep][valid],
        "flags": boxes["flags"][keep][valid],
        "source_code": boxes["source_code"][keep][valid],
        "sources": boxes["sources"],
        "x1": x1[valid],
        "y1": y1[valid],
        "x2": x2[valid],
        "y2": y2[valid],
        "dropped": dropped,
        "num_clipped": int((outside & valid).sum()),
    }


def keep_labels(labels: Dict[str, Any], status: np.ndarray, num_classes: int) -> Dict[str, Any]:
    """Verified labels of readable images, each (image, class) once; present wins over absent.

    Args:
        labels: ``stream_image_labels``'s columns.
        status (ndarray[M]): the header read's status of each image.
        num_classes: K, the number of selected classes.

    Returns:
        dict with ``image_index``, ``label`` and ``present`` (0 / 1) of the kept labels, sorted by
        (image, label), and ``dropped`` (reason -> rows, ``LABEL_DROP_REASONS`` in order).
    """
    label_status = status[labels["image_index"]]
    keep = label_status == IMAGE_OK
    pair = labels["image_index"][keep].astype(np.int64) * max(num_classes, 1) + labels["label"][keep]
    present = labels["present"][keep]
    # Unique (pair, present) triples; then a pair both present and absent keeps only present.
    triples = np.unique(pair * 2 + present)
    num_duplicates = int(keep.sum()) - len(triples)
    pair_u, present_u = triples // 2, triples % 2
    is_conflict = (present_u == 0) & np.isin(pair_u, pair_u[present_u == 1])
    pair_u, present_u = pair_u[~is_conflict], present_u[~is_conflict]
    dropped = {
        "unknown_mid": labels["unknown_mid"],
        "class_not_selected": labels["class_not_selected"],
        "image_missing": int((label_status == IMAGE_MISSING).sum()),
        "image_unreadable": int((label_status == IMAGE_UNREADABLE).sum()),
        "duplicate": num_duplicates,
        "conflicting": int(is_conflict.sum()),
    }
    return {
        "image_index": pair_u // max(num_classes, 1),
        "label": pair_u % max(num_classes, 1),
        "present": present_u,
        "dropped": dropped,
    }


@dataclass
class SplitColumns:
    """The kept images [N] in ImageID order, their boxes [B] and verified labels [L] grouped by image.

    The boxes of image i are rows ``box_start[i]:box_start[i + 1]`` (CSV order within an image), its
    labels rows ``label_start[i]:label_start[i + 1]`` (by category). Boxes are xywh in pixels of the
    displayed image, rounded to 1e-6 px; categories are 1..K.
    """

    keys: np.ndarray  # object [N]: ImageID strings
    image_ids: np.ndarray  # int64 [N]
    width: np.ndarray  # int64 [N], displayed
    height: np.ndarray  # int64 [N], displayed
    orientation: np.ndarray  # int8 [N], EXIF 1..8
    has_box: np.ndarray  # bool [N]
    num_images_without_annotations: int  # readable images whose only boxes were degenerate (not kept)
    box_rank: np.ndarray  # int64 [B]: the image (0..N-1) of each box
    box_start: np.ndarray  # int64 [N + 1]
    box_xywh: np.ndarray  # float64 [B, 4]
    box_area: np.ndarray  # float64 [B]
    box_category: np.ndarray  # int64 [B]
    box_flags: np.ndarray  # int8 [B, 5]: occluded, truncated, group_of, depiction, inside (1 / 0 / -1)
    box_iscrowd: np.ndarray  # int64 [B]: group-of
    box_source: np.ndarray  # int16 [B]: index into sources
    sources: List[str]
    label_start: np.ndarray  # int64 [N + 1]
    label_category: np.ndarray  # int64 [L]
    label_present: np.ndarray  # bool [L]

    @property
    def num_images(self) -> int:
        return len(self.keys)

    @property
    def file_names(self) -> List[str]:
        return [f"{key}.jpg" for key in self.keys]

    def boxes_per_class(self, num_classes: int) -> np.ndarray:
        """int64 [K]: kept boxes of each class."""
        return np.bincount(self.box_category - 1, minlength=num_classes)


def order_by_image(
    keys: Sequence[str], headers: Dict[str, Any], boxes: Dict[str, Any], labels: Dict[str, Any]
) -> SplitColumns:
    """The images to write (readable, with a kept box or label) in ImageID order, boxes and labels with them.

    Args:
        keys (Sequence[str]): ImageID of each image index (``ImageIndex.keys``).
        headers: ``read_image_headers``'s arrays [M].
        boxes, labels: ``keep_boxes``'s and ``keep_labels``'s results.
    """
    status = headers["status"]
    num_touched = len(keys)
    has_box = np.bincount(boxes["image_index"], minlength=num_touched) > 0
    has_label = np.bincount(labels["image_index"], minlength=num_touched) > 0
    kept_images = np.flatnonzero((status == IMAGE_OK) & (has_box | has_label))
    num_no_annotations = int(((status == IMAGE_OK) & ~has_box & ~has_label).sum())
    kept_keys = np.array(keys, dtype=object)[kept_images]
    order = np.argsort(kept_keys.astype(str), kind="stable") if len(kept_keys) else np.zeros(0, np.int64)
    kept_images, kept_keys = kept_images[order], kept_keys[order]
    num_images = len(kept_images)
    rank = np.full(num_touched, -1, dtype=np.int64)
    rank[kept_images] = np.arange(num_images)

    box_rank = rank[boxes["image_index"]]
    box_order = np.argsort(box_rank, kind="stable")  # stable: CSV order within an image
    box_rank = box_rank[box_order]
    label_rank = rank[labels["image_index"]]
    label_order = np.lexsort((labels["label"], label_rank))
    label_rank = label_rank[label_order]

    # Rounded to 1e-6 px: removes float noise like 293.05753600000003 and keeps everything real.
    x1, y1 = boxes["x1"][box_order], boxes["y1"][box_order]
    x2, y2 = boxes["x2"][box_order], boxes["y2"][box_order]
    bw, bh = np.round(x2 - x1, 6), np.round(y2 - y1, 6)
    box_flags = boxes["flags"][box_order]
    display_w, display_h = displayed_sizes(headers)
    return SplitColumns(
        keys=kept_keys,
        image_ids=image_ids_from_keys(list(kept_keys)),
        width=display_w[kept_images],
        height=display_h[kept_images],
        orientation=headers["orientation"][kept_images],
        has_box=has_box[kept_images],
        num_images_without_annotations=num_no_annotations,
        box_rank=box_rank,
        box_start=np.searchsorted(box_rank, np.arange(num_images + 1)),
        box_xywh=np.stack([np.round(x1, 6), np.round(y1, 6), bw, bh], axis=1),
        box_area=np.round(bw * bh, 6),
        box_category=boxes["label"][box_order].astype(np.int64) + 1,
        box_flags=box_flags,
        box_iscrowd=(box_flags[:, 2] == 1).astype(np.int64),
        box_source=boxes["source_code"][box_order],
        sources=boxes["sources"],
        label_start=np.searchsorted(label_rank, np.arange(num_images + 1)),
        label_category=(labels["label"][label_order] + 1).astype(np.int64),
        label_present=labels["present"][label_order].astype(bool),
    )


def image_records(cols: SplitColumns, split: str, a: int, b: int) -> List[Dict[str, Any]]:
    """The common format's image records of images a..b-1 (``file_name`` = ``<split>/<ImageID>.jpg``)."""
    records = []
    lo, hi = cols.label_start[a], cols.label_start[b]
    cats, pres, starts = (
        cols.label_category[lo:hi].tolist(),
        cols.label_present[lo:hi].tolist(),
        cols.label_start[a : b + 1] - lo,
    )
    for j, i in enumerate(range(a, b)):
        s, e = starts[j], starts[j + 1]
        key = cols.keys[i]
        record = {
            "id": int(cols.image_ids[i]),
            "file_name": f"{split}/{key}.jpg",
            "width": int(cols.width[i]),
            "height": int(cols.height[i]),
            "oid_image_id": key,
            "verified_present": [c for c, p in zip(cats[s:e], pres[s:e]) if p],
            "verified_absent": [c for c, p in zip(cats[s:e], pres[s:e]) if not p],
        }
        if cols.orientation[i] != 1:
            record["exif_orientation"] = int(cols.orientation[i])
        records.append(record)
    return records


def annotation_records(cols: SplitColumns, a: int, b: int) -> List[Dict[str, Any]]:
    """The common format's annotation records of the boxes of images a..b-1 (ids: 1-based box rows)."""
    lo, hi = int(cols.box_start[a]), int(cols.box_start[b])
    if lo == hi:
        return []
    columns = zip(
        range(lo + 1, hi + 1),
        cols.image_ids[cols.box_rank[lo:hi]].tolist(),
        cols.box_category[lo:hi].tolist(),
        cols.box_xywh[lo:hi].tolist(),
        cols.box_area[lo:hi].tolist(),
        cols.box_iscrowd[lo:hi].tolist(),
        cols.box_flags[lo:hi].tolist(),
        cols.box_source[lo:hi].tolist(),
    )
    sources = cols.sources
    return [
        {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": bbox,
            "area": area,
            "iscrowd": crowd,
            "is_occluded": fl[0],
            "is_truncated": fl[1],
            "is_depiction": fl[3],
            "is_inside": fl[4],
            "source": sources[src],
        }
        for ann_id, image_id, cat, bbox, area, crowd, fl, src in columns
    ]
