"""demo.py and its drawing (utils/draw.py): sizes, order, fonts, output names and formats, bad images."""

import logging
import os

import cv2
import numpy as np
import pytest
from inference_helpers import train_tiny, val_images
from tiny_shapes import make_tiny_shapes

import demo
from utils import draw
from utils.draw import class_colour, draw_detections, font_path_for
from utils.errors import UserError

NAMES = ["circle", "sq", "triangle"]


def _band(canvas, colour, row):
    """Columns of ``row`` painted in exactly ``colour`` (a caption's filled background)."""
    return np.flatnonzero((canvas[row] == np.array(colour, dtype=np.uint8)).all(axis=1))


def _caption_rows(canvas, colour, column):
    """Rows of ``column`` in exactly ``colour``."""
    return np.flatnonzero((canvas[:, column] == np.array(colour, dtype=np.uint8)).all(axis=1))


def test_boxes_and_captions_are_drawn_inside_the_image():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 40.0, 50.0, 90.0], [100.0, 70.0, 120.0, 95.0]])
    canvas = draw_detections(image, boxes, np.array([0.9, 0.95]), np.array([0, 2]), NAMES)
    assert canvas.shape == (100, 120, 3) and canvas.dtype == np.uint8
    colour0, colour2 = class_colour(0), class_colour(2)
    # Box 1: a 1 px outline (100 px image) in its class colour, the interior untouched.
    assert (canvas[90, 10:51] == colour0).all() and (canvas[40:91, 10] == colour0).all()
    assert (canvas[41:90, 11:50] == 0).all()
    # Its caption band sits right above y1 = 40 and starts at the box's left edge.
    rows = _caption_rows(canvas, colour0, 10)
    assert rows.max() == 90 and 39 in rows and 40 - rows[rows < 40].min() >= 10
    band0 = _band(canvas, colour0, 39)
    assert band0.min() == 10 and band0.max() > 50
    # Box 2 touches the right edge: its caption, wider than the box, is shifted left to end at column 119.
    band2 = _band(canvas, colour2, 69)
    assert band2.max() == 119 and band2.min() < 100
    assert np.array_equal(band2, np.arange(band2.min(), 120))


def test_line_width_and_font_scale_with_the_image():
    small = draw_detections(
        np.zeros((100, 100, 3), np.uint8), np.array([[20, 40, 80, 90]]), [0.9], [1], NAMES
    )
    big = draw_detections(
        np.zeros((960, 960, 3), np.uint8), np.array([[200, 400, 800, 900]]), [0.9], [1], NAMES
    )
    colour = class_colour(1)
    # Line width: 1 px at 100 px, round(960 / 320) = 3 px at 960 px (left edge, halfway down the box).
    assert _band(small, colour, 65).tolist() == [20, 80]
    assert _band(big, colour, 650).tolist() == [200, 201, 202, 798, 799, 800]
    # Caption height: about 960 / 45 = 21 px of font against 10 px.
    small_h = 40 - _caption_rows(small, colour, 21)[0]
    big_h = 400 - _caption_rows(big, colour, 205)[0]
    assert 1.8 * small_h <= big_h <= 3 * small_h


def test_the_best_scoring_detection_is_drawn_on_top():
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[20.0, 40.0, 80.0, 90.0], [20.0, 40.0, 80.0, 90.0]])
    for order in ([0, 1], [1, 0]):
        scores, labels = np.array([0.9, 0.5])[order], np.array([0, 1])[order]
        canvas = draw_detections(image, boxes[order], scores, labels, NAMES)
        assert (canvas[60, 20] == class_colour(0)).all()  # the 0.9 box's outline covers the 0.5 one's
        assert (canvas[39, 20] == class_colour(0)).all()  # and so does its caption


def test_non_ascii_class_names_are_drawn_with_their_glyphs():
    image = np.zeros((100, 200, 3), np.uint8)
    box = np.array([[10.0, 50.0, 150.0, 90.0]])
    assert draw.missing_characters(font_path_for(("круг", "τρίγωνο")), ["круг", "τρίγωνο"]) == []
    cyrillic = draw_detections(image, box, [0.9], [0], ["круг"])
    questions = draw_detections(image, box, [0.9], [0], ["????"])
    assert np.abs(cyrillic.astype(int) - questions.astype(int)).sum() > 0


