import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from data import image_io
from data.image_io import ImageReadError, jpeg_stream_problem, read_image, read_image_size

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def quadrant_image(h=32, w=48):
    """Stored pixels: top-left red, top-right blue, bottom-left green, bottom-right white (flat blocks)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[: h // 2, : w // 2] = RED
    image[: h // 2, w // 2 :] = BLUE
    image[h // 2 :, : w // 2] = GREEN
    image[h // 2 :, w // 2 :] = WHITE
    return image


def write_jpeg_with_orientation(path, image, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image).save(path, exif=exif.tobytes(), quality=98)


def colour_at(image, y, x):
    """The nearest of the four block colours to pixel (y, x) (JPEG changes values slightly)."""
    colours = np.array([RED, BLUE, GREEN, WHITE])
    return tuple(colours[np.abs(colours - image[y, x].astype(int)).sum(1).argmin()])


def test_exif_rotate_90_cw_hand_checked(tmp_path):
    path = str(tmp_path / "o6.jpg")
    write_jpeg_with_orientation(path, quadrant_image(32, 48), 6)  # 6: rotate 90 degrees clockwise to display
    image = read_image(path)
    assert image.shape == (48, 32, 3) and image.dtype == np.uint8
    # Rotating clockwise puts the stored bottom-left (green) at the displayed top-left.
    assert colour_at(image, 4, 4) == GREEN
    assert colour_at(image, 4, 28) == RED
    assert colour_at(image, 44, 4) == WHITE
    assert colour_at(image, 44, 28) == BLUE


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    path = str(tmp_path / f"o{orientation}.jpg")
    write_jpeg_with_orientation(path, quadrant_image(32, 48), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    image = read_image(path)
    assert image.shape == expected.shape
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 2.0


def test_grayscale_png_to_rgb(tmp_path):
    gray = np.array([[0, 40, 80], [120, 160, 255]], np.uint8)
    path = str(tmp_path / "gray.png")
    Image.fromarray(gray, "L").save(path)
    image = read_image(path)
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image, np.repeat(gray[:, :, None], 3, axis=2))


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 20, 30
    rgba[0, 0, 3], rgba[1, 1, 3] = 0, 255  # alpha must not change the colour
    path = str(tmp_path / "rgba.png")
    Image.fromarray(rgba, "RGBA").save(path)
    image = read_image(path)
    np.testing.assert_array_equal(image, np.broadcast_to(np.array([10, 20, 30], np.uint8), (2, 2, 3)))


def test_16bit_gray_and_colour_scaled_not_truncated(tmp_path):
    gray16 = np.array([[0, 257, 65535, 1000, 32896]], np.uint16)
    path = str(tmp_path / "gray16.png")
    assert cv2.imwrite(path, gray16)
    image = read_image(path)
    # round(v * 255 / 65535): 1000 -> 3.89 -> 4 (a right shift would give 3; a cast would wrap).
    np.testing.assert_array_equal(image[0, :, 0], [0, 1, 255, 4, 128])
    assert (image == image[:, :, :1]).all()

    bgr16 = np.zeros((1, 2, 3), np.uint16)
    bgr16[0, 0] = (65535, 32896, 257)  # B, G, R as OpenCV writes them
    path = str(tmp_path / "colour16.png")
    assert cv2.imwrite(path, bgr16)
    np.testing.assert_array_equal(read_image(path)[0, 0], [1, 128, 255])  # RGB


def test_png_pixels_exact_and_rgb_order(tmp_path):
    rgb = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    path = str(tmp_path / "x.png")
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(read_image(path), rgb)


def write_random_jpeg(path, h=64, w=64):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    with open(path, "rb") as f:
        return f.read()


def test_truncated_jpeg_raises_naming_file(tmp_path):
    data = write_random_jpeg(str(tmp_path / "full.jpg"))
    assert jpeg_stream_problem(data) is None
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.jpg.*truncated JPEG"):
        read_image(str(path))


def test_jpeg_with_trailing_bytes_and_progressive_ok(tmp_path):
    data = write_random_jpeg(str(tmp_path / "full.jpg"))
    path = tmp_path / "trailer.jpg"
    path.write_bytes(data + b"\x00" * 10 + b"camera trailer")
    assert read_image(str(path)).shape == (64, 64, 3)
    progressive = str(tmp_path / "progressive.jpg")
    Image.fromarray(quadrant_image()).save(progressive, progressive=True, quality=90)
    assert read_image(progressive).shape == (32, 48, 3)


def test_garbage_bytes_raise_naming_file(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not an image" * 20)
    with pytest.raises(ImageReadError, match="garbage.jpg.*not a decodable image"):
        read_image(str(path))


def test_empty_file_raises_naming_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg.*empty"):
        read_image(str(path))


def test_missing_file_raises_naming_file(tmp_path):
    path = str(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="missing.jpg") as info:
        read_image(path)
    assert isinstance(info.value, ValueError) and info.value.path == path


# ------------------------------------------------------------------------------------------------
# read_image_size: the size read_image gives, from the header


def _no_decode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("read_image_size decoded the image")

    monkeypatch.setattr(image_io, "read_image", refuse)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 8])
def test_image_size_from_header_matches_the_decoded_image(tmp_path, monkeypatch, ext, orientation):
    path = str(tmp_path / f"o{orientation}.{ext}")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(quadrant_image(32, 48)).save(path, exif=exif.tobytes())
    h, w = read_image(path).shape[:2]  # OpenCV applies the orientation of all three formats
    assert (h, w) == ((48, 32) if orientation >= 5 else (32, 48))
    _no_decode(monkeypatch)
    assert read_image_size(path) == (w, h)


def test_image_size_of_other_formats_comes_from_the_decoder(tmp_path, monkeypatch):
    path = str(tmp_path / "x.bmp")
    assert cv2.imwrite(path, np.zeros((7, 11, 3), np.uint8))
    assert read_image_size(path) == (11, 7)
    _no_decode(monkeypatch)
    with pytest.raises(AssertionError, match="decoded"):
        read_image_size(path)


def test_image_size_detects_cut_files_without_decoding(tmp_path, monkeypatch):
    data = write_random_jpeg(str(tmp_path / "full.jpg"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(data + b"\x00" * 10 + b"camera trailer")
    _no_decode(monkeypatch)
    with pytest.raises(ImageReadError, match="cut.jpg.*truncated JPEG"):
        read_image_size(str(cut))
    assert read_image_size(str(trailer)) == (64, 64)  # bytes after the end-of-image marker are fine


def test_image_size_of_a_cut_png_or_webp_is_an_error(tmp_path):
    for ext in ("png", "webp"):
        full = tmp_path / f"full.{ext}"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(full)
        data = full.read_bytes()
        assert read_image_size(str(full)) == (40, 40)
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(ImageReadError, match=f"cut.{ext}"):
            read_image(str(cut))  # the decoder refuses it...
        with pytest.raises(ImageReadError, match=f"cut.{ext}"):
            read_image_size(str(cut))  # ...and so does the header check
        after = tmp_path / f"after.{ext}"
        after.write_bytes(data + b"extra")  # data after the end: the decoder decides (it reads it)
        assert read_image_size(str(after)) == (40, 40)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"this is not an image" * 20, "not a decodable image"), (b"\xff\xd8\xff\xe0", "")],
)
def test_image_size_of_bad_files_raises_naming_them(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.jpg.*" + message):
        read_image_size(str(path))
    with pytest.raises(ImageReadError, match="missing.jpg"):
        read_image_size(str(tmp_path / "missing.jpg"))
