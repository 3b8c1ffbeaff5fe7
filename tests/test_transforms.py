import pickle

import numpy as np
import pytest
import torch

from data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_PIXEL,
    Compose,
    Expand,
    PhotometricDistort,
    RandomHorizontalFlip,
    RandomSampleCrop,
    Resize,
    ToTensorNormalize,
    build_transforms,
    compute_resize,
    crop,
)


def make_target(boxes, labels=None):
    """Box index encoded in every per-box array: label i, difficult i % 2, crowd i % 3 == 0."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    index = np.arange(len(boxes))
    return {
        "boxes": boxes,
        "labels": index.astype(np.int64) if labels is None else np.asarray(labels, np.int64),
        "difficult": index % 2 == 1,
        "iscrowd": index % 3 == 0,
        "image_id": 7,
        "file_name": "images/x.jpg",
        "orig_size": np.array([0, 0], np.int64),
    }


def assert_aligned(target):
    """The per-box arrays still belong to the same boxes (labels carry the original index)."""
    labels = np.asarray(target["labels"])
    assert len(target["boxes"]) == len(labels) == len(target["difficult"]) == len(target["iscrowd"])
    np.testing.assert_array_equal(np.asarray(target["difficult"]), labels % 2 == 1)
    np.testing.assert_array_equal(np.asarray(target["iscrowd"]), labels % 3 == 0)


def assert_inside(boxes, height, width):
    boxes = np.asarray(boxes)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def random_sample(rng, max_side=60, max_boxes=6):
    """A coordinate-coded image (R = x, G = y, B = 255: pixels can be traced through geometric
    transforms) and boxes whose centres are at least 5 px inside the image."""
    height, width = rng.integers(20, max_side + 1, size=2)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs, ys, np.full_like(xs, 255)], axis=2).astype(np.uint8)
    num_boxes = int(rng.integers(1, max_boxes + 1))
    cx = rng.uniform(5, width - 5, num_boxes)
    cy = rng.uniform(5, height - 5, num_boxes)
    half_w = rng.uniform(1, np.minimum(cx, width - cx))
    half_h = rng.uniform(1, np.minimum(cy, height - cy))
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    return image, make_target(boxes)


# ---------------------------------------------------------------- resize


def test_compute_resize_hand_computed():
    assert compute_resize(375, 500, "keep_aspect") == (600, 800, 1.6, 1.6)
    assert compute_resize(500, 2000, "keep_aspect") == (250, 1000, 0.5, 0.5)
    assert compute_resize(375, 500, "square", input_dim=600) == (600, 600, 1.2, 1.6)
    assert compute_resize(300, 300, "square", input_dim=512) == (512, 512, 512 / 300, 512 / 300)
    # Long side limited: 600 / 333 * 1000 > 1000 -> scale 1000 / 1000 = 1.0.
    assert compute_resize(333, 1000, "keep_aspect") == (333, 1000, 1.0, 1.0)


def test_compute_resize_elementwise_on_arrays():
    hs, ws = np.array([375, 500, 333]), np.array([500, 2000, 1000])
    new_h, new_w, sx, sy = compute_resize(hs, ws, "keep_aspect")
    np.testing.assert_array_equal(new_h, [600, 250, 333])
    np.testing.assert_array_equal(new_w, [800, 1000, 1000])
    np.testing.assert_allclose(sx, [1.6, 0.5, 1.0])
    np.testing.assert_allclose(sy, [1.6, 0.5, 1.0])
    new_h, new_w, sx, sy = compute_resize(hs, ws, "square", input_dim=600)
    np.testing.assert_array_equal(new_h, [600] * 3)
    np.testing.assert_allclose(sx, 600 / ws)


def test_compute_resize_unknown_mode():
    with pytest.raises(ValueError, match="resize_mode"):
        compute_resize(10, 10, "fit")


@pytest.mark.parametrize(
    "mode, height, width, expected_size, expected_box",
    [
        # 500 x 375 keep-aspect -> 800 x 600, scale 1.6.
        ("keep_aspect", 375, 500, (600, 800), [16.0, 32.0, 176.0, 352.0]),
        # 2000 x 500 -> 1000 x 250, scale 0.5.
        ("keep_aspect", 500, 2000, (250, 1000), [5.0, 10.0, 55.0, 110.0]),
        # square 600: sx = 600 / 500 = 1.2, sy = 600 / 375 = 1.6.
        ("square", 375, 500, (600, 600), [12.0, 32.0, 132.0, 352.0]),
    ],
)
def test_resize_scales_boxes_exactly(mode, height, width, expected_size, expected_box):
    image = np.zeros((height, width, 3), np.uint8)
    boxes = [[10, 20, 110, 220], [0, 0, width, height]]
    out_image, target = Resize(mode, 600, 600, 1000)(image, make_target(boxes))
    new_h, new_w = expected_size
    assert out_image.shape == (new_h, new_w, 3)
    np.testing.assert_allclose(target["boxes"][0], expected_box, rtol=1e-6)
    np.testing.assert_array_equal(target["boxes"][1], [0, 0, new_w, new_h])  # the full-image box stays full
    np.testing.assert_array_equal(target["size"], [new_h, new_w])
    np.testing.assert_allclose(target["scale"], [new_w / width, new_h / height], rtol=1e-6)


# ---------------------------------------------------------------- flip, expand, crop


def test_flip_is_exact():
    image = np.arange(2 * 100 * 3, dtype=np.uint8).reshape(2, 100, 3)
    target = make_target([[10, 20, 30, 40], [0, 0, 100, 2]])
    out_image, out = RandomHorizontalFlip(p=1.0)(image, target)
    np.testing.assert_array_equal(out["boxes"], [[70, 20, 90, 40], [0, 0, 100, 2]])
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    assert_aligned(out)
    same_image, same = RandomHorizontalFlip(p=0.0)(image, target)
    np.testing.assert_array_equal(same["boxes"], target["boxes"])


def test_expand_places_image_and_shifts_boxes():
    np.random.seed(3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, target = random_sample(rng)
        height, width = image.shape[:2]
        out_image, out = Expand(MEAN_PIXEL, max_ratio=4.0, p=1.0)(image, target)
        real = np.argwhere(out_image[:, :, 2] == 255)
        top, left = real.min(axis=0)
        assert real.max(axis=0).tolist() == [top + height - 1, left + width - 1]
        np.testing.assert_array_equal(out_image[top : top + height, left : left + width], image)
        fill = np.ones(out_image.shape[:2], bool)
        fill[top : top + height, left : left + width] = False
        np.testing.assert_array_equal(
            out_image[fill], np.tile(np.round(MEAN_PIXEL).astype(np.uint8), (fill.sum(), 1))
        )
        np.testing.assert_array_equal(
            out["boxes"], target["boxes"] + np.array([left, top, left, top], np.float32)
        )
        assert out_image.shape[0] <= 4 * height and out_image.shape[1] <= 4 * width
        assert_inside(out["boxes"], *out_image.shape[:2])


def test_crop_counts_removed_objects_hand_case():
    image = np.zeros((100, 100, 3), np.uint8)
    # centres: (20, 20) on the crop's left edge (not strictly inside), (75, 75) outside, (50, 10) inside.
    target = make_target([[10, 10, 30, 30], [60, 60, 90, 90], [40, 0, 60, 20]])
    target["num_cropped_out"] = 1  # from an earlier crop: counts add up
    out_image, out = crop(image, target, np.array([20, 0, 70, 50]))
    assert out_image.shape == (50, 50, 3)
    np.testing.assert_array_equal(out["boxes"], [[20, 0, 40, 20]])
    np.testing.assert_array_equal(out["labels"], [2])
    assert out["num_cropped_out"] == 3
    assert_aligned(out)
    # A kept box that sticks out is clipped to the crop.
    _, out = crop(image, make_target([[10, 10, 60, 40]]), np.array([20, 5, 70, 30]))
    np.testing.assert_array_equal(out["boxes"], [[0, 5, 40, 25]])
    assert out["num_cropped_out"] == 0


def trace_geometry(out_image):
    """(flipped, tx, ty) such that an original x maps to tx + x (or tx - x when flipped), y to ty + y."""
    real = out_image[:, :, 2] == 255
    vs, us = np.nonzero(real)
    xs, ys = out_image[vs, us, 0].astype(int), out_image[vs, us, 1].astype(int)
    ty = np.unique(vs - ys)
    assert len(ty) == 1  # rigid vertical shift
    if len(np.unique(us + xs)) == 1 and len(np.unique(us - xs)) > 1:
        return True, int((us + xs)[0]) + 1, int(ty[0])  # pixel u = c - 1 - x
    shift = np.unique(us - xs)
    assert len(shift) == 1
    return False, int(shift[0]), int(ty[0])


def test_geometric_augmentation_exact_over_random_trials():
    """Expand -> crop -> flip, 300 trials: every output box equals the traced original box clipped to
    the output, exactly the boxes with a centre inside are kept, and the removed ones are counted."""
    np.random.seed(0)
    rng = np.random.default_rng(1)
    geometric = Compose([Expand(MEAN_PIXEL, p=0.5), RandomSampleCrop(), RandomHorizontalFlip(p=0.5)])
    num_cropped_total = 0
    for _ in range(300):
        image, target = random_sample(rng)
        out_image, out = geometric(image, target)
        height, width = out_image.shape[:2]
        flipped, tx, ty = trace_geometry(out_image)
        boxes = target["boxes"].astype(np.float64)
        if flipped:
            mapped = np.stack(
                [tx - boxes[:, 2], boxes[:, 1] + ty, tx - boxes[:, 0], boxes[:, 3] + ty], axis=1
            )
        else:
            mapped = boxes + [tx, ty, tx, ty]
        centres = (mapped[:, :2] + mapped[:, 2:]) / 2
        inside = (centres > 0).all(1) & (centres < [width, height]).all(1)
        expected = np.clip(mapped, 0, [width, height, width, height])[inside]
        np.testing.assert_array_equal(out["labels"], np.nonzero(inside)[0])
        np.testing.assert_allclose(out["boxes"], expected, atol=1e-4)
        assert out.get("num_cropped_out", 0) == (~inside).sum()
        assert len(out["boxes"]) >= 1  # the crop never removes every object
        assert_inside(out["boxes"], height, width)
        assert_aligned(out)
        num_cropped_total += out.get("num_cropped_out", 0)
    assert num_cropped_total > 0  # the trials did exercise removal


def test_crop_min_iou_is_enforced():
    np.random.seed(1)
    image = np.zeros((100, 100, 3), np.uint8)
    target = make_target([[20, 20, 80, 80]])
    sampler = RandomSampleCrop(min_ious=(0.7,))
    for _ in range(50):
        out_image, out = sampler(image, target)
        # The single box is clipped to the crop, so IoU = clipped box area / crop area (box area >= it).
        crop_area = out_image.shape[0] * out_image.shape[1]
        clipped = out["boxes"][0]
        intersection = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
        assert intersection / (3600 + crop_area - intersection) >= 0.7


def test_crop_without_boxes_and_with_only_ignored_boxes():
    np.random.seed(2)
    image = np.zeros((50, 80, 3), np.uint8)
    sampler = RandomSampleCrop(min_ious=(0.9,))
    out_image, out = sampler(image, make_target(np.zeros((0, 4))))
    assert len(out["boxes"]) == 0 and out["num_cropped_out"] == 0
    assert out_image.shape[0] < 50 or out_image.shape[1] < 80  # a real crop, unconstrained
    # Only ignored boxes: they decide the crop (overlap and a centre inside) in place of objects.
    target = make_target([[5, 5, 45, 45], [40, 10, 75, 40]], labels=[-1, -1])
    sampler = RandomSampleCrop(min_ious=(0.3,))
    for _ in range(20):
        _, out = sampler(image, target)
        assert len(out["boxes"]) >= 1
    # Without None among the options and no acceptable patch, max_rounds ends the search: image kept whole.
    tiny = make_target([[0, 0, 1, 1]])
    out_image, out = RandomSampleCrop(min_ious=(0.9,), max_trials=5, max_rounds=3)(image, tiny)
    assert out_image.shape == image.shape and len(out["boxes"]) == 1


# ---------------------------------------------------------------- photometric, normalise, pipelines


def test_photometric_keeps_grey_grey_and_target_untouched():
    np.random.seed(4)
    grey = np.repeat(np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8, 1), 3, axis=2)
    target = make_target([[1, 1, 5, 5]])
    distort = PhotometricDistort()
    changed = 0
    for _ in range(30):
        out, out_target = distort(grey, target)
        assert out.dtype == np.uint8 and out.shape == grey.shape
        # brightness/contrast act on all channels alike; saturation/hue do not colour a grey pixel.
        assert np.abs(out.astype(int) - out[:, :, :1].astype(int)).max() <= 1
        changed += int((out != grey).any())
        assert out_target is target
    assert changed > 0


def test_photometric_brightness_only_is_a_constant_shift():
    np.random.seed(5)
    image = np.full((4, 4, 3), 100, np.uint8)
    distort = PhotometricDistort(contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0), hue_delta=0.0)
    shifts = {int(distort(image, {})[0][0, 0, 0]) - 100 for _ in range(40)}
    assert 0 in shifts and len(shifts) > 2 and all(-32 <= s <= 32 for s in shifts)


def test_to_tensor_normalize_values_and_dtypes():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (255, 0, 128)
    image[1, 2] = np.round(MEAN_PIXEL).astype(np.uint8)
    target = make_target([[0, 0, 1, 1]])
    tensor, out = ToTensorNormalize()(image, target)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert tensor[:, 1, 2].abs().max() < 0.01  # the mean pixel is ~0
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert out["difficult"].dtype == torch.bool and out["iscrowd"].dtype == torch.bool
    assert out["size"].tolist() == [2, 3] and out["num_cropped_out"] == 0
    assert out["image_id"] == 7 and out["file_name"] == "images/x.jpg"


def test_eval_pipeline_resizes_and_normalises_only():
    image = np.full((375, 500, 3), 200, np.uint8)
    target = make_target([[10, 20, 110, 220]])
    target["orig_size"] = np.array([375, 500])
    tensor, out = build_transforms(False, "keep_aspect", min_size=600, max_size=1000)(image, target)
    assert tensor.shape == (3, 600, 800)
    torch.testing.assert_close(out["boxes"], torch.tensor([[16.0, 32.0, 176.0, 352.0]]))
    assert out["size"].tolist() == [600, 800] and out["orig_size"].tolist() == [375, 500]
    torch.testing.assert_close(out["scale"], torch.tensor([1.6, 1.6]))
    assert out["num_cropped_out"] == 0
    torch.testing.assert_close(
        tensor[:, 300, 400], (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    )


@pytest.mark.parametrize("mode", ["square", "keep_aspect"])
def test_train_pipeline_boxes_inside_and_aligned(mode):
    np.random.seed(6)
    rng = np.random.default_rng(2)
    transforms = build_transforms(True, mode, input_dim=64, min_size=48, max_size=80)
    for _ in range(100):
        image, target = random_sample(rng)
        num_boxes = len(target["boxes"])
        tensor, out = transforms(image, target)
        height, width = tensor.shape[1:]
        assert out["size"].tolist() == [height, width]
        if mode == "square":
            assert (height, width) == (64, 64)
        else:
            assert min(height, width) == 48 or max(height, width) == 80
        assert len(out["boxes"]) >= 1 and len(out["boxes"]) + out["num_cropped_out"] == num_boxes
        assert_inside(out["boxes"].numpy(), height, width)
        assert_aligned({k: v.numpy() if torch.is_tensor(v) else v for k, v in out.items()})


def test_train_without_augment_equals_eval_and_transforms_pickle():
    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    target = make_target([[5, 5, 20, 30]])
    a = build_transforms(True, "square", input_dim=32, augment=False)(image, target)
    b = build_transforms(False, "square", input_dim=32)(image, target)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"])
    restored = pickle.loads(pickle.dumps(build_transforms(True, "keep_aspect")))
    assert len(restored.transforms) == 6
    with pytest.raises(ValueError, match="resize_mode"):
        build_transforms(True, "stretch")


def test_flip_only_augmentation_is_the_eval_result_or_its_mirror():
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    target = make_target([[5, 5, 20, 30], [30, 10, 49, 39]])
    plain = build_transforms(False, "square", input_dim=32)(image, target)
    flip = build_transforms(True, "square", input_dim=32, augment="flip")
    assert [type(t) for t in flip.transforms] == [RandomHorizontalFlip, Resize, ToTensorNormalize]
    seen_flipped = seen_plain = False
    for seed in range(20):
        np.random.seed(seed)
        tensor, out = flip(image, target)
        if torch.equal(tensor, plain[0]):
            seen_plain = True
            torch.testing.assert_close(out["boxes"], plain[1]["boxes"])
        else:
            seen_flipped = True
            torch.testing.assert_close(tensor, plain[0].flip(-1))
            # x1' = W - x2, x2' = W - x1 on the 32-wide output
            expected = plain[1]["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1])
            expected[:, [0, 2]] += 32
            torch.testing.assert_close(out["boxes"], expected)
        assert out.get("num_cropped_out", 0) == 0 and len(out["boxes"]) == 2
    assert seen_flipped and seen_plain
    assert [type(t) for t in build_transforms(True, "square", augment="none").transforms] == [
        Resize,
        ToTensorNormalize,
    ]
    with pytest.raises(ValueError, match="unknown augment"):
        build_transforms(True, "square", augment="mosaic")


# ---------------------------------------------------------------- the original's crop rule (--crop_rule all)


def _crop_rect(out_image):
    """The crop's (x1, y1, x2, y2) in the coordinate-coded input (R = x, G = y)."""
    x1, y1 = int(out_image[0, 0, 0]), int(out_image[0, 0, 1])
    return np.array([x1, y1, x1 + out_image.shape[1], y1 + out_image.shape[0]], np.float64)


