"""Box-aware image transforms: SSD-style augmentation, resize, normalisation.

Every transform is a callable ``(image, target) -> (image, target)``:
- image: np.ndarray[H, W, 3] RGB (uint8 except inside PhotometricDistort); ToTensorNormalize makes
  it Tensor[3, H, W] float32.
- target: dict of numpy arrays. The per-box arrays named in BOX_FIELDS (``boxes`` np.float32[G, 4],
  xyxy, absolute pixels of the current image; ``labels`` [G]; ``difficult`` [G]; ``iscrowd`` [G])
  are always indexed together, so they stay aligned. Other keys pass through. The transforms add
  ``num_cropped_out`` (boxes removed by RandomSampleCrop), ``size`` (h, w after Resize) and
  ``scale`` (sx, sy of Resize), and ToTensorNormalize turns the arrays into tensors.

The training augmentation follows SSD (Liu et al. 2016; Caffe SSD and ssd.pytorch's
augmentations.py): photometric distortion, zoom out (Expand), IoU-constrained crop
(RandomSampleCrop), horizontal flip, then resize. All randomness comes from NumPy's global RNG
(``np.random``): the training loader seeds it per sample (data/loaders.py), so augmentations are
reproducible across workers and resumes; seed it yourself (``np.random.seed``) in tests.
Transforms keep no RNG state and are picklable for DataLoader workers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from utils.box_ops import paired_box_iou_xyxy_np
from utils.choices import AUGMENTATIONS, CROP_RULES
from utils.errors import UserError

# torchvision's ImageNet statistics (RGB, for images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean pixel in 0..255; it becomes 0 after normalisation, like the collate's padding.
MEAN_PIXEL = tuple(255.0 * m for m in IMAGENET_MEAN)

BOX_FIELDS = ("boxes", "labels", "difficult", "iscrowd")
RESIZE_MODES = ("square", "keep_aspect")

Target = Dict[str, Any]


def select_boxes(target: Target, keep: np.ndarray) -> Target:
    """A copy of ``target`` with every per-box array (BOX_FIELDS) indexed by ``keep`` (mask or indices)."""
    out = dict(target)
    for key in BOX_FIELDS:
        if key in out:
            out[key] = out[key][keep]
    return out


def centers_inside(boxes: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """Bool mask [G]: box centres (boxes np[G, 4] xyxy) strictly inside rect (np[4] xyxy)."""
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    return (centers > rect[:2]).all(axis=1) & (centers < rect[2:]).all(axis=1)


def crop(image: np.ndarray, target: Target, rect: np.ndarray) -> Tuple[np.ndarray, Target]:
    """Cut rect (integer xyxy, inside the image) out of the image, SSD style: boxes whose centre is
    not strictly inside rect are removed and added to target["num_cropped_out"]; the others are
    clipped to rect and shifted to its origin."""
    rect = np.asarray(rect, dtype=np.int64)
    keep = centers_inside(target["boxes"], rect)
    target = select_boxes(target, keep)
    boxes = target["boxes"].copy()
    boxes[:, :2] = np.maximum(boxes[:, :2], rect[:2]) - rect[:2]
    boxes[:, 2:] = np.minimum(boxes[:, 2:], rect[2:]) - rect[:2]
    target["boxes"] = boxes
    target["num_cropped_out"] = int(target.get("num_cropped_out", 0)) + int(len(keep) - keep.sum())
    return image[rect[1] : rect[3], rect[0] : rect[2]], target


def compute_resize(
    orig_h: Any,
    orig_w: Any,
    resize_mode: str,
    input_dim: int = 600,
    min_size: int = 600,
    max_size: int = 1000,
) -> Tuple[Any, Any, Any, Any]:
    """Network input size for an image of (orig_h, orig_w): returns (new_h, new_w, sx, sy).

    square: new = input_dim x input_dim (aspect ratio not kept).
    keep_aspect: scale = min(min_size / short side, max_size / long side), new = round(orig * scale)
    (halves round up), so the short side is min_size unless the long side would exceed max_size.
    sx = new_w / orig_w, sy = new_h / orig_h (keep_aspect: equal up to the rounding of new_h, new_w).
    Works on ints (returns ints and floats) and elementwise on numpy arrays (returns arrays).
    E.g. keep_aspect 375 x 500 -> (600, 800, 1.6, 1.6); 500 x 2000 -> (250, 1000, 0.5, 0.5).
    """
    scalar = np.ndim(orig_h) == 0 and np.ndim(orig_w) == 0
    h = np.asarray(orig_h, dtype=np.float64)
    w = np.asarray(orig_w, dtype=np.float64)
    if resize_mode == "square":
        new_h = np.full(np.broadcast(h, w).shape, input_dim, dtype=np.int64)
        new_w = new_h.copy()
    elif resize_mode == "keep_aspect":
        scale = np.minimum(min_size / np.minimum(h, w), max_size / np.maximum(h, w))
        new_h = np.maximum(np.floor(h * scale + 0.5), 1).astype(np.int64)
        new_w = np.maximum(np.floor(w * scale + 0.5), 1).astype(np.int64)
    else:
        raise UserError(f"unknown resize_mode {resize_mode!r} (expected one of {RESIZE_MODES})")
    sx, sy = new_w / w, new_h / h
    if scalar:
        return int(new_h), int(new_w), float(sx), float(sy)
    return new_h, new_w, sx, sy


class Compose:
    """Applies transforms in order to (image, target)."""

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"    {t!r},\n" for t in self.transforms) + ")"


class PhotometricDistort:
    """SSD's photometric distortion, on float32 with values clipped to [0, 255] after each step.

    Brightness (p=0.5, +uniform(-32, 32)) first; then, in one of two orders chosen with p=0.5,
    contrast (p=0.5, *uniform(0.5, 1.5)) before or after the HSV steps: saturation (p=0.5,
    S *= uniform(0.5, 1.5)) and hue (p=0.5, H += uniform(-18, 18) degrees). ssd.pytorch's random
    channel swap is left out (Caffe SSD's VOC setting disables it). Returns uint8 (rounded) so the
    zoom-out canvas that may follow is 4x smaller than in float32.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            image *= np.random.uniform(*self.contrast_range)
            np.clip(image, 0, 255, out=image)
        return image

    def _saturation_hue(self, image: np.ndarray) -> np.ndarray:
        do_saturation, do_hue = np.random.randint(2), np.random.randint(2)
        saturation = np.random.uniform(*self.saturation_range) if do_saturation else 1.0
        hue_shift = np.random.uniform(-self.hue_delta, self.hue_delta) if do_hue else 0.0
        if not (do_saturation or do_hue):
            return image
        # float32 HSV in OpenCV: H in [0, 360), S in [0, 1], V in the input's range (0..255 here).
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        if do_saturation:
            hsv[:, :, 1] = np.clip(hsv[:, :, 1] * saturation, 0.0, 1.0)
        if do_hue:
            hsv[:, :, 0] = np.mod(hsv[:, :, 0] + hue_shift, 360.0)
        return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 255)

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
        image = image.astype(np.float32)
        if np.random.randint(2):
            image += np.random.uniform(-self.brightness_delta, self.brightness_delta)
            np.clip(image, 0, 255, out=image)
        if np.random.randint(2):
            image = self._saturation_hue(self._contrast(image))
        else:
            image = self._contrast(self._saturation_hue(image))
        return (image + 0.5).astype(np.uint8), target

    def __repr__(self) -> str:
        return (
            f"PhotometricDistort(brightness_delta={self.brightness_delta}, "
            f"contrast={self.contrast_range}, saturation={self.saturation_range}, hue_delta={self.hue_delta})"
        )


