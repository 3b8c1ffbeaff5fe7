"""prep/voc.py: folder and devkit modes (counts, coordinates, classes, splits, copies), image ids, the
script from the repository root and EXIF-rotated images. Bad or unusual input:
tests/test_prep_voc_checks.py."""

import os
import subprocess
import sys

import cv2
import pytest
from voc_helpers import _args, _fake_devkit, _folder_argv, _obj, _write, _write_image, _xml

from data.annotations import load_annotations
from prep import voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def xml_folder(tmp_path):
    """Five XML files covering what real files contain; returns (xml_dir, image_dir)."""
    xml_dir, image_dir = tmp_path / "src" / "xml", tmp_path / "src" / "images"
    _write_image(image_dir / "a.jpg", 40, 30)
    _write(
        xml_dir / "a.xml",
        _xml(
            "a.jpg",
            (40, 30),
            [
                _obj("cat", ("1.5", "2", "10.5", "12")),  # float coordinates
                _obj("dog", (1, 1, 40, 30), difficult=None),  # whole image, no <difficult>
                _obj("cat", (5, 5, 50, 20), difficult="1"),  # pokes out on the right, difficult
                _obj("dog", (45, 1, 60, 10)),  # entirely right of the image
                _obj("dog", (10, 1, 5, 10)),  # xmax < xmin
            ],
        ),
    )
    # No <size> (read from the image: 20 x 10) and a <filename> that disagrees with b.xml.
    _write_image(image_dir / "b.png", 20, 10)
    _write(xml_dir / "b.xml", _xml("other.jpg", None, [_obj("bird", (2, 3, 20, 10))]))
    _write(xml_dir / "c.xml", _xml("c.jpg", (10, 10), [_obj("cat", (1, 1, 5, 5))]))  # no image file
    _write_image(image_dir / "d.jpg", 10, 10)
    _write(xml_dir / "d.xml", "<annotation><object><name>cat</name>")  # truncated XML
    _write_image(image_dir / "e.jpg", 16, 16)
    _write(xml_dir / "e.xml", _xml("e.jpg", (16, 16), []))  # background image
    return str(xml_dir), str(image_dir)


def test_folder_mode_counts_and_coordinates(tmp_path, xml_folder):
    xml_dir, image_dir = xml_folder
    split_file = tmp_path / "val.txt"
    split_file.write_text("b\nzzz\n")
    data_root = str(tmp_path / "datasets")
    summaries = voc.main(
        _args("--xml_dir", xml_dir, "--image_dir", image_dir, "--dataset", "mine", "--data_root", data_root,
              "--split_file", str(split_file))
    )  # fmt: skip

    train, val = summaries["train"], summaries["val"]
    assert train["num_images"] == 2 and train["num_images_without_boxes"] == 1
    assert train["num_boxes"] == 3 and train["num_difficult"] == 1 and train["num_crowd"] == 0
    assert train["boxes_per_class"] == {"bird": 0, "cat": 2, "dog": 1}
    assert train["clipped_boxes"] == {"outside the image": 1}
    assert train["dropped_boxes"] == {
        "zero area after clipping": 1,
        "non-positive size (xmax < xmin or ymax < ymin)": 1,
    }
    assert train["skipped_images"] == {"missing image file": 1, "unparseable XML": 1}
    assert train["notes"] == {"missing <difficult> (taken as 0)": 1}
    assert val["num_images"] == 1 and val["num_boxes"] == 1
    assert val["boxes_per_class"] == {"bird": 1, "cat": 0, "dog": 0}
    assert val["clipped_boxes"] == {} and val["dropped_boxes"] == {} and val["skipped_images"] == {}
    assert val["notes"] == {
        "--split_file id without an XML": 1,
        "<filename> disagrees with the XML name": 1,
        "no valid <size>: size read from the image": 1,
    }

    dataset_dir = os.path.join(data_root, "mine")
    coco = load_annotations(os.path.join(dataset_dir, "annotations", "train.json"))
    assert [c["name"] for c in coco["categories"]] == ["bird", "cat", "dog"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    # Image ids follow the sorted XML files a..e (1..5), whatever the split and the skips.
    assert coco["images"] == [
        {"id": 1, "file_name": "images/a.jpg", "width": 40, "height": 30},
        {"id": 5, "file_name": "images/e.jpg", "width": 16, "height": 16},
    ]
    # x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax, then clipped to [0, 40] x [0, 30].
    assert coco["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0.5, 1.0, 10.0, 11.0], "area": 110.0,
         "iscrowd": 0, "difficult": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 40.0, 30.0], "area": 1200.0,
         "iscrowd": 0, "difficult": 0},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [4.0, 4.0, 36.0, 16.0], "area": 576.0,
         "iscrowd": 0, "difficult": 1},
    ]  # fmt: skip
    coco_val = load_annotations(os.path.join(dataset_dir, "annotations", "val.json"))
    assert coco_val["images"] == [{"id": 2, "file_name": "images/b.png", "width": 20, "height": 10}]
    assert coco_val["annotations"] == [
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [1.0, 2.0, 19.0, 8.0], "area": 152.0,
         "iscrowd": 0, "difficult": 0},
    ]  # fmt: skip

    # The dataset folder stands alone: every image is found from <data_root>/<dataset>/<file_name>,
    # also after moving the whole folder.
    moved = str(tmp_path / "elsewhere")
    os.rename(dataset_dir, moved)
    for image in coco["images"] + coco_val["images"]:
        assert cv2.imread(os.path.join(moved, image["file_name"])).shape[:2] == (
            image["height"],
            image["width"],
        )


