"""Helpers shared by the dataset converters in ``prep/``.

- ``ConversionReport`` counts, by reason, every box a converter clips or drops, every image it
  skips, and notes about records kept as they are (a ``<filename>`` that disagrees, a size read from
  the image). Converters never drop anything without counting it here.
- ``summarize`` turns the converted annotations and the report into the summary dict that the
  converters print (``format_summary``) and return from ``main(args)``.
- ``link_or_copy`` puts an image folder inside ``<data_root>/<dataset>/`` so the dataset folder
  stands alone; ``read_image_size`` reads an image's size from its header.
- Checks every converter makes the same way: ``checked_image_size`` reads each image's header
  (readable, complete, and of the size the annotation file gives), ``find_images`` lists every image
  file of a stem (a.jpg and a.png: which one is meant?), ``case_variants`` finds class names that
  differ only in case, ``is_tiny_box`` flags boxes of at most ``TINY_BOX_SIZE`` px on a side.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from typing import Any, Dict, List, Tuple

from data.image_io import ImageReadError
from data.image_io import read_image_size as _read_image_size
from utils.errors import UserError

logger = logging.getLogger(__name__)

# Tried in this order when an image is looked up by its stem.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".JPEG", ".PNG")

# Examples (file names, record ids) kept per reason for the summary.
MAX_EXAMPLES = 5

# Boxes at most this many pixels wide or high are reported (kept or dropped by the converter's option):
# VOC-style files have them where <xmin> equals <xmax>, usually a slip of the annotation tool.
TINY_BOX_SIZE = 1.0


class ConversionReport:
    """What a converter changed or left out, counted by reason, with a few examples per reason.

    - ``clipped_boxes``: boxes kept after clipping to the image.
    - ``dropped_boxes``: boxes not written (zero area, unknown class, bad ids, ...).
    - ``skipped_images``: images not written (missing file, unparseable XML, ...).
    - ``notes``: records kept but worth knowing about (``<filename>`` disagrees, size read from the image).
    """

    def __init__(self) -> None:
        self.clipped_boxes: Counter = Counter()
        self.dropped_boxes: Counter = Counter()
        self.skipped_images: Counter = Counter()
        self.notes: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}

    def _count(self, counter: Counter, reason: str, example: str | None) -> None:
        counter[reason] += 1
        if example is not None:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(example)

    def clip_box(self, reason: str, example: str | None = None) -> None:
        self._count(self.clipped_boxes, reason, example)

    def drop_box(self, reason: str, example: str | None = None) -> None:
        self._count(self.dropped_boxes, reason, example)

    def skip_image(self, reason: str, example: str | None = None) -> None:
        logger.warning("skipped image (%s): %s", reason, example)
        self._count(self.skipped_images, reason, example)

    def note(self, reason: str, example: str | None = None) -> None:
        self._count(self.notes, reason, example)


def class_names_for_summary(categories: List[Dict[str, Any]]) -> List[str]:
    """Category names, made unique with the id where two categories share a name."""
    counts = Counter(c["name"] for c in categories)
    return [c["name"] if counts[c["name"]] == 1 else f"{c['name']} (id {c['id']})" for c in categories]


def summarize(coco: Dict[str, Any], report: ConversionReport, split: str, output: str) -> Dict[str, Any]:
    """The summary of one converted split.

    Returns:
        dict with ``split``, ``output`` (the annotation file), ``num_images``,
        ``num_images_without_boxes``, ``num_boxes``, ``num_difficult``, ``num_crowd``,
        ``boxes_per_class`` ({name: count} in label order, zeros included), and the report's
        ``clipped_boxes``, ``dropped_boxes``, ``skipped_images``, ``notes`` ({reason: count}) and
        ``examples`` ({reason: [up to MAX_EXAMPLES examples]}).
    """
    annotations = coco["annotations"]
    per_category = Counter(a["category_id"] for a in annotations)
    images_with_boxes = {a["image_id"] for a in annotations}
    names = class_names_for_summary(coco["categories"])
    return {
        "split": split,
        "output": output,
        "num_images": len(coco["images"]),
        "num_images_without_boxes": sum(1 for im in coco["images"] if im["id"] not in images_with_boxes),
        "num_boxes": len(annotations),
        "num_difficult": sum(1 for a in annotations if a.get("difficult", 0)),
        "num_crowd": sum(1 for a in annotations if a["iscrowd"]),
        "boxes_per_class": {name: per_category[c["id"]] for name, c in zip(names, coco["categories"])},
        "clipped_boxes": dict(report.clipped_boxes),
        "dropped_boxes": dict(report.dropped_boxes),
        "skipped_images": dict(report.skipped_images),
        "notes": dict(report.notes),
        "examples": {reason: list(examples) for reason, examples in report.examples.items()},
    }


def _format_counts(title: str, counts: Dict[str, int], examples: Dict[str, List[str]]) -> List[str]:
    if not counts:
        return [f"  {title}: none"]
    lines = [f"  {title}: {sum(counts.values())}"]
    for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        shown = examples.get(reason, [])
        suffix = f" (e.g. {', '.join(shown)})" if shown else ""
        lines.append(f"    {reason}: {count}{suffix}")
    return lines


def format_summary(summary: Dict[str, Any]) -> str:
    """Human-readable form of ``summarize``'s dict, as printed by the converters."""
    s = summary
    lines = [
        f"{s['split']}: {s['output']}",
        f"  images: {s['num_images']} ({s['num_images_without_boxes']} without boxes)",
        f"  boxes: {s['num_boxes']} (difficult {s['num_difficult']}, crowd/group {s['num_crowd']})",
        "  boxes per class:",
    ]
    width = max((len(name) for name in s["boxes_per_class"]), default=0)
    lines += [f"    {name:<{width}} {count}" for name, count in s["boxes_per_class"].items()]
    examples = s["examples"]
    lines += _format_counts("clipped boxes (kept)", s["clipped_boxes"], examples)
    lines += _format_counts("dropped boxes", s["dropped_boxes"], examples)
    lines += _format_counts("skipped images", s["skipped_images"], examples)
    lines += _format_counts("notes", s["notes"], examples)
    return "\n".join(lines)


