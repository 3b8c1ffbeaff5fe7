"""prep/voc.py on bad or unusual input, each reported by file: image headers that disagree with the XML
or are cut short, tiny boxes, two image files for one XML, class names differing in case, inputs
checked before anything is written, a devkit image listed twice, split and classes files. The
conversion itself: tests/test_prep_voc.py."""

import logging
import os

import pytest
from voc_helpers import _args, _fake_devkit, _folder_argv, _obj, _write, _write_image, _xml

from data.annotations import load_annotations
from prep import voc


def _folder(tmp_path, files, *extra):
    """Write {name: xml text or (width, height) for an image} under src/ and convert in folder mode."""
    xml_dir, image_dir = tmp_path / "src" / "xml", tmp_path / "src" / "images"
    xml_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, tuple):
            _write_image(image_dir / name, *content)
        else:
            _write(xml_dir / name, content)
    data_root = str(tmp_path / "datasets")
    argv = _folder_argv(xml_dir, image_dir, "m", data_root)
    return voc.main(_args(*argv, "--val_fraction", "0", *extra)), os.path.join(data_root, "m")


def test_every_image_header_is_read_size_mismatch_and_cut_files_skipped(tmp_path, caplog):
    files = {
        "ok.jpg": (20, 10),
        "ok.xml": _xml("ok.jpg", (20, 10), [_obj("cat", (1, 1, 5, 5))]),
        "wrong.jpg": (20, 10),
        "wrong.xml": _xml("wrong.jpg", (40, 30), [_obj("cat", (1, 1, 35, 25))]),  # <size> of another image
        "turned.jpg": (20, 10),
        "turned.xml": _xml("turned.jpg", (10, 20), [_obj("cat", (1, 1, 5, 5))]),
        "cut.jpg": (20, 10),
        "cut.xml": _xml("cut.jpg", (20, 10), [_obj("cat", (1, 1, 5, 5))]),
    }
    _folder(tmp_path, files)  # writes the files; then cut one image short
    cut = tmp_path / "src" / "images" / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prep.common"):
        summaries, dataset_dir = _folder(tmp_path, {})
    train = summaries["train"]
    assert train["num_images"] == 1 and train["num_boxes"] == 1
    assert train["skipped_images"] == {"<size> differs from the image": 2, "unreadable image file": 1}
    examples = train["examples"]["<size> differs from the image"]
    assert any(
        e.endswith(
            "wrong.xml: 40 x 30 recorded, " + os.path.join(dataset_dir, "images", "wrong.jpg") + " is 20 x 10"
        )
        for e in examples
    ), examples
    assert any(
        "turned.xml: 10 x 20 recorded" in e and e.endswith("(transposed: EXIF orientation?)")
        for e in examples
    )
    assert "cut.jpg (truncated JPEG" in train["examples"]["unreadable image file"][0]
    assert caplog.text.count("skipped image") == 3  # one warning per file


def test_tiny_boxes_are_reported_by_file_and_kept_or_dropped(tmp_path):
    files = {
        "a.jpg": (20, 10),
        # <xmin> equal to <xmax>: 1 px wide; a normal box; 1 px high after clipping to the image
        "a.xml": _xml(
            "a.jpg",
            (20, 10),
            [_obj("cat", (3, 2, 3, 8)), _obj("cat", (1, 1, 5, 5)), _obj("dog", (2, 10, 6, 14))],
        ),
    }
    summaries, _ = _folder(tmp_path, files)
    train = summaries["train"]
    reason = "box at most 1 px wide or high (kept; --tiny_boxes drop)"
    assert train["num_boxes"] == 3 and train["notes"] == {reason: 2}
    assert train["examples"][reason][0].endswith("a.xml: 'cat' (3.0, 2.0, 3.0, 8.0)")
    assert train["clipped_boxes"] == {"outside the image": 1}
    summaries, dataset_dir = _folder(tmp_path, {}, "--tiny_boxes", "drop")
    train = summaries["train"]
    assert train["num_boxes"] == 1 and train["dropped_boxes"] == {
        "at most 1 px wide or high (--tiny_boxes drop)": 2
    }
    coco = load_annotations(os.path.join(dataset_dir, "annotations", "train.json"))
    assert [a["bbox"] for a in coco["annotations"]] == [[0.0, 0.0, 5.0, 5.0]]