def test_folder_mode_classes_fix_order_and_count_the_rest(tmp_path, xml_folder):
    xml_dir, image_dir = xml_folder
    data_root = str(tmp_path / "datasets")
    summaries = voc.main(
        _args("--xml_dir", xml_dir, "--image_dir", image_dir, "--dataset", "mine", "--data_root", data_root,
              "--classes", "dog,cat", "--val_fraction", "0")
    )  # fmt: skip
    assert list(summaries["train"]["boxes_per_class"].items()) == [("dog", 1), ("cat", 2)]
    assert summaries["train"]["dropped_boxes"]["class not in --classes"] == 1  # b's bird
    assert summaries["train"]["num_images"] == 3 and summaries["val"]["num_images"] == 0
    coco = load_annotations(os.path.join(data_root, "mine", "annotations", "train.json"))
    assert coco["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]


def test_folder_mode_val_fraction_split(tmp_path):
    xml_dir, image_dir = tmp_path / "xml", tmp_path / "img"
    for i in range(20):
        _write_image(image_dir / f"im{i:02d}.jpg", 8, 8)
        _write(xml_dir / f"im{i:02d}.xml", _xml(f"im{i:02d}.jpg", (8, 8), [_obj("x", (1, 1, 4, 4))]))

    def split(seed, name):
        data_root = str(tmp_path / "out")
        voc.main(
            _args("--xml_dir", str(xml_dir), "--image_dir", str(image_dir), "--dataset", name,
                  "--data_root", data_root, "--val_fraction", "0.25", "--seed", str(seed))
        )  # fmt: skip
        ann_dir = os.path.join(data_root, name, "annotations")
        return tuple(
            {im["file_name"] for im in load_annotations(os.path.join(ann_dir, f"{s}.json"))["images"]}
            for s in ("train", "val")
        )

    train, val = split(0, "a")
    assert len(train) == 15 and len(val) == 5
    assert not train & val and len(train | val) == 20
    assert split(0, "b") == (train, val)
    assert split(1, "c")[1] != val


def test_folder_mode_copy_makes_a_self_contained_folder(tmp_path, xml_folder):
    xml_dir, image_dir = xml_folder
    data_root = str(tmp_path / "datasets")
    voc.main(
        _args("--xml_dir", xml_dir, "--image_dir", image_dir, "--dataset", "mine", "--data_root", data_root,
              "--copy")
    )  # fmt: skip
    images_dir = os.path.join(data_root, "mine", "images")
    assert os.path.isdir(images_dir) and not os.path.islink(images_dir)
    os.rename(image_dir, image_dir + "_gone")
    for split in ("train", "val"):
        for image in load_annotations(os.path.join(data_root, "mine", "annotations", f"{split}.json"))[
            "images"
        ]:
            assert os.path.isfile(os.path.join(data_root, "mine", image["file_name"]))


def test_devkit_mode(tmp_path):
    devkit = _fake_devkit(tmp_path / "VOCdevkit")
    data_root = str(tmp_path / "datasets")
    summaries = voc.main(
        _args(
            "--devkit",
            devkit,
            "--data_root",
            data_root,
            "--sets",
            "2007:trainval",
            "2012:trainval",
            "2007:test",
        )
    )
    assert list(summaries) == ["trainval2007", "trainval2012", "test2007"]
    assert summaries["trainval2007"]["num_images"] == 2
    assert summaries["trainval2007"]["skipped_images"] == {"missing XML": 1}
    assert summaries["trainval2007"]["num_boxes"] == 3 and summaries["trainval2007"]["num_difficult"] == 1
    assert summaries["test2007"]["boxes_per_class"]["horse"] == 1
    assert list(summaries["test2007"]["boxes_per_class"]) == list(voc.VOC_CLASSES)

    dataset_dir = os.path.join(data_root, "voc")
    assert sorted(os.listdir(os.path.join(dataset_dir, "annotations"))) == [
        "test2007.json",
        "trainval2007.json",
        "trainval2012.json",
    ]
    coco = load_annotations(os.path.join(dataset_dir, "annotations", "trainval2007.json"))
    assert coco["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(voc.VOC_CLASSES)]
    assert coco["images"] == [
        {"id": 2007000005, "file_name": "VOC2007/JPEGImages/000005.jpg", "width": 50, "height": 40},
        {"id": 2007000007, "file_name": "VOC2007/JPEGImages/000007.jpg", "width": 30, "height": 20},
    ]
    assert coco["annotations"][:2] == [
        {"id": 2007000005000, "image_id": 2007000005, "category_id": 9, "bbox": [11.0, 4.0, 19.0, 36.0],
         "area": 684.0, "iscrowd": 0, "difficult": 0},
        {"id": 2007000005001, "image_id": 2007000005, "category_id": 9, "bbox": [0.0, 19.0, 8.0, 16.0],
         "area": 128.0, "iscrowd": 0, "difficult": 1},
    ]  # fmt: skip
    coco12 = load_annotations(os.path.join(dataset_dir, "annotations", "trainval2012.json"))
    assert coco12["images"][0]["id"] == 2008000002
    assert coco12["annotations"][0]["category_id"] == 20  # tvmonitor
    assert coco12["annotations"][0]["bbox"] == [4.0, 7.0, 20.0, 21.0]

    assert os.path.islink(os.path.join(dataset_dir, "VOC2007"))
    for split in ("trainval2007", "trainval2012", "test2007"):
        for image in load_annotations(os.path.join(dataset_dir, "annotations", f"{split}.json"))["images"]:
            assert os.path.isfile(os.path.join(dataset_dir, image["file_name"]))

    # A second run finds its links in place; a folder that is not the devkit's is refused.
    voc.main(_args("--devkit", devkit, "--data_root", data_root, "--sets", "2007:test"))
    with pytest.raises(ValueError, match="already exists and is not"):
        other = _fake_devkit(tmp_path / "other")
        voc.main(_args("--devkit", other, "--data_root", data_root, "--sets", "2007:test"))


def test_voc_image_ids_and_bad_options(tmp_path):
    assert voc.voc_image_id("2007", "000005") == 2007000005
    assert voc.voc_image_id("2012", "2008_000002") == 2008000002
    with pytest.raises(ValueError, match="abc"):
        voc.voc_image_id("2007", "abc")
    with pytest.raises(ValueError, match="YEAR:SET"):
        voc.parse_set("trainval")
    with pytest.raises(ValueError, match="either --devkit"):
        voc.main(_args())
    with pytest.raises(ValueError, match="--dataset NAME is required"):
        voc.main(_args("--xml_dir", str(tmp_path), "--image_dir", str(tmp_path)))


def test_script_runs_from_the_repo_root(tmp_path):
    devkit = _fake_devkit(tmp_path / "VOCdevkit")
    out = subprocess.run(
        [
            sys.executable,
            "prep/voc.py",
            "--devkit",
            devkit,
            "--data_root",
            str(tmp_path / "d"),
            "--sets",
            "2007:test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "images: 1 (0 without boxes)" in out.stdout and "boxes: 2" in out.stdout
    help_out = subprocess.run(
        [sys.executable, "prep/voc.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert help_out.returncode == 0 and "--val_fraction" in help_out.stdout


def test_size_from_an_exif_rotated_image_matches_the_loader(tmp_path):
    from PIL import Image

    from data.image_io import read_image

    xml_dir, image_dir = tmp_path / "xml", tmp_path / "img"
    image_dir.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 wide x 20 high, shown rotated by 90 degrees: 20 wide x 30 high
    Image.new("RGB", (30, 20), (90, 90, 90)).save(image_dir / "r.jpg", exif=exif)
    _write(xml_dir / "r.xml", _xml("r.jpg", None, [_obj("x", (1, 1, 20, 30))]))
    data_root = str(tmp_path / "d")
    argv = _folder_argv(xml_dir, image_dir, "r", data_root)
    summaries = voc.main(_args(*argv, "--val_fraction", "0"))
    assert summaries["train"]["clipped_boxes"] == {}
    image = load_annotations(os.path.join(data_root, "r", "annotations", "train.json"))["images"][0]
    assert (image["width"], image["height"]) == (20, 30)
    assert read_image(os.path.join(data_root, "r", image["file_name"])).shape[:2] == (30, 20)
