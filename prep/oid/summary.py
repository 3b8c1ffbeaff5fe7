"""The summary of a converted Open Images split: the dict ``main`` returns, and its printed form."""

from __future__ import annotations

from typing import Any, Dict, List

from prep.oid.classes import SelectedClasses
from prep.oid.convert import SplitColumns


def build_summary(
    *,
    split: str,
    annotation_file: str,
    classes: SelectedClasses,
    not_in_hierarchy: List[str],
    boxes: Dict[str, Any],
    labels: Dict[str, Any],
    headers: Dict[str, Any],
    kept_boxes: Dict[str, Any],
    kept_labels: Dict[str, Any],
    cols: SplitColumns,
    timings: Dict[str, float],
    outputs: Dict[str, Any],
) -> Dict[str, Any]:
    """Counts of every outcome, from the stages' results.

    Args:
        boxes, labels: ``stream_boxes`` / ``stream_image_labels``; headers: ``read_image_headers``;
        kept_boxes, kept_labels: ``keep_boxes`` / ``keep_labels``; cols: ``order_by_image``.
        timings: seconds per stage. outputs: image_folder, image_folder_mode, hierarchy_file, class_bins.

    Returns:
        dict: the keys of ``prep.common.summarize`` first (split, output, num_images, ..., examples),
        then the Open Images ones (verified labels, dropped labels, unknown MIDs, rows and rates, seconds)
        and ``outputs``.
    """
    boxes_per_class = cols.boxes_per_class(classes.num_classes)
    num_images_with_boxes = int(cols.has_box.sum())
    # Key names shared with the other converters (prep/common.py summarize) come first.
    return {
        "split": split,
        "output": annotation_file,
        "num_images": cols.num_images,
        "num_images_without_boxes": cols.num_images - num_images_with_boxes,
        "num_boxes": len(cols.box_category),
        "num_difficult": 0,
        "num_crowd": int(cols.box_iscrowd.sum()),
        "boxes_per_class": {name: int(n) for name, n in zip(classes.names, boxes_per_class)},
        "clipped_boxes": {"outside the image": kept_boxes["num_clipped"]},
        "dropped_boxes": kept_boxes["dropped"],
        "skipped_images": {
            "image_missing": len(headers["missing"]),
            "image_unreadable": len(headers["unreadable"]),
            "all boxes degenerate": cols.num_images_without_annotations,
        },
        "notes": {
            "EXIF orientation applied": int((cols.orientation != 1).sum()),
            "IsGroupOf unknown (iscrowd 0)": int((cols.box_flags[:, 2] == -1).sum()),
        },
        "examples": {
            "image_missing": headers["missing"][:5],
            "image_unreadable": [f"{path}: {error}" for path, error in headers["unreadable"][:5]],
        },
        # Open Images only.
        "num_classes": classes.num_classes,
        "num_classes_without_boxes": int((boxes_per_class == 0).sum()),
        "num_verified_present": int(cols.label_present.sum()),
        "num_verified_absent": int((~cols.label_present).sum()),
        "dropped_labels": kept_labels["dropped"],
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
        **outputs,
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