def test_two_image_files_for_one_xml_and_classes_differing_in_case_are_warned(tmp_path, caplog):
    files = {
        "a.jpg": (20, 10),
        "a.png": (20, 10),
        "a.xml": _xml("a.jpg", (20, 10), [_obj("Cat", (1, 1, 5, 5)), _obj("cat", (2, 2, 6, 6))]),
    }
    with caplog.at_level(logging.WARNING, logger="prep"):
        summaries, dataset_dir = _folder(tmp_path, files)
    notes = summaries["train"]["notes"]
    assert notes == {
        "several image files for one XML (the first used)": 1,
        "class names that differ only in case (separate classes)": 1,
    }
    assert summaries["train"]["examples"]["several image files for one XML (the first used)"][0].endswith(
        "a.xml: a.jpg, a.png"
    )
    assert summaries["train"]["examples"]["class names that differ only in case (separate classes)"] == [
        "'Cat' / 'cat'"
    ]
    assert "several image files ['a.jpg', 'a.png']; using a.jpg" in caplog.text
    assert "class names ['Cat', 'cat'] differ only in case" in caplog.text
    assert summaries["train"]["boxes_per_class"] == {"Cat": 1, "cat": 1}
    # With --classes, a name that differs only in case is dropped under its own reason.
    summaries, _ = _folder(tmp_path, {}, "--classes", "cat")
    reason = "class not in --classes (differs only in case from a known class)"
    assert summaries["train"]["dropped_boxes"] == {reason: 1}
    assert summaries["train"]["examples"][reason][0].endswith("a.xml: 'Cat' ~ 'cat'")


def test_folder_mode_inputs_checked_before_anything_is_written(tmp_path):
    xml_dir, image_dir = tmp_path / "xml", tmp_path / "img"
    xml_dir.mkdir()
    image_dir.mkdir()
    data_root = tmp_path / "datasets"
    base = _folder_argv(xml_dir, image_dir, "m", data_root)
    with pytest.raises(ValueError, match="holds no .xml file"):
        voc.main(_args(*base))
    _write(xml_dir / "a.xml", _xml("a.jpg", (8, 8), []))
    with pytest.raises(ValueError, match="--split_file 'nope.txt' does not exist"):
        voc.main(_args(*base, "--split_file", "nope.txt"))
    with pytest.raises(ValueError, match=r"--val_fraction must be in \[0, 1\), got 1.0"):
        voc.main(_args(*base, "--val_fraction", "1"))
    assert not data_root.exists()  # no image folder linked for a bad option
    with pytest.raises(ValueError, match="no <object> with a <name> in any of the 1 XML files"):
        voc.main(_args(*base))


def test_devkit_image_listed_twice_is_converted_once_and_case_is_named(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    _fake_devkit(devkit)
    _write(devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt", "000009\n000009\n")
    _write(
        devkit / "VOC2007" / "Annotations" / "000009.xml",
        _xml("000009.jpg", (30, 20), [_obj("Person", (1, 1, 6, 12)), _obj("horse", (3, 4, 25, 19))]),
    )
    summaries = voc.main(
        _args("--devkit", str(devkit), "--data_root", str(tmp_path / "d"), "--sets", "2007:test")
    )
    test = summaries["test2007"]
    assert test["num_images"] == 1 and test["num_boxes"] == 1
    assert test["skipped_images"] == {"listed again in the image set file": 1}
    assert test["dropped_boxes"] == {"unknown class (differs only in case from a known class)": 1}
    assert test["examples"]["unknown class (differs only in case from a known class)"][0].endswith(
        "'Person' ~ 'person'"
    )


def test_split_file_takes_file_names_and_a_missing_classes_file_is_named(tmp_path):
    files = {f"{n}.jpg": (8, 8) for n in "abc"}
    files.update({f"{n}.xml": _xml(f"{n}.jpg", (8, 8), [_obj("x", (1, 1, 4, 4))]) for n in "abc"})
    split_file = tmp_path / "val.txt"
    split_file.write_text("b.jpg\nxml/c.xml\nzzz\n")
    summaries, _ = _folder(tmp_path, files, "--split_file", str(split_file))
    assert summaries["val"]["num_images"] == 2 and summaries["train"]["num_images"] == 1
    assert summaries["val"]["notes"] == {"--split_file id without an XML": 1}
    with pytest.raises(ValueError, match="--classes file 'classes.txt' does not exist"):
        _folder(tmp_path, {}, "--classes", "classes.txt")