class Expand:
    """SSD's zoom out: with probability p, place the image at a random integer offset on a canvas
    ``ratio`` times larger (ratio ~ uniform(1, max_ratio)) filled with the mean pixel; boxes shift by
    the offset (exact)."""

    def __init__(self, mean: Sequence[float] = MEAN_PIXEL, max_ratio: float = 4.0, p: float = 0.5):
        self.mean = tuple(float(m) for m in mean)
        self.max_ratio = max_ratio
        self.p = p

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
        if np.random.random() >= self.p:
            return image, target
        height, width, depth = image.shape
        ratio = np.random.uniform(1.0, self.max_ratio)
        left = int(np.random.uniform(0, width * ratio - width))
        top = int(np.random.uniform(0, height * ratio - height))
        # top <= height * ratio - height, so the canvas always holds the image.
        canvas = np.empty((int(height * ratio), int(width * ratio), depth), dtype=image.dtype)
        fill = np.asarray(self.mean, dtype=np.float64)
        canvas[...] = (fill.round() if np.issubdtype(image.dtype, np.integer) else fill).astype(image.dtype)
        canvas[top : top + height, left : left + width] = image
        target = dict(target)
        target["boxes"] = target["boxes"] + np.array([left, top, left, top], dtype=target["boxes"].dtype)
        return canvas, target

    def __repr__(self) -> str:
        return f"Expand(max_ratio={self.max_ratio}, p={self.p})"


