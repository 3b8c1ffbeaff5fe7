"""data/checks.py: a training set must have something to learn, a validation set something to score."""

import json
import logging
import os

import pytest

from data.checks import check_train_split, check_val_split
from data.dataset import DetectionDataset

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]


def _box(ann_id, image_id, category_id, **flags):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [1, 1, 4, 4],
        "area": 16,
        "iscrowd": flags.get("iscrowd", 0),
        "difficult": flags.get("difficult", 0),
    }


def _split(root, split, num_images, annotations, first_id=1):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images = [
        {"id": first_id + i, "file_name": f"images/{first_id + i}.png", "width": 10, "height": 10}
        for i in range(num_images)
    ]
    with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return DetectionDataset(root, [split], None)


def test_a_training_set_without_a_box_to_learn_is_refused(tmp_path):
    root = str(tmp_path / "toy")
    with pytest.raises(ValueError, match=r"toy/empty: the training set has no image \(.*empty.json\)"):
        check_train_split(_split(root, "empty", 0, []))
    with pytest.raises(ValueError, match="toy/bg: the training set has no box .* in its 3 images"):
        check_train_split(_split(root, "bg", 3, []))
    # Difficult and crowd boxes are ignored by the matcher: still nothing to learn.
    ignored = _split(root, "ignored", 2, [_box(1, 1, 1, difficult=1), _box(2, 2, 2, iscrowd=1)])
    with pytest.raises(ValueError, match="toy/ignored: the training set has no box"):
        check_train_split(ignored)
    subset = DetectionDataset(root, ["ignored"], None, classes=["bird"])
    with pytest.raises(ValueError, match="no box of the classes selected by --classes"):
        check_train_split(subset)


def test_classes_without_training_boxes_are_named(tmp_path, caplog):
    dataset = _split(
        str(tmp_path / "toy"), "train", 3, [_box(1, 1, 2), _box(2, 1, 2), _box(3, 2, 3, difficult=1)]
    )
    with caplog.at_level(logging.INFO, logger="data.checks"):
        check_train_split(dataset)
    assert (
        "toy/train: 2 of 3 classes have no training box and will never be detected: cat, bird" in caplog.text
    )
    assert "toy/train: 2 of 3 training images have no box to learn from" in caplog.text


def test_a_validation_set_without_boxes_or_shared_with_training(tmp_path, caplog):
    root = str(tmp_path / "toy")
    train = _split(root, "train", 3, [_box(1, 1, 1)])
    with pytest.raises(ValueError, match="toy/novalbox: the validation set has no box .* --no_val"):
        check_val_split(_split(root, "novalbox", 2, [_box(1, 1, 1, difficult=1)], first_id=1), train)
    with pytest.raises(ValueError, match="toy/noval: the validation set has no image"):
        check_val_split(_split(root, "noval", 0, []), train)
    # Images 3 and 4 of val; image 3 is also a training image (same file).
    val = _split(root, "val", 2, [_box(1, 3, 1), _box(2, 4, 2)], first_id=3)
    with caplog.at_level(logging.WARNING, logger="data.checks"):
        check_val_split(val, train)
    assert "toy/val: 1 of 2 validation images are also training images (e.g. " in caplog.text
    assert os.path.join("images", "3.png") in caplog.text
    caplog.clear()
    check_val_split(_split(root, "val2", 1, [_box(1, 9, 1)], first_id=9), train)
    assert caplog.text == ""
