"""prep/openimages.py on a hand-made Open Images fixture: every count and box is computed by hand below.

Fixture images (key -> integer id = first 13 hex digits):
  A 64x48, B 40x80, C 50x50 (verified labels only), D (no file), E 30x20 (only a degenerate box),
  F 20x20, R stored 60x40 with EXIF orientation 6 (displayed 40x60), U (not an image).
Classes: /m/01 Cat, /m/02 Dog, /m/03 "Ball, toy", /m/04 Person, /m/05 Animal (category ids 1..5).
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from data.annotations import load_annotations
from data.image_io import read_image
from prep import openimages
from prep.oid import images as oid_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def key(n: int) -> str:
    return f"{n:013x}abc"


A, B, C, D, E, F, R, U = (key(n) for n in range(1, 9))

CLASS_DESCRIPTIONS = '/m/01,Cat\n/m/02,Dog\n/m/03,"Ball, toy"\n/m/04,Person\n/m/05,Animal\n'

BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,"
    "IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
)
BOX_ROWS = [
    f"{A},xclick,/m/01,1,0.25,0.75,0.5,1.0,1,0,0,0,0",  # 1 kept: [16, 24, 32, 24]
    f"{A},activemil,/m/02,1,0.0,0.5,0.0,0.25,0,1,1,0,-1",  # 2 kept, group-of: [0, 0, 32, 12]
    f"{A},xclick,/m/99,1,0.1,0.2,0.1,0.2,0,0,0,0,0",  # 3 unknown MID
    f"{A},xclick,/m/05,1,0.125,0.375,0.25,0.75,0,0,0,1,0",  # 4 kept: [8, 12, 16, 24]
    f"{B},xclick,/m/01,1,0.1,0.6,0.25,0.5,-1,-1,0,1,0",  # 5 kept: [4, 20, 20, 20]
    f"{B},xclick,/m/04,1,0.5,1.0,0.0,1.0,1,1,1,0,0",  # 6 kept, group-of: [20, 0, 20, 80]
    f"{B},xclick,/m/04,1,0.5,1.05,-0.1,0.5,0,0,0,0,1",  # 7 kept, clipped: [20, 0, 20, 40]
    f"{D},xclick,/m/01,1,0.1,0.5,0.1,0.5,0,0,0,0,0",  # 8 image missing
    f"{E},xclick,/m/02,1,0.5,0.5,0.1,0.9,0,0,0,0,0",  # 9 degenerate (zero width)
    f"{A},xclick,/m/01,1,0.3,0.3,0.1,0.9,0,0,0,0,0",  # 10 degenerate (zero width)
    f"{A},xclick,/m/02,1,0.8,0.2,0.1,0.9,0,0,0,0,0",  # 11 degenerate (XMin > XMax)
    f"{R},xclick,/m/04,1,0.0,0.5,0.0,0.25,0,0,0,0,0",  # 12 kept, EXIF 6: displayed [30, 0, 10, 30]
    f"{F},xclick,/m/03,1,0.0,1.0,0.0,1.0,0,0,0,0,0",  # 13 kept: [0, 0, 20, 20]
    f"{U},xclick,/m/01,1,0.1,0.5,0.1,0.5,0,0,0,0,0",  # 14 image unreadable
]

LABEL_ROWS = [
    f"{A},verification,/m/01,1",
    f"{A},verification,/m/02,1",
    f"{A},verification,/m/04,0",
    f"{A},verification,/m/05,1",
    f"{A},crowdsource-verification,/m/01,1",  # duplicate
    f"{A},verification,/m/99,1",  # unknown MID
    f"{B},verification,/m/01,1",
    f"{B},verification,/m/04,1",
    f"{B},verification,/m/02,0",  # conflicts with the next row: present wins
    f"{B},verification,/m/02,1",
    f"{C},verification,/m/01,0",
    f"{C},verification,/m/02,0",
    f"{D},verification,/m/01,1",  # image missing
    f"{U},verification,/m/02,1",  # image unreadable
]

HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/05", "Subcategory": [{"LabelName": "/m/01"}, {"LabelName": "/m/02"}]},
        {"LabelName": "/m/04", "Part": [{"LabelName": "/m/03"}]},
    ],
}


@pytest.fixture()
def oid(tmp_path):
    """Open Images files in tmp_path; returns a dict of their paths."""
    image_dir = tmp_path / "oid_images"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {A: (64, 48), B: (40, 80), C: (50, 50), E: (30, 20), F: (20, 20)}.items():
        cv2.imwrite(str(image_dir / f"{name}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    # R: stored 60 x 40 with a red block on the stored pixels x 0..30, y 0..10 (the box of row 12);
    # EXIF orientation 6 shows it rotated 90 degrees clockwise (40 x 60).
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[0:10, 0:30] = (255, 0, 0)
    exif = Image.Exif()
    exif[oid_images.EXIF_ORIENTATION_TAG] = 6
    Image.fromarray(stored).save(image_dir / f"{R}.jpg", quality=95, exif=exif)
    (image_dir / f"{U}.jpg").write_bytes(b"this is not a JPEG")

    paths = {"image_dir": str(image_dir), "data_root": str(tmp_path / "datasets")}
    paths["class_descriptions"] = str(tmp_path / "class-descriptions-boxable.csv")
    # A byte-order mark, as some editors write: the reader must not take it for part of the MID.
    with open(paths["class_descriptions"], "w", encoding="utf-8-sig") as f:
        f.write(CLASS_DESCRIPTIONS)
    paths["boxes"] = str(tmp_path / "validation-annotations-bbox.csv")
    with open(paths["boxes"], "w") as f:
        f.write("\n".join([BOX_HEADER] + BOX_ROWS) + "\n")
    paths["image_labels"] = str(tmp_path / "validation-annotations-human-imagelabels-boxable.csv")
    with open(paths["image_labels"], "w", newline="") as f:  # Windows line ends
        f.write("\r\n".join(["ImageID,Source,LabelName,Confidence"] + LABEL_ROWS) + "\r\n")
    paths["hierarchy"] = str(tmp_path / "bbox_labels_600_hierarchy.json")
    with open(paths["hierarchy"], "w") as f:
        json.dump(HIERARCHY, f)
    return paths


def run(oid, *extra):
    argv = [
        "--split",
        "validation",
        "--num_workers",
        "2",
        *[f"--{k}={v}" for k, v in oid.items()],
        *extra,
    ]
    args = openimages.get_args_parser(add_help=True).parse_args(argv)
    result = openimages.main(args)
    assert list(result) == ["validation"]
    summary = result["validation"]
    coco = load_annotations(summary["output"])
    return summary, coco


def boxes_by_image(coco):
    key_of_id = {im["id"]: im["oid_image_id"] for im in coco["images"]}
    out = {}
    for ann in coco["annotations"]:
        out.setdefault(key_of_id[ann["image_id"]], []).append(ann)
    return out


def test_all_classes_counts_boxes_flags_labels(oid, capsys):
    summary, coco = run(oid)
    root = os.path.join(oid["data_root"], "openimages")
    assert summary["output"] == os.path.join(root, "annotations", "validation.json")

    assert coco["categories"] == [
        {"id": 1, "name": "Cat", "mid": "/m/01"},
        {"id": 2, "name": "Dog", "mid": "/m/02"},
        {"id": 3, "name": "Ball, toy", "mid": "/m/03"},
        {"id": 4, "name": "Person", "mid": "/m/04"},
        {"id": 5, "name": "Animal", "mid": "/m/05"},
    ]
    # Images in ImageID order; ids from the first 13 hex digits.
    images = {im["oid_image_id"]: im for im in coco["images"]}
    assert [im["oid_image_id"] for im in coco["images"]] == [A, B, C, F, R]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 6, 7]
    assert {k: (im["width"], im["height"]) for k, im in images.items()} == {
        A: (64, 48),
        B: (40, 80),
        C: (50, 50),
        F: (20, 20),
        R: (40, 60),
    }
    assert images[A]["file_name"] == f"validation/{A}.jpg"
    assert (images[A]["verified_present"], images[A]["verified_absent"]) == ([1, 2, 5], [4])
    assert (images[B]["verified_present"], images[B]["verified_absent"]) == ([1, 2, 4], [])
    assert (images[C]["verified_present"], images[C]["verified_absent"]) == ([], [1, 2])
    assert (images[F]["verified_present"], images[F]["verified_absent"]) == ([], [])
    assert images[R]["exif_orientation"] == 6 and "exif_orientation" not in images[A]

    boxes = boxes_by_image(coco)
    got = {k: [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in v] for k, v in boxes.items()}
    assert got == {
        A: [(1, [16, 24, 32, 24], 768, 0), (2, [0, 0, 32, 12], 384, 1), (5, [8, 12, 16, 24], 384, 0)],
        B: [(1, [4, 20, 20, 20], 400, 0), (4, [20, 0, 20, 80], 1600, 1), (4, [20, 0, 20, 40], 800, 0)],
        F: [(3, [0, 0, 20, 20], 400, 0)],
        R: [(4, [30, 0, 10, 30], 300, 0)],
    }
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 9))
    flags = ("is_occluded", "is_truncated", "is_depiction", "is_inside", "source")
    assert [[a[f] for f in flags] for a in boxes[A]] == [
        [1, 0, 0, 0, "xclick"],
        [0, 1, 0, -1, "activemil"],
        [0, 0, 1, 0, "xclick"],
    ]
    assert [[a[f] for f in flags] for a in boxes[B]] == [
        [-1, -1, 1, 0, "xclick"],
        [1, 1, 0, 0, "xclick"],
        [0, 0, 0, 1, "xclick"],
    ]

    assert summary["num_images"] == 5
    assert summary["num_images_without_boxes"] == 1  # C: verified labels only
    assert summary["skipped_images"] == {
        "image_missing": 1,
        "image_unreadable": 1,
        "all boxes degenerate": 1,  # E
    }
    assert summary["examples"]["image_missing"] == [os.path.join(oid["image_dir"], f"{D}.jpg")]
    assert summary["notes"] == {"EXIF orientation applied": 1, "IsGroupOf unknown (iscrowd 0)": 0}
    assert summary["num_boxes"] == 8
    assert summary["num_crowd"] == 2
    assert summary["clipped_boxes"] == {"outside the image": 1}
    assert summary["boxes_per_class"] == {"Cat": 2, "Dog": 1, "Ball, toy": 1, "Person": 3, "Animal": 1}
    assert summary["dropped_boxes"] == {
        "unknown_mid": 1,
        "class_not_selected": 0,
        "image_missing": 1,
        "image_unreadable": 1,
        "degenerate": 3,
    }
    assert summary["num_box_rows"] == len(BOX_ROWS) == 8 + sum(summary["dropped_boxes"].values())
    assert summary["num_verified_present"] == 6
    assert summary["num_verified_absent"] == 3
    assert summary["dropped_labels"] == {
        "unknown_mid": 1,
        "class_not_selected": 0,
        "image_missing": 1,
        "image_unreadable": 1,
        "duplicate": 1,
        "conflicting": 1,
    }
    assert summary["num_label_rows"] == len(LABEL_ROWS) == 9 + sum(summary["dropped_labels"].values())
    assert summary["unknown_mids"] == {"/m/99": 2}
    assert summary["classes_not_in_hierarchy"] == []
    printed = capsys.readouterr().out
    assert "dropped boxes: unknown_mid=1, class_not_selected=0, image_missing=1" in printed
    assert "boxes: 8 (group-of (iscrowd=1) 2, clipped to the image 1)" in printed
    assert "    Person    3\n    Cat       2\n" in printed  # top classes by boxes

    # The dataset folder stands alone: the symlinked images, the hierarchy.
    assert os.path.islink(os.path.join(root, "validation")) and summary["image_folder_mode"] == "linked"
    for im in coco["images"]:
        assert os.path.isfile(os.path.join(root, im["file_name"]))
    with open(os.path.join(root, "hierarchy.json")) as f:
        assert json.load(f) == HIERARCHY


def test_exif_oriented_box_matches_read_image(oid):
    """The converted box of R covers the red block in the image as data.image_io.read_image returns it."""
    _, coco = run(oid)
    image = next(im for im in coco["images"] if im["oid_image_id"] == R)
    pixels = read_image(os.path.join(oid["data_root"], "openimages", image["file_name"]))
    assert pixels.shape == (image["height"], image["width"], 3) == (60, 40, 3)
    red = (pixels[:, :, 0] > 150) & (pixels[:, :, 1] < 100)
    ys, xs = np.nonzero(red)
    x, y, w, h = next(a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"])
    # The block spans pixels [xs.min(), xs.max() + 1) in continuous coordinates (JPEG blur: 1 px).
    assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
    assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_exif_orientation_matches_pil_exif_transpose(orientation):
    # Stored 7 (h) x 10 (w) image with a block at x 2..5, y 1..3: transpose with PIL, find the block.
    stored = np.zeros((7, 10), np.uint8)
    stored[1:3, 2:5] = 255
    image = Image.fromarray(stored)
    image.getexif()[oid_images.EXIF_ORIENTATION_TAG] = orientation
    shown = np.asarray(ImageOps.exif_transpose(image))
    ys, xs = np.nonzero(shown)
    expected = [xs.min() / shown.shape[1], (xs.max() + 1) / shown.shape[1]]
    expected += [ys.min() / shown.shape[0], (ys.max() + 1) / shown.shape[0]]
    coords = np.array([[2 / 10, 5 / 10, 1 / 7, 3 / 7]])
    got = oid_images.apply_exif_orientation(coords, np.array([orientation]))
    np.testing.assert_allclose(got[0], expected, atol=1e-12)


SUBSET_COUNTS = {
    "dropped_boxes": {
        "unknown_mid": 1,
        "class_not_selected": 5,  # rows 2, 4, 9, 11, 13
        "image_missing": 1,
        "image_unreadable": 1,
        "degenerate": 1,  # row 10 (row 9 is a Dog box: not selected comes first)
    },
    "dropped_labels": {
        "unknown_mid": 1,
        "class_not_selected": 6,
        "image_missing": 1,
        "image_unreadable": 0,  # U's label is a Dog label
        "duplicate": 1,
        "conflicting": 0,
    },
}


@pytest.mark.parametrize("how", ["names", "name_and_mid", "file"])
def test_classes_subset(oid, tmp_path, how):
    if how == "file":
        class_file = tmp_path / "classes.txt"
        class_file.write_text("# my classes\nCat\n\n/m/04\n")
        classes = str(class_file)
    else:
        classes = "Cat,Person" if how == "names" else "cat,/m/04"  # names also match case-insensitively
    summary, coco = run(oid, f"--classes={classes}")
    assert coco["categories"] == [
        {"id": 1, "name": "Cat", "mid": "/m/01"},
        {"id": 2, "name": "Person", "mid": "/m/04"},
    ]
    images = {im["oid_image_id"]: im for im in coco["images"]}
    assert list(images) == [A, B, C, R]  # F (Ball) and E (Dog) hold no selected class
    assert (images[A]["verified_present"], images[A]["verified_absent"]) == ([1], [2])
    assert (images[B]["verified_present"], images[B]["verified_absent"]) == ([1, 2], [])
    assert (images[C]["verified_present"], images[C]["verified_absent"]) == ([], [1])
    got = {k: [(a["category_id"], a["bbox"]) for a in v] for k, v in boxes_by_image(coco).items()}
    assert got == {
        A: [(1, [16, 24, 32, 24])],
        B: [(1, [4, 20, 20, 20]), (2, [20, 0, 20, 80]), (2, [20, 0, 20, 40])],
        R: [(2, [30, 0, 10, 30])],
    }
    assert summary["boxes_per_class"] == {"Cat": 2, "Person": 3}
    assert summary["num_crowd"] == 1
    assert summary["skipped_images"]["all boxes degenerate"] == 0
    assert summary["dropped_boxes"] == SUBSET_COUNTS["dropped_boxes"]
    assert summary["dropped_labels"] == SUBSET_COUNTS["dropped_labels"]
    assert summary["num_verified_present"] == 3 and summary["num_verified_absent"] == 2


def test_class_with_comma_in_its_name_from_a_file(oid, tmp_path):
    class_file = tmp_path / "classes.txt"
    class_file.write_text("Ball, toy\n")
    summary, coco = run(oid, f"--classes={class_file}")
    assert [c["mid"] for c in coco["categories"]] == ["/m/03"]
    assert [im["oid_image_id"] for im in coco["images"]] == [F]
    assert summary["boxes_per_class"] == {"Ball, toy": 1}


def test_frequency_bins(oid, capsys):
    summary, _ = run(oid, "--frequency_bins=2")
    # Boxes per class: Person 3, Cat 2, Dog 1, Ball 1, Animal 1 -> sorted (ties in class order), 3 + 2.
    bin_dir = os.path.join(oid["data_root"], "openimages", "class_bins")
    assert sorted(os.listdir(bin_dir)) == ["bin_0.txt", "bin_1.txt"]
    with open(os.path.join(bin_dir, "bin_0.txt")) as f:
        assert f.read() == "/m/04\n/m/01\n/m/02\n"
    with open(os.path.join(bin_dir, "bin_1.txt")) as f:
        assert f.read() == "/m/03\n/m/05\n"
    assert [(b["min_boxes"], b["max_boxes"], b["num_boxes"]) for b in summary["class_bins"]] == [
        (1, 3, 6),
        (1, 1, 2),
    ]
    assert "bin 0: 3 classes, 1..3 boxes per class, 6 boxes" in capsys.readouterr().out
    # A bin file is a class list the prep (and train.py --classes) reads back.
    summary, coco = run(oid, f"--classes={os.path.join(bin_dir, 'bin_1.txt')}")
    assert [c["name"] for c in coco["categories"]] == ["Ball, toy", "Animal"]
    # A later run with fewer bins leaves no stale bin files behind.
    run(oid, "--frequency_bins=1")
    assert sorted(os.listdir(bin_dir)) == ["bin_0.txt"]


def test_copy_keeps_only_kept_images(oid):
    folder = os.path.join(oid["data_root"], "openimages", "validation")
    summary, _ = run(oid)
    assert os.path.islink(folder)
    # --copy after a linked run replaces the link by a folder holding the kept images only.
    summary, _ = run(oid, "--copy")
    assert not os.path.islink(folder) and summary["image_folder_mode"] == "copied"
    assert sorted(os.listdir(folder)) == sorted(f"{k}.jpg" for k in (A, B, C, F, R))
    # Without --copy a real folder is refused, before any work (no annotation file is written).
    os.remove(summary["output"])
    with pytest.raises(ValueError, match="exists and is not a symlink"):
        run(oid)
    assert not os.path.exists(summary["output"])


def test_challenge_style_columns_read_as_unknown(oid):
    # The challenge validation boxes have only ImageID,XMin,XMax,YMin,YMax,LabelName,IsGroupOf.
    with open(oid["boxes"], "w") as f:
        f.write("ImageID,XMin,XMax,YMin,YMax,LabelName,IsGroupOf\n")
        f.write(f"{A},0.25,0.75,0.5,1.0,/m/01,1\n")
    summary, coco = run(oid)
    (ann,) = coco["annotations"]
    assert ann["bbox"] == [16, 24, 32, 24] and ann["iscrowd"] == 1
    assert [ann[f] for f in ("is_occluded", "is_truncated", "is_depiction", "is_inside", "source")] == [
        -1,
        -1,
        -1,
        -1,
        "",
    ]


def test_bad_inputs_raise_naming_the_problem(oid, tmp_path):
    with pytest.raises(ValueError, match=r"--classes: unknown classes .*'Zebra'"):
        run(oid, "--classes=Cat,Zebra")
    with pytest.raises(ValueError, match="--frequency_bins 6 exceeds the 5 selected classes"):
        run(oid, "--frequency_bins=6")
    with open(oid["image_labels"], "a") as f:
        f.write(f"{A},machine,/m/01,0.7\n")
    with pytest.raises(
        ValueError, match=r"human-imagelabels-boxable.csv:16: .*Confidence '0.7' is not 0 or 1"
    ):
        run(oid)
    with open(oid["boxes"], "a") as f:
        f.write(f"{A},xclick,/m/01,1,0.1,0.2\n")
    with pytest.raises(ValueError, match=r"bbox.csv:16: 6 fields, the header has 13"):
        run(oid)
    with open(oid["boxes"], "w") as f:
        f.write("ImageID,LabelName,XMin,XMax\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['YMin', 'YMax'\]"):
        run(oid)


def test_image_ids_from_keys():
    assert oid_images.image_ids_from_keys(["000002b66c9c498e"]).tolist() == [0x000002B66C9C4]
    assert oid_images.image_ids_from_keys(["ffffffffffffffff"]).tolist() == [2**52 - 1]
    with pytest.raises(ValueError, match="share their first 13 hex digits"):
        oid_images.image_ids_from_keys(["0000000000001aaa", "0000000000001bbb"])
    with pytest.raises(ValueError, match="'img_1' is not hexadecimal"):
        oid_images.image_ids_from_keys(["img_1"])


@pytest.mark.parametrize("command", [["prep/openimages.py"], ["-m", "prep.openimages"]])
def test_command_lines_write_what_main_writes(oid, tmp_path, command):
    """`python prep/openimages.py ...` (README.md, prep/README.md) and `python -m prep.openimages ...`, run
    from the repository root, write the annotation file that main() writes in process."""
    summary, _ = run(oid)
    data_root = tmp_path / "cli"
    options = [f"--{k}={v}" for k, v in oid.items() if k != "data_root"] + [f"--data_root={data_root}"]
    argv = [sys.executable, *command, "--split", "validation", *options]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    annotation_file = data_root / "openimages" / "annotations" / "validation.json"
    assert out.stdout.startswith(f"validation: {annotation_file}\n")
    with open(summary["output"]) as expected, open(annotation_file) as got:
        assert got.read() == expected.read()
