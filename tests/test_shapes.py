import os

import cv2
import numpy as np
import pytest

from data.annotations import load_annotations
from prep import shapes, shapes_render

TINY = ["--num_train", "4", "--num_val", "2", "--image_size", "96", "--min_size", "8", "--max_size", "64"]


def run_main(tmp_path, *extra):
    args = shapes.get_args_parser().parse_args(["--data_root", str(tmp_path), *TINY, *extra])
    return shapes.main(args)


def tree_bytes(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_same_seed_same_bytes_whatever_the_workers_and_other_seed_differs(tmp_path):
    run_main(tmp_path / "a", "-j", "0")
    run_main(tmp_path / "b", "-j", "2")
    run_main(tmp_path / "c", "-j", "0", "--seed", "1")
    a, b, c = (tree_bytes(tmp_path / x) for x in "abc")
    assert len(a) == 4 + 2 + 2  # PNGs + train.json + val.json, nothing else (no temp files left)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_annotations_load_and_match_the_rendered_boxes(tmp_path):
    stats = run_main(tmp_path, "-j", "0")
    root = tmp_path / "shapes"
    for split, num in (("train", 4), ("val", 2)):
        coco = load_annotations(str(root / "annotations" / f"{split}.json"))
        assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
        assert len(coco["images"]) == num
        split_no = {"train": 1, "val": 2}[split]
        for i, image in enumerate(coco["images"]):
            assert image["id"] == split_no * 1_000_000 + i
            assert image["file_name"] == f"images/{split}/{i:06d}.png"
            pixels = cv2.imread(str(root / image["file_name"]), cv2.IMREAD_COLOR)
            assert pixels.shape == (96, 96, 3) and image["width"] == image["height"] == 96
            # Re-render the image: the file holds the same pixels and the JSON the same boxes.
            cfg = shapes.config_from_args(shapes.get_args_parser().parse_args(TINY))
            rendered, labels, boxes, _ = shapes.render_image(shapes.image_rng(0, split, i), cfg)
            np.testing.assert_array_equal(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), rendered)
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert [a["category_id"] - 1 for a in anns] == labels.tolist()
            xywh = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
            np.testing.assert_array_equal(xywh[:, :2], boxes[:, :2])
            np.testing.assert_array_equal(xywh[:, :2] + xywh[:, 2:], boxes[:, 2:])
            assert all(a["iscrowd"] == 0 and a["difficult"] == 0 for a in anns)
            assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in anns)
        s = stats["splits"][split]
        assert s["rejected_shapes"] >= 0 and s["low_contrast_shapes"] >= 0
        assert s["images"] == num and s["boxes"] == len(coco["annotations"]) == sum(
            s["boxes_per_class"].values()
        )
        per_image = np.bincount([a["image_id"] % 1_000_000 for a in coco["annotations"]], minlength=num)
        assert s["boxes_per_image"] == {
            "min": per_image.min(),
            "mean": per_image.mean(),
            "max": per_image.max(),
        }


def test_masks_to_boxes_xyxy_hand_computed():
    masks = np.zeros((2, 6, 7), bool)
    masks[0, 1:4, 2:5] = True  # rows 1..3, cols 2..4
    masks[1, 5, 6] = True  # the bottom-right pixel
    masks[1, 0, 0] = True
    np.testing.assert_array_equal(shapes_render.masks_to_boxes_xyxy(masks), [[2, 1, 5, 4], [0, 0, 7, 6]])
    assert shapes_render.masks_to_boxes_xyxy(np.zeros((0, 6, 7), bool)).shape == (0, 4)


def test_every_box_is_tight_around_its_shape_coloured_pixels():
    # Without noise an object's pixels have exactly its colour: find them in the image itself
    # (independently of the masks the renderer keeps) and check the box is their bounding box.
    cfg = shapes.ShapesConfig(image_size=96, min_size=8, max_size=72, noise=0.0, max_shapes=8)
    num_checked = 0
    for i in range(25):
        image, labels, boxes, debug = shapes.render_image(shapes.image_rng(3, "train", i), cfg)
        for k, colour in enumerate(debug["colours"]):
            x1, y1, x2, y2 = boxes[k].astype(int)
            # Search a margin around the box too: pixels of the object outside its box would show there.
            m = 3
            window = (slice(max(y1 - m, 0), y2 + m), slice(max(x1 - m, 0), x2 + m))
            coloured = np.zeros(image.shape[:2], bool)
            coloured[window] = np.all(image[window] == colour, axis=2)
            np.testing.assert_array_equal(coloured, debug["masks"][k])
            ys, xs = np.nonzero(coloured)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]
            num_checked += 1
        # Overlap rule: every object keeps at least min_visible of its pixels.
        assert np.all(debug["masks"].sum(axis=(1, 2)) >= cfg.min_visible * debug["full_areas"])
    assert num_checked > 50


def test_classes_sizes_aspect_ratios_and_counts_vary():
    cfg = shapes.ShapesConfig(image_size=128, min_size=8, max_size=96)
    all_labels, all_boxes, counts, rejected, low_contrast = [], [], [], 0, 0
    for i in range(80):
        _, labels, boxes, debug = shapes.render_image(shapes.image_rng(0, "val", i), cfg)
        all_labels.append(labels)
        all_boxes.append(boxes)
        counts.append(len(labels) + debug["rejected"])
        rejected += debug["rejected"]
        low_contrast += debug["low_contrast"]
    labels, boxes = np.concatenate(all_labels), np.concatenate(all_boxes)
    assert np.bincount(labels, minlength=3).min() > 40  # every class, roughly evenly
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    long_side = np.maximum(w, h)
    assert long_side.min() <= 12 and long_side.max() >= 80  # small to large
    assert (long_side < 16).sum() >= 10 and (long_side > 48).sum() >= 10
    assert np.all((boxes >= 0) & (boxes <= 128))
    for c in range(3):  # stretched in both directions for every class
        ratio = (w / h)[labels == c]
        assert ratio.min() < 0.67 and ratio.max() > 1.5
    assert min(counts) == 1 and max(counts) == 6 and rejected <= 0.02 * len(labels)
    assert low_contrast <= 0.05 * len(labels)


def test_samples_and_bad_options(tmp_path):
    args = shapes.get_args_parser().parse_args(
        ["--samples_dir", str(tmp_path / "s"), "--num_samples", "2", "--image_size", "64", "--min_size", "8"]
    )
    result = shapes.main(args)
    assert [os.path.basename(p) for p in result["samples"]] == ["shapes_00.png", "shapes_01.png"]
    assert cv2.imread(result["samples"][1]).shape == (64, 64, 3)
    assert not os.path.exists(tmp_path / "shapes")  # only samples, not the data set
    for bad in (
        ["--min_size", "300"],
        ["--max_aspect", "0.5"],
        ["--min_visible", "0"],
        ["--max_shapes", "100"],
    ):
        with pytest.raises(ValueError, match="prep/shapes.py"):
            shapes.config_from_args(shapes.get_args_parser().parse_args(bad))
