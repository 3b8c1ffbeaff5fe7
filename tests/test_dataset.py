import json
import logging
import os

import numpy as np
import pytest
import torch
from option_helpers import parse_options
from PIL import Image

from data.collate import Collate, SkippedSample
from data.dataset import DetectionDataset, build_dataset, check_same_classes, parse_classes
from data.image_io import ImageReadError
from data.transforms import build_transforms

CATEGORIES = [
    {"id": 5, "name": "cat"},
    {"id": 9, "name": "dog", "mid": "/m/0dog"},
    {"id": 2, "name": "bird"},
]


def ann(ann_id, image_id, category_id, bbox, iscrowd=0, difficult=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
        "difficult": difficult,
    }


def write_image(root, name, height, width):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "images", name))
    return f"images/{name}"


def write_split(root, split, images, annotations, categories=CATEGORIES):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = os.path.join(root, "annotations", f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


@pytest.fixture
def toy(tmp_path):
    """datasets/toy: train = a (40 x 60, three boxes) and b (30 x 30, no box); val = c (50 x 20, one box)."""
    root = str(tmp_path / "datasets" / "toy")
    train_images = [
        {"id": 1, "file_name": write_image(root, "a.png", 40, 60), "width": 60, "height": 40},
        {"id": 2, "file_name": write_image(root, "b.png", 30, 30), "width": 30, "height": 30},
    ]
    train_anns = [
        ann(1, 1, 9, [10.0, 5.0, 20.0, 10.0]),  # dog
        ann(2, 1, 5, [0.0, 0.0, 60.0, 40.0], iscrowd=1),  # cat, crowd, full image
        ann(3, 1, 2, [30.0, 20.0, 30.5, 20.0], difficult=1),  # bird, 0.5 px past the right border
    ]
    write_split(root, "train", train_images, train_anns)
    val_images = [{"id": 3, "file_name": write_image(root, "c.png", 50, 20), "width": 20, "height": 50}]
    write_split(root, "val", val_images, [ann(1, 3, 2, [2.0, 4.0, 6.0, 8.0])])
    return root


def eval_transforms(size=80):
    return build_transforms(False, "keep_aspect", min_size=size, max_size=1000)


def test_targets_exact(toy):
    dataset = DetectionDataset(toy, ["train"], eval_transforms(80))
    assert len(dataset) == 2 and dataset.image_ids == [1, 2]
    assert dataset.class_names == ["cat", "dog", "bird"] and dataset.category_ids == [5, 9, 2]
    np.testing.assert_array_equal(dataset.image_sizes, [[40, 60], [30, 30]])
    image, target = dataset[0]
    # 60 x 40 keep-aspect short side 80 -> 120 x 80, scale 2
    assert image.shape == (3, 80, 120) and image.dtype == torch.float32
    torch.testing.assert_close(
        target["boxes"],
        torch.tensor([[20.0, 10.0, 60.0, 30.0], [0.0, 0.0, 120.0, 80.0], [60.0, 40.0, 120.0, 80.0]]),
    )  # the third box is clipped to the image before scaling
    assert target["labels"].tolist() == [1, 0, 2]
    assert target["iscrowd"].tolist() == [False, True, False]
    assert target["difficult"].tolist() == [False, False, True]
    assert target["image_id"] == 1 and target["file_name"] == os.path.join(toy, "images/a.png")
    assert target["orig_size"].tolist() == [40, 60] and target["size"].tolist() == [80, 120]
    torch.testing.assert_close(target["scale"], torch.tensor([2.0, 2.0]))
    assert target["num_cropped_out"] == 0
    # The image without boxes is kept as a negative.
    image, target = dataset[1]
    assert image.shape == (3, 80, 80) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert [labels.tolist() for labels in dataset.image_labels] == [[0, 1, 2], []]


def test_pixels_are_the_normalised_image(toy):
    dataset = DetectionDataset(toy, ["val"], build_transforms(False, "square", input_dim=20))
    image, target = dataset[0]  # 20 x 50 -> 20 x 20
    assert image.shape == (3, 20, 20)
    torch.testing.assert_close(target["scale"], torch.tensor([1.0, 0.4]))
    raw_image, raw_target = DetectionDataset(toy, ["val"], None)[0]
    assert raw_image.shape == (50, 20, 3) and raw_image.dtype == np.uint8
    np.testing.assert_array_equal(raw_target["boxes"], [[2, 4, 8, 12]])


def test_two_splits_merged(toy):
    dataset = DetectionDataset(toy, ["train", "val"], eval_transforms())
    assert dataset.image_ids == [1, 2, 3]
    assert dataset.annotation_files == [
        os.path.join(toy, "annotations", f"{s}.json") for s in ("train", "val")
    ]
    assert dataset[2][1]["labels"].tolist() == [2]
    gt = dataset.coco_gt()
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert len(gt["annotations"]) == 4
    # Both files use annotation id 1: ids are renumbered so pycocotools keeps every box.
    assert sorted(a["id"] for a in gt["annotations"]) == [1, 2, 3, 4]
    assert gt["categories"] == CATEGORIES


def test_class_subset_by_name_and_mid(toy, caplog):
    with caplog.at_level(logging.INFO, logger="data.dataset"):
        dataset = DetectionDataset(toy, ["train"], eval_transforms(), classes=["bird", "/m/0dog"])
    assert dataset.class_names == ["bird", "dog"] and dataset.category_ids == [2, 9]
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, -1, 0]  # dog -> 1, cat outside the subset -> -1, bird -> 0
    assert len(target["boxes"]) == 3  # the cat box is kept as an ignore region
    assert dataset.num_boxes_outside_classes == 1
    assert [labels.tolist() for labels in dataset.image_labels] == [[0, 1], []]
    assert "1 boxes of other classes" in caplog.text
    gt = dataset.coco_gt()
    assert [c["name"] for c in gt["categories"]] == ["bird", "dog"]
    assert sorted(a["category_id"] for a in gt["annotations"]) == [2, 9]