def test_a_font_with_the_glyphs_is_chosen_or_one_warning_says_why_not(monkeypatch, caplog):
    import matplotlib

    fonts = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    dejavu, stix = os.path.join(fonts, "DejaVuSans.ttf"), os.path.join(fonts, "STIXGeneral.ttf")
    monkeypatch.setattr(draw, "candidate_font_paths", lambda: [dejavu, stix])
    font_path_for.cache_clear()
    try:
        assert font_path_for(("ᶁ",)) == stix  # U+1D81: in STIX General, not in DejaVu Sans
        with caplog.at_level(logging.WARNING, logger="utils.draw"):
            assert font_path_for(("猫", "dog")) == dejavu
            draw_detections(
                np.zeros((50, 50, 3), np.uint8), np.array([[1, 20, 30, 40]]), [0.5], [0], ["猫", "dog"]
            )
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "猫" in warnings[0] and "['猫']" in warnings[0]
    finally:
        font_path_for.cache_clear()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    return train_tiny(data_root, tmp_path_factory.mktemp("runs"))


def run_demo(checkpoint, images, out, *extra):
    argv = ["--checkpoint", checkpoint, "--images", *images, "--save_path", str(out), "--score_thresh", "0"]
    return demo.main(demo.get_args_parser().parse_args(argv + ["--conf_thresh", "0", *extra]))


def test_outputs_keep_relative_paths_and_formats_and_are_counted(checkpoint, data_root, tmp_path, capsys):
    """train/000.png and val/000.png, x.png and x.jpg: four inputs, four drawings, four JSON files."""
    src = val_images(data_root)
    inputs = tmp_path / "in"
    for sub in ("train", "val"):
        (inputs / sub).mkdir(parents=True)
    cv2.imwrite(str(inputs / "train" / "000.png"), cv2.imread(src[0]))
    cv2.imwrite(str(inputs / "val" / "000.png"), cv2.imread(src[1]))
    cv2.imwrite(str(inputs / "x.png"), cv2.imread(src[2]))
    cv2.imwrite(str(inputs / "x.jpg"), cv2.imread(src[3]))
    images = [str(inputs / "train"), str(inputs / "val"), str(inputs / "x.png"), str(inputs / "x.jpg")]
    images.append(str(inputs / "val" / "000.png"))  # named twice: processed once
    records = run_demo(checkpoint, images, tmp_path / "out")
    log = capsys.readouterr().out
    out = tmp_path / "out"
    expected = ["train/000_det.png", "val/000_det.png", "x_png_det.png", "x_jpg_det.jpg"]
    assert [os.path.relpath(r["output"], out) for r in records] == expected
    for name in expected:
        with open(out / name, "rb") as f:
            magic = f.read(4)
        assert magic[:4] == b"\x89PNG" if name.endswith(".png") else magic[:2] == b"\xff\xd8"  # JPEG SOI
        assert os.path.isfile(out / (name.rsplit("_det", 1)[0] + "_det.json"))
    assert len(list(out.rglob("*.json"))) == 4
    assert "wrote 4 drawn images and 4 JSON files" in log
    assert "1 image(s) named more than once are processed once" in log
    # The drawings differ from one another: nothing was overwritten.
    a, b = (cv2.imread(str(out / n)) for n in expected[:2])
    assert np.abs(a.astype(int) - b.astype(int)).sum() > 0


def test_bad_images_stop_the_run_or_are_skipped_and_counted(checkpoint, data_root, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, path in enumerate(val_images(data_root)[:2]):
        cv2.imwrite(str(folder / f"good{i}.png"), cv2.imread(path))
    (folder / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match=r"cannot read image '.*bad\.png' \(pass --skip_bad_images"):
        run_demo(checkpoint, [str(folder)], tmp_path / "out1", "-j", "1")
    capsys.readouterr()
    records = run_demo(checkpoint, [str(folder)], tmp_path / "out2", "-j", "1", "--skip_bad_images")
    log = capsys.readouterr().out
    assert sorted(os.path.basename(r["image"]) for r in records) == ["good0.png", "good1.png"]
    assert "1 of 3 images were unreadable and skipped" in log and "bad.png" in log
    assert "wrote 2 drawn images" in log
    assert sorted(os.listdir(tmp_path / "out2")) == [
        "good0_det.json",
        "good0_det.png",
        "good1_det.json",
        "good1_det.png",
    ]


def test_an_empty_folder_is_an_error(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        run_demo(checkpoint, [str(tmp_path / "empty")], tmp_path / "out")
