"""Drawing detections for demo.py: boxes and "name score" captions that scale with the image.

- Line width max(1, round(S / 320)) and font size max(10, round(S / 45)) px, S = the image's longer
  side: 1 px and 10 px on a 64 px image, 2 px and 13 px at 600 px, 6 px and 43 px at 1920 px; smaller
  (down to 6 px) where the longest caption would be wider than the image.
- Detections are drawn in increasing score order, so where boxes overlap the best one's box and caption
  are on top.
- Captions are drawn with Pillow and a TrueType font that has the glyphs of every class name:
  matplotlib's DejaVu Sans (Latin, Greek, Cyrillic, ...) when it covers them, else the first system font
  (matplotlib's font list) that does; when none does (e.g. CJK names on a machine without CJK fonts),
  one warning names the classes and characters, which then draw as the font's missing-glyph box.
  OpenCV's Hershey fonts, used before, draw every non-ASCII character as "?".
"""

from __future__ import annotations

import functools
import logging
import os
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)


def line_width_for(height: int, width: int) -> int:
    return max(1, round(max(height, width) / 320))


def font_size_for(height: int, width: int) -> int:
    return max(10, round(max(height, width) / 45))


def class_colour(label: int) -> Tuple[int, int, int]:
    """A stable, well-separated RGB colour per class (golden-ratio hue steps)."""
    hue = int((label * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 220, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _default_font_path() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def candidate_font_paths() -> List[str]:
    """DejaVu Sans first, then the system's TrueType/OpenType fonts (as matplotlib finds them)."""
    from matplotlib import font_manager

    system = sorted(p for p in font_manager.findSystemFonts() if p.lower().endswith((".ttf", ".otf")))
    return [_default_font_path()] + system


@functools.lru_cache(maxsize=64)
def _font_codepoints(path: str) -> frozenset:
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, lazy=True, fontNumber=0) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # noqa: BLE001 - an unreadable font is simply not a candidate
        return frozenset()


def missing_characters(path: str, names: Sequence[str]) -> List[str]:
    """Characters of ``names`` (spaces and digits of the caption included) without a glyph in ``path``."""
    cmap = _font_codepoints(path)
    text = "".join(names) + " 0123456789."
    return sorted({c for c in text if ord(c) not in cmap})


@functools.lru_cache(maxsize=16)
def font_path_for(names: Tuple[str, ...]) -> str:
    """The first candidate font with a glyph for every character of ``names``; warns once if none has."""
    candidates = candidate_font_paths()
    for path in candidates:
        if not missing_characters(path, names):
            if path != candidates[0]:
                logger.info("class names drawn with %s (DejaVu Sans lacks some of their glyphs)", path)
            return path
    missing = missing_characters(candidates[0], names)
    classes = [n for n in names if any(c in missing for c in n)]
    logger.warning(
        "no font on this machine has glyphs for %s in the class names %s: they are drawn as boxes "
        "(install a font that has them, e.g. fonts-noto-cjk; the JSON output has the right names)",
        "".join(missing),
        classes,
    )
    return candidates[0]


def fitting_font(
    path: str, size: int, image_width: int, class_names: Sequence[str]
) -> ImageFont.FreeTypeFont:
    """The font at ``size`` px, smaller (down to 6 px) while the longest caption is wider than the image."""
    longest = max(class_names, key=len, default="") + " 0.00"
    font = ImageFont.truetype(path, size)
    while size > 6 and font.getlength(longest) > image_width:
        size -= 1
        font = ImageFont.truetype(path, size)
    return font


def draw_detections(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
) -> np.ndarray:
    """Boxes (np[D, 4], xyxy image pixels) with "name score" captions on a copy of np.uint8[H, W, 3] RGB.

    Returns np.uint8[H, W, 3] RGB. Captions sit above the box (inside it at the top edge of the image)
    and are shifted left to stay inside the image.
    """
    height, width = image_rgb.shape[:2]
    canvas = Image.fromarray(np.ascontiguousarray(image_rgb))
    draw = ImageDraw.Draw(canvas)
    line_width = line_width_for(height, width)
    font = fitting_font(font_path_for(tuple(class_names)), font_size_for(height, width), width, class_names)
    pad = max(1, line_width // 2)
    for i in np.argsort(np.asarray(scores), kind="stable"):  # best last: on top where boxes overlap
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        colour = class_colour(int(labels[i]))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
        caption = f"{class_names[int(labels[i])]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_w, text_h = right - left + 2 * pad, bottom - top + 2 * pad
        tx = max(0, min(x1, width - text_w))
        ty = y1 - text_h if y1 - text_h >= 0 else y1  # above the box, or inside it at the image top
        draw.rectangle([tx, ty, tx + text_w - 1, ty + text_h - 1], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), caption, fill=ink, font=font)
    return np.asarray(canvas)