def test_unknown_classes_named(toy):
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['horse', 'zebra'\]"):
        DetectionDataset(toy, ["train"], eval_transforms(), classes=["dog", "horse", "zebra"])


def test_malformed_annotation_names_file(toy):
    path = write_split(toy, "broken", [{"id": 1, "file_name": "images/a.png", "width": 60}], [])
    with pytest.raises(ValueError, match="broken.json") as info:
        DetectionDataset(toy, ["broken"], eval_transforms())
    assert "height" in str(info.value)
    with pytest.raises(ValueError, match="missing.json"):
        DetectionDataset(toy, ["missing"], eval_transforms())
    assert os.path.exists(path)


def test_split_mismatches_rejected(toy):
    other = [dict(c) for c in CATEGORIES][::-1]
    write_split(toy, "reordered", [], [], categories=other)
    with pytest.raises(ValueError, match="reordered.json.*different categories"):
        DetectionDataset(toy, ["train", "reordered"], eval_transforms())
    images = [{"id": 2, "file_name": "images/b.png", "width": 30, "height": 30}]
    write_split(toy, "again", images, [])
    with pytest.raises(ValueError, match=r"image id\(s\) appear in more than one.*again.json"):
        DetectionDataset(toy, ["train", "again"], eval_transforms())


def test_degenerate_boxes_dropped_and_counted(toy, caplog):
    images = [{"id": 7, "file_name": "images/a.png", "width": 60, "height": 40}]
    write_split(
        toy, "thin", images, [ann(1, 7, 5, [10.0, 10.0, 0.0, 5.0]), ann(2, 7, 9, [1.0, 1.0, 5.0, 5.0])]
    )
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        dataset = DetectionDataset(toy, ["thin"], None)
    assert dataset.num_degenerate_boxes == 1
    assert dataset.raw_target(0)["labels"].tolist() == [1]
    assert "dropped 1 boxes" in caplog.text and "[1]" in caplog.text


def corrupt_image(toy, name="a.png"):
    with open(os.path.join(toy, "images", name), "wb") as f:
        f.write(b"not a png at all")


def test_bad_image_raises_naming_file(toy):
    corrupt_image(toy)
    dataset = DetectionDataset(toy, ["train"], eval_transforms())
    with pytest.raises(ImageReadError, match="a.png"):
        dataset[0]


def test_skip_bad_images_gives_marker_and_warning(toy, caplog):
    corrupt_image(toy)
    dataset = DetectionDataset(toy, ["train"], eval_transforms(), skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        sample = dataset[0]
    assert isinstance(sample, SkippedSample)
    assert sample.file_name == os.path.join(toy, "images/a.png") and "not a decodable image" in sample.reason
    assert "a.png" in caplog.text
    images, targets, skipped = Collate(32)([sample, dataset[1]])
    assert images.shape == (1, 3, 96, 96) and [t["image_id"] for t in targets] == [2]
    assert skipped == [os.path.join(toy, "images/a.png")]


def test_image_size_must_match_annotation(toy):
    write_image(toy, "a.png", 60, 40)  # stored transposed
    dataset = DetectionDataset(toy, ["train"], eval_transforms())
    with pytest.raises(ImageReadError, match="a.png.*60 x 40.*40 x 60.*EXIF"):
        dataset[0]


def test_build_dataset_from_args(toy, tmp_path):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# subset\ndog\n\nbird\n")
    args = parse_options(
        data_root=os.path.dirname(toy),
        dataset="toy",
        train_sets="train,val",
        val_sets="val",
        classes=str(classes_file),
        input_dim=32,
    )
    train_set = build_dataset(args, args.train_sets, train=True)
    assert train_set.splits == ["train", "val"] and train_set.class_names == ["dog", "bird"]
    np.random.seed(0)
    for i in range(len(train_set)):
        image, target = train_set[i]
        assert image.shape == (3, 32, 32)
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 32)).all()
    args.classes = None
    val_set = build_dataset(args, args.val_sets, train=False)
    image, target = val_set[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[3.2, 2.56, 12.8, 7.68]]))
    assert val_set.class_names == ["cat", "dog", "bird"]