def _ious(boxes, rect):
    lt, rb = np.maximum(boxes[:, :2], rect[:2]), np.minimum(boxes[:, 2:], rect[2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    return inter / (area + (rect[2:] - rect[:2]).prod() - inter)


@pytest.mark.parametrize("rule", ["any", "all"])
def test_crop_rule_any_versus_all(rule):
    """Two boxes of a 100 x 100 image, min IoU 0.3 only: with "all" every crop reaches 0.3 with both boxes
    (the original's overlap.min() < min_iou rejection), with "any" with at least one, and some crops miss
    the other box (so the rules differ on this case)."""
    np.random.seed(3)
    ys, xs = np.mgrid[0:100, 0:100]
    image = np.stack([xs, ys, np.full_like(xs, 255)], axis=2).astype(np.uint8)
    boxes = np.array([[10, 10, 60, 60], [40, 40, 90, 90]], np.float32)
    target = {"boxes": boxes, "labels": np.array([0, 1]), "difficult": np.zeros(2, bool)}
    sampler = RandomSampleCrop(min_ious=(0.3,), iou_rule=rule)
    min_ious = []
    for _ in range(200):
        out_image, out = sampler(image, target)
        ious = _ious(boxes.astype(np.float64), _crop_rect(out_image))
        assert (ious.min() if rule == "all" else ious.max()) >= 0.3
        min_ious.append(ious.min())
    assert (min(min_ious) < 0.3) == (rule == "any")


def test_original_crop_rule_in_the_pipeline():
    cropper = build_transforms(True, crop_rule="all").transforms[2]
    assert (cropper.iou_rule, cropper.max_trials) == ("all", 20)  # the original's 20 trials per option
    cropper = build_transforms(True).transforms[2]
    assert (cropper.iou_rule, cropper.max_trials) == ("any", 50)
    with pytest.raises(ValueError, match="iou_rule"):
        RandomSampleCrop(iou_rule="most")


def test_crop_rule_hand_computed(monkeypatch):
    """Scripted draws: candidate 1 is [10,10,60,60] (IoU 1 with box 0, 400/4600 = 0.09 with box 1),
    candidate 2 is [20,20,80,80] (1600/4500 = 0.36 with both). At min IoU 0.3, "any" takes candidate 1 (and
    removes box 1, whose centre is outside), "all" rejects it and takes candidate 2."""
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[10, 10, 60, 60], [40, 40, 90, 90]], np.float32)
    target = {"boxes": boxes, "labels": np.array([0, 1]), "difficult": np.zeros(2, bool)}
    for rule, expected in (
        ("any", [[0, 0, 50, 50]]),
        ("all", [[0, 0, 40, 40], [20, 20, 60, 60]]),
    ):
        draws = iter([50.0, 50.0, 10.0, 10.0, 60.0, 60.0, 20.0, 20.0])  # w, h, left, top per candidate
        monkeypatch.setattr(np.random, "randint", lambda n: 0)  # the first option: min IoU 0.3
        monkeypatch.setattr(np.random, "uniform", lambda *a, draws=draws: next(draws))
        out_image, out = RandomSampleCrop(min_ious=(0.3,), iou_rule=rule)(image, target)
        assert out_image.shape[:2] == ((50, 50) if rule == "any" else (60, 60))
        np.testing.assert_array_equal(out["boxes"], expected)
        assert out.get("num_cropped_out", 0) == (1 if rule == "any" else 0)  # box 1's centre (65, 65) is out