class RandomSampleCrop:
    """SSD's IoU-constrained random crop.

    Each call picks one option uniformly: keep the whole image (None), a free patch (min IoU -inf)
    or a patch with min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9. A candidate patch has sides uniform in
    [0.3, 1] of the image's, aspect ratio h / w in [0.5, 2] and integer corners. With
    ``iou_rule="any"`` (the default, as in Caffe SSD) it satisfies min IoU when at least one object
    overlaps it that much (ssd.pytorch's check never rejects anything); with ``iou_rule="all"`` (the
    original codebase's data/augmentations.py, with its max_trials=20) every object must. It must
    also contain at least one object centre. Objects are the boxes that
    are not ignored (label >= 0, not difficult, not crowd), or all boxes when every box is ignored;
    an image without boxes is cropped freely. After max_trials failed candidates a new option is
    drawn (eventually None; after max_rounds draws the image is returned whole). Boxes whose centre
    is outside the patch are removed and counted into target["num_cropped_out"]; the kept boxes are
    clipped to the patch.
    """

    def __init__(
        self,
        min_ious: Sequence[Any] = (None, float("-inf"), 0.1, 0.3, 0.5, 0.7, 0.9),
        min_scale: float = 0.3,
        max_trials: int = 50,
        max_rounds: int = 100,
        iou_rule: str = "any",
    ):
        if iou_rule not in CROP_RULES:
            raise UserError(f"unknown crop iou_rule {iou_rule!r} (expected one of {CROP_RULES})")
        self.iou_rule = iou_rule
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.max_trials = max_trials
        self.max_rounds = max_rounds

    @staticmethod
    def _objects(target: Target) -> np.ndarray:
        """Bool mask [G]: the boxes whose overlap and centre decide whether a patch is acceptable."""
        num_boxes = len(target["boxes"])
        ignored = np.zeros(num_boxes, dtype=bool)
        if "labels" in target:
            ignored |= np.asarray(target["labels"]) < 0
        for key in ("difficult", "iscrowd"):
            if key in target:
                ignored |= np.asarray(target[key], dtype=bool)
        return ~ignored if (~ignored).any() else np.ones(num_boxes, dtype=bool)

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
        height, width = image.shape[:2]
        boxes = target["boxes"]
        objects = self._objects(target)
        # With None among the options this ends with probability 1; max_rounds bounds it when not.
        for _ in range(self.max_rounds):
            min_iou = self.min_ious[np.random.randint(len(self.min_ious))]
            if min_iou is None:
                return image, target
            for _ in range(self.max_trials):
                w = np.random.uniform(self.min_scale * width, width)
                h = np.random.uniform(self.min_scale * height, height)
                if h / w < 0.5 or h / w > 2:
                    continue
                left = np.random.uniform(0, width - w)
                top = np.random.uniform(0, height - h)
                rect = np.array([int(left), int(top), int(left + w), int(top + h)])
                if rect[2] <= rect[0] or rect[3] <= rect[1]:
                    continue
                if len(boxes) == 0:
                    return crop(image, target, rect)
                # dtype=None: float32 boxes, int64 window, NumPy's promotion (the crops of a seed stay).
                ious = paired_box_iou_xyxy_np(boxes[objects], rect, dtype=None)  # [G']
                if (ious.min() if self.iou_rule == "all" else ious.max()) < min_iou:
                    continue
                if not (centers_inside(boxes, rect) & objects).any():
                    continue
                return crop(image, target, rect)
        return image, target

    def __repr__(self) -> str:
        return (
            f"RandomSampleCrop(min_ious={self.min_ious}, min_scale={self.min_scale}, "
            f"iou_rule={self.iou_rule}, max_trials={self.max_trials})"
        )


