"""One VOC XML file: parse it, and turn its image and objects into common-format records.

The conventions (1-based inclusive boxes to continuous pixels, what is clipped, dropped, skipped or
noted, and why) are documented in prep/voc.py, which converts devkits and folders with these functions.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, List

from prep.common import (
    TINY_BOX_SIZE,
    ConversionReport,
    case_variants,
    checked_image_size,
    find_images,
    is_tiny_box,
)
from utils.errors import UserError

logger = logging.getLogger(__name__)

BOX_CONVENTION = "xywh continuous px; from VOC 1-based inclusive: x1 = xmin - 1, x2 = xmax"


def _text(element: ET.Element | None, tag: str) -> str | None:
    child = element.find(tag) if element is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_voc_xml(path: str) -> Dict[str, Any]:
    """Read one VOC XML file.

    Returns:
        dict with ``filename`` (str or None), ``size`` ((width, height) ints, or None when missing
        or below 1) and ``objects``: list of dicts with ``name`` (str or None), ``difficult``
        (0/1, or None when missing) and ``box`` ((xmin, ymin, xmax, ymax) floats as written,
        1-based inclusive, or None when missing or unreadable).

    Raises:
        ValueError: naming the file, when it is not readable XML.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise UserError(f"{path}: cannot parse the XML: {e}") from e
    size = root.find("size")
    width, height = _number(_text(size, "width")), _number(_text(size, "height"))
    objects = []
    for obj in root.findall("object"):
        difficult = _number(_text(obj, "difficult"))
        bndbox = obj.find("bndbox")  # direct child only: person-layout <part>s have their own boxes
        coords = [_number(_text(bndbox, tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        objects.append(
            {
                "name": _text(obj, "name"),
                "difficult": None if difficult is None else int(difficult != 0),
                "box": None if None in coords else tuple(coords),
            }
        )
    return {
        "filename": _text(root, "filename"),
        "size": (round(width), round(height)) if width and height and width >= 1 and height >= 1 else None,
        "objects": objects,
    }


def convert_objects(
    objects: List[Dict[str, Any]],
    width: int,
    height: int,
    class_to_category_id: Dict[str, int],
    unknown_class_reason: str,
    report: ConversionReport,
    where: str,
    tiny_boxes: str = "keep",
) -> List[Dict[str, Any]]:
    """VOC objects of one image -> annotation records without ``id`` / ``image_id``.

    Boxes go from 1-based inclusive (xmin..xmax) to continuous xywh (x = xmin - 1, w = xmax - xmin + 1),
    are clipped to [0, width] x [0, height], and every box clipped or dropped is counted in ``report``.
    Boxes of at most ``TINY_BOX_SIZE`` px on a side are kept (noted) or dropped (``tiny_boxes="drop"``).
    ``where`` (the XML file) names the image in the report's examples.
    """
    annotations = []
    known_folded = {known.casefold(): known for known in class_to_category_id}
    for obj in objects:
        name = obj["name"]
        if name not in class_to_category_id:
            near = known_folded.get(name.casefold()) if name is not None else None
            reason = f"{unknown_class_reason} (differs only in case from a known class)" if near else None
            report.drop_box(
                reason or unknown_class_reason, f"{where}: {name!r}" + (f" ~ {near!r}" if near else "")
            )
            continue
        if obj["box"] is None:
            report.drop_box("missing or unreadable <bndbox>", where)
            continue
        xmin, ymin, xmax, ymax = obj["box"]
        x1, y1, x2, y2 = xmin - 1.0, ymin - 1.0, xmax, ymax
        if x2 <= x1 or y2 <= y1:
            report.drop_box("non-positive size (xmax < xmin or ymax < ymin)", where)
            continue
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            if cx2 <= cx1 or cy2 <= cy1:
                report.drop_box("zero area after clipping", where)
                continue
            report.clip_box("outside the image", where)
        w, h = cx2 - cx1, cy2 - cy1
        if is_tiny_box(w, h):
            example = f"{where}: {name!r} {obj['box']}"
            if tiny_boxes == "drop":
                report.drop_box(f"at most {TINY_BOX_SIZE:g} px wide or high (--tiny_boxes drop)", example)
                continue
            report.note(f"box at most {TINY_BOX_SIZE:g} px wide or high (kept; --tiny_boxes drop)", example)
        if obj["difficult"] is None:
            report.note("missing <difficult> (taken as 0)", where)
        annotations.append(
            {
                "category_id": class_to_category_id[name],
                "bbox": [cx1, cy1, w, h],
                "area": w * h,
                "iscrowd": 0,
                "difficult": obj["difficult"] or 0,
            }
        )
    return annotations


def find_image_file(
    image_dir: str, stem: str, names_in_dir: set, xml_path: str, report: ConversionReport
) -> str | None:
    """The image file of ``stem``; several (a.jpg and a.png) are noted and the first is used."""
    found = find_images(image_dir, stem, names_in_dir)
    if len(found) > 1:
        logger.warning("%s: several image files %s; using %s", xml_path, found, found[0])
        report.note("several image files for one XML (the first used)", f"{xml_path}: {', '.join(found)}")
    return found[0] if found else None


def image_record(
    parsed: Dict[str, Any],
    xml_path: str,
    image_path: str,
    image_id: int,
    file_name: str,
    report: ConversionReport,
) -> Dict[str, Any] | None:
    """The image record, of the size read from the image's header; None (counted) when the image cannot
    be read or is not of the size ``<size>`` gives."""
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    if parsed["filename"] is not None and os.path.splitext(os.path.basename(parsed["filename"]))[0] != stem:
        report.note("<filename> disagrees with the XML name", f"{xml_path}: {parsed['filename']!r}")
    size = checked_image_size(image_path, parsed["size"], report, xml_path, "<size> differs from the image")
    if size is None:
        return None
    if parsed["size"] is None:
        report.note("no valid <size>: size read from the image", xml_path)
    return {"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]}


def warn_case_variants(names: List[str], report: ConversionReport, where: str) -> None:
    """Class names that differ only in case ("Cat", "cat") are separate classes: warn and note them."""
    for group in case_variants(names):
        logger.warning("%s: class names %s differ only in case; they are separate classes", where, group)
        report.note("class names that differ only in case (separate classes)", " / ".join(map(repr, group)))
