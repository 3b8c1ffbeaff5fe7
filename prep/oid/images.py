"""The Open Images image files: header reads, EXIF orientation, integer image ids, the image folder.

The header read is this module's own rather than ``prep.common.read_image_size`` (data/image_io.py's),
which it overlaps only in the EXIF tag it reads: the boxes are normalised to the stored pixel matrix, so
the conversion needs the stored size and the orientation separately (``read_image_size`` returns the
displayed size only), and it tells a missing file from an unreadable one, which the summary counts apart.
Only the header is read (no end-of-file check, no decode), for each of the 1.7M train images.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.image_io import EXIF_ORIENTATION_TAG
from utils.errors import UserError

# Image status codes from the header read.
IMAGE_OK, IMAGE_MISSING, IMAGE_UNREADABLE = 0, 1, 2

# Hex digits of the ImageID used as the integer image id: 13 * 4 = 52 bits, exact in a float64.
_ID_HEX_DIGITS = 13


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
        return IMAGE_MISSING, 0, 0, 1, "missing"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return IMAGE_UNREADABLE, 0, 0, 1, str(e)
    if width <= 0 or height <= 0:
        return IMAGE_UNREADABLE, 0, 0, 1, f"size {width} x {height}"
    if orientation not in range(1, 9):
        orientation = 1  # readers (OpenCV, PIL) ignore invalid values too
    return IMAGE_OK, width, height, orientation, ""


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
    errors = [(paths[i], results[i][4]) for i in np.flatnonzero(status == IMAGE_UNREADABLE)]
    return {
        "status": status,
        "width": np.array([r[1] for r in results], dtype=np.int64),
        "height": np.array([r[2] for r in results], dtype=np.int64),
        "orientation": np.array([r[3] for r in results], dtype=np.int8),
        "unreadable": errors,
        "missing": [paths[i] for i in np.flatnonzero(status == IMAGE_MISSING)],
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
