"""Image reading: any file OpenCV decodes, as 8-bit RGB with the EXIF orientation applied.

How OpenCV's flags behave (checked on OpenCV 4.x/5.0):
- ``IMREAD_COLOR`` applies the EXIF orientation but reduces 16-bit images with a right shift (v >> 8).
- ``IMREAD_UNCHANGED`` keeps depth and alpha but never applies the EXIF orientation.
- ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` (used here) applies the EXIF orientation, keeps 16-bit depth,
  gives grayscale as one channel, colour (also CMYK JPEGs) as BGR, and drops alpha (RGBA -> BGR,
  gray + alpha -> 3 equal channels). We then scale 16-bit to 8-bit with rounding (v * 255 / 65535).

``cv2.imread`` returns None on a missing or unreadable file and decodes a truncated JPEG without
error (the missing part is grey, libjpeg only prints "Premature end of JPEG file"), so the bytes are
read here and JPEG streams are checked for their end-of-image marker before decoding.

``read_image_size`` gives the size ``read_image`` would return without decoding (a header read, about
0.1 ms per image against several ms for a decode), so scripts can check every image at start.
"""

from __future__ import annotations

import os
import re
from typing import Tuple

import cv2
import numpy as np
from PIL import Image

from utils.errors import UserError

_READ_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR

# A marker inside entropy-coded JPEG data: 0xFF followed by anything but a stuffed zero, a restart
# marker (RST0..7, which stay inside the scan) or another 0xFF (fill byte before the real marker).
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type IEND, its CRC
EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotations by 90 degrees: width and height swap


class ImageReadError(UserError):
    """An image file that is missing, empty, corrupt or in an unsupported pixel format."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


def jpeg_stream_problem(data: bytes) -> str | None:
    """Why a JPEG byte stream is incomplete (None when it reaches its end-of-image marker).

    Walks the marker segments by their lengths and each scan up to the next marker. Bytes after
    the EOI marker (camera trailers, appended videos) are allowed, and the EXIF thumbnail's own
    EOI is skipped as part of its APP1 segment.
    """
    num_bytes = len(data)
    pos = 2  # after SOI (0xFFD8)
    while True:
        if pos + 2 > num_bytes:
            return f"truncated JPEG: no end-of-image marker in {num_bytes} bytes"
        if data[pos] != 0xFF:
            return f"corrupt JPEG: expected a marker at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length field
            pos += 2
            continue
        if pos + 4 > num_bytes:
            return f"truncated JPEG: no end-of-image marker in {num_bytes} bytes"
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data runs until the next marker
            found = _JPEG_SCAN_END.search(data, pos)
            if found is None:
                return f"truncated JPEG: image data ends without an end-of-image marker ({num_bytes} bytes)"
            pos = found.start()


def to_uint8_rgb(image: np.ndarray, path: str = "<array>") -> np.ndarray:
    """OpenCV-decoded pixels (H, W) / (H, W, 1..4) BGR[A], uint8 or uint16 -> np.uint8[H, W, 3] RGB.

    Alpha is dropped (not blended), grayscale is repeated to three channels, and 16-bit values are
    scaled to 8 bits with rounding, so 65535 -> 255 and 257 * k -> k.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    num_channels = image.shape[2]
    if num_channels in (2, 4):  # gray + alpha, BGR + alpha
        image = image[:, :, : num_channels - 1]
    elif num_channels not in (1, 3):
        raise ImageReadError(path, f"unsupported number of channels {num_channels}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(path, f"unsupported pixel type {image.dtype} (expected 8- or 16-bit integers)")
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.ascontiguousarray(image[:, :, ::-1])  # BGR -> RGB


def read_image(path: str) -> np.ndarray:
    """Read an image file as np.uint8[H, W, 3] RGB, EXIF orientation applied (H, W as displayed).

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become 8-bit RGB.
    Raises ImageReadError (a ValueError) naming the file when it is missing, empty, a truncated
    JPEG, or not decodable.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # missing file, a folder, no permission
        raise ImageReadError(path, e.strerror or str(e)) from e
    if len(data) == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    if data[:2] == b"\xff\xd8":
        problem = jpeg_stream_problem(data)
        if problem is not None:
            raise ImageReadError(path, problem)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _READ_FLAGS)
    except cv2.error as e:
        raise ImageReadError(path, f"OpenCV failed to decode it ({e})") from e
    if image is None or image.size == 0:
        raise ImageReadError(path, f"not a decodable image (corrupt or unknown format, {len(data)} bytes)")
    return to_uint8_rgb(image, path)


def _decoded_size(path: str) -> Tuple[int, int]:
    image = read_image(path)
    return image.shape[1], image.shape[0]


def _end_problem(f, kind: str, file_size: int, head: bytes) -> str | None:
    """None when the file reaches the end of its stream; else why not ("" when only a decode can tell)."""
    if kind == "webp":  # the RIFF chunk length, counted from byte 8
        return None if file_size >= 8 + int.from_bytes(head[4:8], "little") else ""
    tail_size = 2 if kind == "jpeg" else len(_PNG_IEND_CHUNK)
    f.seek(max(file_size - tail_size, 0))
    tail = f.read(tail_size)
    if kind == "png":
        return None if tail == _PNG_IEND_CHUNK else ""  # data after IEND, or a cut file
    if tail == b"\xff\xd9":
        return None
    f.seek(0)  # bytes after the end-of-image marker (camera trailers), or a cut file: walk the stream
    return jpeg_stream_problem(f.read())


def read_image_size(path: str) -> Tuple[int, int]:
    """(width, height) of the image ``read_image(path)`` returns, EXIF orientation applied, without
    decoding the pixels where the format allows it.

    JPEG, PNG and WebP: the header (PIL), plus a check that the file reaches its end (JPEG's
    end-of-image marker, PNG's IEND chunk, WebP's RIFF length), which catches the usual corruption, a
    cut download, at the cost of one more small read. OpenCV applies the EXIF orientation of these three
    formats, and so does this function. Other formats (where OpenCV and PIL may disagree: OpenCV
    fails on some TIFFs PIL reads), and any file whose quick checks fail or look odd, are decoded with
    ``read_image``, which decides. Pixel data damaged in the middle of a complete file is not detected.

    Raises:
        ImageReadError: naming the file, as ``read_image`` would (missing, empty, truncated, undecodable).
    """
    try:
        f = open(path, "rb")
    except OSError as e:  # missing file, a folder, no permission
        raise ImageReadError(path, e.strerror or str(e)) from e
    with f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size == 0:
            raise ImageReadError(path, "the file is empty (0 bytes)")
        head = f.read(16)
        if head[:2] == b"\xff\xd8":
            kind = "jpeg"
        elif head[:8] == _PNG_SIGNATURE:
            kind = "png"
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            kind = "webp"
        else:
            return _decoded_size(path)
        f.seek(0)
        try:
            with Image.open(f) as image:
                width, height = image.size
                orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
        except Exception:  # any PIL failure, a broken EXIF block too: let OpenCV decide
            return _decoded_size(path)
        problem = _end_problem(f, kind, file_size, head)
    if problem:
        raise ImageReadError(path, problem)
    if problem == "" or width <= 0 or height <= 0:
        return _decoded_size(path)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height