def link_or_copy(src: str, dst: str, copy: bool) -> str:
    """Make the folder ``src`` available as ``dst`` (a symlink to its absolute path, or a copy).

    A symlink keeps working when the dataset folder is moved (the target is absolute), as long as
    ``src`` stays where it is; a copy makes the dataset folder self-contained.

    Returns:
        str: what was done: "linked", "copied", or "already in place" (``dst`` is ``src`` or a link to it).

    Raises:
        ValueError: ``src`` is not a folder, or ``dst`` exists and is something else.
    """
    if not os.path.isdir(src):
        raise UserError(f"image folder {src!r} does not exist or is not a folder")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            if copy and os.path.islink(dst):
                raise UserError(f"{dst} is a link to {src}; remove the link to copy the images instead")
            return "already in place"
        if copy and os.path.isdir(dst) and not os.path.islink(dst):
            shutil.copytree(src, dst, dirs_exist_ok=True)  # refresh an earlier copy
            return "copied"
        raise UserError(
            f"{dst} already exists and is not {src}: remove it, or choose another --dataset or --data_root"
        )
    if copy:
        shutil.copytree(src, dst)
        return "copied"
    os.symlink(os.path.abspath(src), dst, target_is_directory=True)
    return "linked"


def read_image_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image as ``data.image_io.read_image`` returns it, from the header only.

    The EXIF orientation is applied (read_image applies it too), so a portrait photo stored
    landscape with orientation 6 reports its upright size. A cut file (no end marker) is an error.

    Raises:
        ValueError: naming the file, when it is missing, cut or not an image (``ImageReadError``).
    """
    return _read_image_size(path)


def checked_image_size(
    path: str,
    recorded: Tuple[float, float] | None,
    report: ConversionReport,
    where: str,
    mismatch_reason: str = "recorded size differs from the image",
) -> Tuple[int, int] | None:
    """The image's (width, height) from its header; None (the image skipped, counted) when it cannot
    be read or is not of the ``recorded`` (width, height).

    A wrong recorded size would fail in training hours later, and the boxes drawn on an image of
    another size cannot be trusted, so the image is left out, with both sizes in the report.
    ``where`` names the record (the XML file, the image id); ``mismatch_reason`` is the report's reason.
    """
    try:
        width, height = read_image_size(path)
    except ImageReadError as e:
        report.skip_image("unreadable image file", f"{path} ({e.reason})")
        return None
    if recorded is not None and (round(recorded[0]), round(recorded[1])) != (width, height):
        rw, rh = round(recorded[0]), round(recorded[1])
        hint = " (transposed: EXIF orientation?)" if (rw, rh) == (height, width) else ""
        example = f"{where}: {rw} x {rh} recorded, {path} is {width} x {height}{hint}"
        report.skip_image(mismatch_reason, example)
        return None
    return width, height


def find_images(image_dir: str, stem: str, names_in_dir: set | None = None) -> List[str]:
    """File names (not paths) of every ``<stem><ext>`` in ``image_dir``, in ``IMAGE_EXTENSIONS`` order."""
    names = []
    for ext in IMAGE_EXTENSIONS:
        name = stem + ext
        if (
            name in names_in_dir
            if names_in_dir is not None
            else os.path.isfile(os.path.join(image_dir, name))
        ):
            names.append(name)
    return names


def case_variants(names: List[str]) -> List[List[str]]:
    """Groups of names that differ only in case ("Cat", "cat"), each sorted, groups in order of first name."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        groups.setdefault(name.casefold(), [])
        if name not in groups[name.casefold()]:
            groups[name.casefold()].append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def is_tiny_box(w: float, h: float) -> bool:
    """A box of at most ``TINY_BOX_SIZE`` px on a side (w, h in continuous pixels)."""
    return w <= TINY_BOX_SIZE or h <= TINY_BOX_SIZE