def test_parse_classes(tmp_path):
    assert parse_classes(None) is None
    assert parse_classes("dog, bird") == ["dog", "bird"]
    path = tmp_path / "c.txt"
    path.write_text("/m/01\n# comment\n\n/m/02\n")
    assert parse_classes(str(path)) == ["/m/01", "/m/02"]
    with pytest.raises(ValueError, match="--classes"):
        parse_classes(" , ")


def test_missing_images_lists_absent_files_in_order(toy):
    dataset = DetectionDataset(toy, ["train", "val"], eval_transforms())
    assert dataset.missing_images() == []
    os.remove(os.path.join(toy, "images", "b.png"))
    os.remove(os.path.join(toy, "images", "a.png"))
    corrupt_image(toy, "c.png")  # present but unreadable: found when read, not here
    assert dataset.missing_images() == [
        os.path.join(toy, "images", "a.png"),
        os.path.join(toy, "images", "b.png"),
    ]


def test_check_same_classes_names_the_file_and_the_labels(toy):
    val = DetectionDataset(toy, ["val"], eval_transforms())
    check_same_classes(val, ["cat", "dog", "bird"], [5, 9, 2], "the checkpoint")  # same: no error
    write_split(toy, "reordered", [], [], categories=[CATEGORIES[1], CATEGORIES[0], CATEGORIES[2]])
    reordered = DetectionDataset(toy, ["reordered"], eval_transforms())
    with pytest.raises(ValueError) as e:
        check_same_classes(reordered, ["cat", "dog", "bird"], [5, 9, 2], "the checkpoint")
    assert "reordered.json has other classes (name, id) than the checkpoint" in str(e.value)
    assert "label 0: ('dog', 9) here, ('cat', 5) in training; label 1: ('cat', 5) here" in str(e.value)
    assert "label 2" not in str(e.value)
    with pytest.raises(ValueError, match="label 1: \\('dog', 9\\) here, \\('dog', 7\\) in training"):
        check_same_classes(val, ["cat", "dog", "bird"], [5, 7, 2], "the checkpoint")
    with pytest.raises(ValueError, match="3 classes here, 2 in training"):
        check_same_classes(val, ["cat", "dog"], [5, 9], "the checkpoint")


def test_missing_split_names_the_prep_script_and_the_splits_that_exist(toy, tmp_path):
    with pytest.raises(ValueError) as e:
        DetectionDataset(toy, ["trian"], None)
    message = str(e.value)
    assert "trian.json: no split 'trian' in dataset 'toy' (it has train, val)" in message
    assert "python prep/voc.py --xml_dir XML_DIR --image_dir IMAGE_DIR --dataset toy" in message
    with pytest.raises(ValueError) as e:
        DetectionDataset(str(tmp_path / "nowhere" / "voc"), ["test2007"], None)
    assert str(e.value) == (
        f"dataset 'voc' not found: {str(tmp_path / 'nowhere' / 'voc')!r} does not exist. Convert it first: "
        "python prep/voc.py --devkit PATH/VOCdevkit --sets 2007:trainval 2012:trainval 2007:test "
        "(or point --data_root at the folder that holds voc/)"
    )
    empty_root = tmp_path / "datasets" / "shapes"
    empty_root.mkdir(parents=True)
    with pytest.raises(ValueError, match="dataset 'shapes' has no converted split yet; .*prep/shapes.py"):
        DetectionDataset(str(empty_root), ["train"], None)


def test_no_categories_is_an_error_naming_the_file(toy):
    write_split(toy, "nocat", [{"id": 1, "file_name": "images/a.png", "width": 60, "height": 40}], [], [])
    with pytest.raises(ValueError, match="nocat.json: the category list is empty"):
        DetectionDataset(toy, ["nocat"], None)


def test_an_image_file_in_two_splits_read_together_is_refused(toy):
    # Another id, the same file: it would train twice, once as background (this split has no box for it).
    write_split(toy, "again", [{"id": 8, "file_name": "images/./a.png", "width": 60, "height": 40}], [])
    with pytest.raises(ValueError) as e:
        DetectionDataset(toy, ["train", "again"], None)
    assert "image file 'images/./a.png' is listed by " in str(e.value)
    assert "train.json and by " in str(e.value) and "again.json (image id 8)" in str(e.value)


def test_usable_boxes_per_class_leave_out_difficult_and_crowd(toy):
    train = DetectionDataset(toy, ["train"], None)
    # a: dog, crowd cat, difficult bird; b: no box. Labels follow the category list: cat, dog, bird.
    assert train.num_boxes_per_class.tolist() == [0, 1, 0]
    assert train.num_images_without_boxes == 1
    subset = DetectionDataset(toy, ["train"], None, classes=["bird"])
    assert subset.num_boxes_per_class.tolist() == [0] and subset.num_images_without_boxes == 2


def test_a_classes_file_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match="--classes file 'bins/bin_0.txt' does not exist"):
        parse_classes("bins/bin_0.txt")
    assert parse_classes("/m/01g317,/m/0dog") == ["/m/01g317", "/m/0dog"]  # MIDs hold slashes