class RandomHorizontalFlip:
    """Mirror left-right with probability p: x1' = W - x2, x2' = W - x1 (exact)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
        if np.random.random() >= self.p:
            return image, target
        width = image.shape[1]
        target = dict(target)
        boxes = target["boxes"]
        x1, y1, x2, y2 = boxes.T
        target["boxes"] = np.stack([width - x2, y1, width - x1, y2], axis=1)
        return np.ascontiguousarray(image[:, ::-1]), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize (bilinear) to compute_resize's size; boxes * [sx, sy, sx, sy]. Sets target["size"] =
    (new_h, new_w) and target["scale"] = (sx, sy) relative to the image it receives (the original
    image in evaluation, the augmented one in training)."""

    def __init__(
        self, resize_mode: str = "square", input_dim: int = 600, min_size: int = 600, max_size: int = 1000
    ):
        if resize_mode not in RESIZE_MODES:
            raise UserError(f"unknown resize_mode {resize_mode!r} (expected one of {RESIZE_MODES})")
        self.resize_mode = resize_mode
        self.input_dim = input_dim
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
        height, width = image.shape[:2]
        new_h, new_w, sx, sy = compute_resize(
            height, width, self.resize_mode, self.input_dim, self.min_size, self.max_size
        )
        if (new_h, new_w) != (height, width):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        target = dict(target)
        boxes = target["boxes"].astype(np.float64) * np.array([sx, sy, sx, sy])
        # sx = new_w / width, so x = width maps to new_w up to float rounding; the clip removes only that.
        target["boxes"] = np.clip(boxes, 0, [new_w, new_h, new_w, new_h]).astype(np.float32)
        target["size"] = np.array([new_h, new_w], dtype=np.int64)
        target["scale"] = np.array([sx, sy], dtype=np.float32)
        return image, target

    def __repr__(self) -> str:
        if self.resize_mode == "square":
            return f"Resize(square, {self.input_dim})"
        return f"Resize(keep_aspect, min_size={self.min_size}, max_size={self.max_size})"


_TENSOR_DTYPES = {
    "boxes": torch.float32,
    "labels": torch.int64,
    "difficult": torch.bool,
    "iscrowd": torch.bool,
    "orig_size": torch.int64,
    "size": torch.int64,
    "scale": torch.float32,
}


class ToTensorNormalize:
    """np.uint8[H, W, 3] RGB -> Tensor[3, H, W] float32 ((x / 255 - mean) / std), and the target's
    arrays -> tensors (boxes float32, labels int64, difficult/iscrowd bool, orig_size/size int64,
    scale float32; num_cropped_out int, 0 when no crop ran)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: np.ndarray, target: Target) -> Tuple[torch.Tensor, Target]:
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(self.std, dtype=np.float32) * 255.0)
        normalised = (image.astype(np.float32) - mean) * inv_std
        tensor = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))
        target = dict(target)
        height, width = image.shape[:2]
        target.setdefault("size", np.array([height, width], dtype=np.int64))
        target.setdefault("scale", np.array([1.0, 1.0], dtype=np.float32))
        target["num_cropped_out"] = int(target.get("num_cropped_out", 0))
        for key, dtype in _TENSOR_DTYPES.items():
            if key in target:
                target[key] = torch.as_tensor(np.asarray(target[key]), dtype=dtype)
        if "boxes" in target:
            target["boxes"] = target["boxes"].reshape(-1, 4)
        return tensor, target

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean}, std={self.std})"


def build_transforms(
    train: bool,
    resize_mode: str = "square",
    input_dim: int = 600,
    min_size: int = 600,
    max_size: int = 1000,
    augment: bool | str = True,
    crop_rule: str = "any",
) -> Compose:
    """The pipeline ``(image np.uint8[H, W, 3] RGB, target of numpy arrays) -> (Tensor[3, h, w], target)``.

    ``augment`` applies to training only: "ssd" (or True) is PhotometricDistort, Expand,
    RandomSampleCrop, RandomHorizontalFlip; "flip" is RandomHorizontalFlip alone (short schedules on
    small sets, where zoom-out and crops cost more iterations than they give back); "none" (or False)
    adds nothing. Every pipeline ends with Resize, ToTensorNormalize, as evaluation does.
    ``crop_rule`` "all" gives RandomSampleCrop the original codebase's rule (every box reaches the min IoU,
    20 trials per option) instead of "any" (one box, 50 trials).
    """
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown resize_mode {resize_mode!r} (expected one of {RESIZE_MODES})")
    if isinstance(augment, bool):
        augment = "ssd" if augment else "none"
    if augment not in AUGMENTATIONS:
        raise UserError(f"unknown augment {augment!r} (expected one of {AUGMENTATIONS})")
    steps: List[Any] = []
    if train and augment == "ssd":
        cropper = (
            RandomSampleCrop(iou_rule="all", max_trials=20) if crop_rule == "all" else RandomSampleCrop()
        )
        steps += [PhotometricDistort(), Expand(MEAN_PIXEL), cropper, RandomHorizontalFlip()]
    elif train and augment == "flip":
        steps += [RandomHorizontalFlip()]
    steps += [Resize(resize_mode, input_dim, min_size, max_size), ToTensorNormalize()]
    return Compose(steps)
