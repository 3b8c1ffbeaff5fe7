"""Drawing one image of "shapes", the synthetic detection set (prep/shapes.py writes the set).

What an image holds (all sizes in pixels, defaults for --image_size 256):
  - Background: a linear gradient between two random colours in a random direction, plus a smooth
    random texture (an upsampled low-resolution noise grid).
  - Clutter that is NOT an object: 0-6 thin anti-aliased lines, 0-8 small dots (radius 1-3, smaller
    than any object), 0-2 "+" / "x" crosses (arms 2-4 px thick) of object size.
  - 1-6 objects (--min_shapes/--max_shapes), each a filled shape of one random colour, axis-aligned:
      circle   = an ellipse whose box has aspect ratio w/h in [1/A, A]   (A = --max_aspect, 2)
      square   = a rectangle whose aspect ratio w/h is in [1/A, A]
      triangle = a triangle with its base on one side of its box (pointing up/down/left/right) and
                 its apex anywhere along the opposite side, box aspect ratio in [1/A, A]
    The longer side of the box is log-uniform in [--min_size, --max_size] (12 to 192), so small
    objects are as common per octave as large ones. Objects lie wholly inside the image.
  - On half of the images, per-pixel Gaussian noise with a random sigma in [1, --noise] (6), drawn
    last, over everything.

Overlaps are allowed, with two rules. (1) A later object may not leave an earlier one with less
than --min_visible (60%) of its own pixels visible; a placement that would is redrawn (new size,
aspect and position), and after 30 failed tries the object is left out and COUNTED
("rejected_shapes" in the statistics). (2) Each box is the bounding box of the object's VISIBLE
pixels (x1 = min column, x2 = max column + 1, continuous coordinates), so a box never reaches
past what can be seen. An object's colour is redrawn until at least 95% of the pixels it covers
differ from it by a colour distance of 60 or more (background, clutter and earlier objects alike);
after 20 tries the last colour is kept and the object counted ("low_contrast_shapes").

Image i of split s is drawn from ``image_rng(seed, s, i)`` = ``np.random.default_rng([seed, s, i])``,
independent of every other image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

from utils.errors import UserError

CLASSES = ("circle", "square", "triangle")  # training labels 0, 1, 2; category ids 1, 2, 3
SPLITS = {"train": 1, "val": 2, "samples": 3}  # split number: seeds the split's stream, offsets its ids
MAX_PLACEMENT_TRIES = 30
MAX_COLOUR_TRIES = 20
MIN_COLOUR_DISTANCE = 60.0
MIN_CONTRASTED_FRACTION = 0.95


@dataclass(frozen=True)
class ShapesConfig:
    """How images are drawn; see the module docstring."""

    image_size: int = 256
    min_size: float = 12.0
    max_size: float = 192.0
    max_aspect: float = 2.0
    min_shapes: int = 1
    max_shapes: int = 6
    min_visible: float = 0.6
    noise: float = 6.0

    def check(self) -> None:
        problems = []
        if self.image_size < 16:
            problems.append(f"--image_size {self.image_size} < 16")
        if not 4 <= self.min_size <= self.max_size <= self.image_size:
            problems.append(
                f"need 4 <= --min_size ({self.min_size}) <= --max_size ({self.max_size}) "
                f"<= --image_size ({self.image_size})"
            )
        if self.max_aspect < 1:
            problems.append(f"--max_aspect {self.max_aspect} < 1")
        if self.min_size / self.max_aspect < 2:
            problems.append(
                f"--min_size / --max_aspect = {self.min_size / self.max_aspect:.2f} px < 2: "
                "the short side of the smallest objects would vanish"
            )
        if not 0 <= self.min_shapes <= self.max_shapes <= 99:
            problems.append(
                f"need 0 <= --min_shapes ({self.min_shapes}) <= --max_shapes ({self.max_shapes}) <= 99"
            )
        if not 0 < self.min_visible <= 1:
            problems.append(f"--min_visible {self.min_visible} not in (0, 1]")
        if self.noise < 0:
            problems.append(f"--noise {self.noise} < 0")
        if problems:
            raise UserError("prep/shapes.py: bad options: " + "; ".join(problems))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + smooth texture, float32[size, size, 3] RGB in about [0, 255]."""
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grid = int(rng.integers(3, 9))
    # Both are drawn on a grid x grid image and upsampled in one resize: the gradient is linear, so
    # the interpolation reproduces it, and this is several times faster than computing it per pixel.
    coords = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    t = float(np.cos(angle)) * coords[None, :] + float(np.sin(angle)) * coords[:, None]  # [grid, grid]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    low_res = colours[0] + (colours[1] - colours[0]) * t[..., None]
    low_res += rng.normal(0, rng.uniform(0, 25), size=(grid, grid, 3)).astype(np.float32)
    return cv2.resize(low_res, (size, size), interpolation=cv2.INTER_CUBIC)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, cfg: ShapesConfig) -> None:
    """Draw non-object clutter into ``canvas`` (float32[S, S, 3]) in place."""
    size = cfg.image_size
    for _ in range(rng.integers(0, 7)):
        p1, p2 = rng.integers(0, size, size=(2, 2))
        cv2.line(
            canvas,
            tuple(map(int, p1)),
            tuple(map(int, p2)),
            rng.uniform(0, 255, 3).tolist(),
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
        )
    for _ in range(rng.integers(0, 9)):
        centre = tuple(map(int, rng.integers(0, size, size=2)))
        cv2.circle(canvas, centre, int(rng.integers(1, 4)), rng.uniform(0, 255, 3).tolist(), -1, cv2.LINE_AA)
    for _ in range(rng.integers(0, 3)):
        arm = rng.uniform(cfg.min_size, max(cfg.min_size, size / 4)) / 2
        cx, cy = rng.uniform(arm, size - arm, size=2)
        thickness = int(rng.integers(2, 5))
        colour = rng.uniform(0, 255, 3).tolist()
        diagonal = rng.random() < 0.5
        for sign in (1, -1):
            dx, dy = (arm * 0.7, sign * arm * 0.7) if diagonal else ((arm, 0) if sign > 0 else (0, arm))
            p1, p2 = (int(round(cx - dx)), int(round(cy - dy))), (int(round(cx + dx)), int(round(cy + dy)))
            cv2.line(canvas, p1, p2, colour, thickness, cv2.LINE_AA)


def _shape_mask(rng: np.random.Generator, label: int, cfg: ShapesConfig) -> np.ndarray:
    """A random object of class ``label`` as a bool[S, S] mask, lying wholly inside the image."""
    size = cfg.image_size
    long_side = np.exp(rng.uniform(np.log(cfg.min_size), np.log(cfg.max_size)))
    short_side = long_side / np.exp(rng.uniform(0, np.log(cfg.max_aspect)))
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    w, h = max(int(round(w)), 2), max(int(round(h)), 2)
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    x1, y1 = x0 + w - 1, y0 + h - 1  # last pixel row / column
    mask = np.zeros((size, size), np.uint8)
    if CLASSES[label] == "circle":
        # shift=1: half-pixel centre and axes, so the ellipse spans exactly columns x0..x1, rows y0..y1.
        cv2.ellipse(mask, (x0 + x1, y0 + y1), (w - 1, h - 1), 0, 0, 360, 1, -1, cv2.LINE_8, 1)
    elif CLASSES[label] == "square":
        mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    else:
        apex = rng.uniform(0, 1)
        direction = int(rng.integers(4))  # 0 up, 1 down, 2 left, 3 right
        if direction < 2:
            ax = x0 + apex * (x1 - x0)
            tip, base = (y0, y1) if direction == 0 else (y1, y0)
            points = [(ax, tip), (x0, base), (x1, base)]
        else:
            ay = y0 + apex * (y1 - y0)
            tip, base = (x0, x1) if direction == 2 else (x1, x0)
            points = [(tip, ay), (base, y0), (base, y1)]
        # shift=4: sixteenth-pixel vertices, so the apex can sit anywhere along its side.
        cv2.fillPoly(mask, [np.round(np.array(points) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def render_image(
    rng: np.random.Generator, cfg: ShapesConfig
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
    """Draw one image.

    Returns:
        image (uint8[S, S, 3], RGB),
        labels (int64[N], 0..2, position in CLASSES),
        boxes (float64[N, 4], xyxy, continuous pixel coordinates: tight around the visible pixels),
        debug dict: ``masks`` (bool[N, S, S], visible pixels of each object), ``full_areas`` (int64[N],
        pixels of each object before later ones covered it), ``colours`` (uint8[N, 3], RGB),
        ``rejected`` (int, objects left out after MAX_PLACEMENT_TRIES), ``low_contrast`` (int, objects
        kept although no colour in MAX_COLOUR_TRIES met the contrast rule).
    """
    size = cfg.image_size
    canvas = _background(rng, size)
    _clutter(rng, canvas, cfg)
    num_objects = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    visible = np.zeros((0, size, size), bool)
    full_areas = np.zeros(0, np.int64)
    labels: List[int] = []
    colours: List[np.ndarray] = []
    rejected = low_contrast = 0
    for _ in range(num_objects):
        label = int(rng.integers(len(CLASSES)))
        for _ in range(MAX_PLACEMENT_TRIES):
            mask = _shape_mask(rng, label, cfg)
            # Rule (1): every earlier object keeps >= min_visible of its own pixels.
            kept = (visible & ~mask).sum(axis=(1, 2))
            if np.all(kept >= cfg.min_visible * full_areas):
                break
        else:
            rejected += 1
            continue
        under = canvas[mask]  # [P, 3] what the object covers
        under = under[:: max(1, len(under) // 512)]  # ~512 of them judge the contrast as well, much faster
        for _ in range(MAX_COLOUR_TRIES):
            colour = rng.integers(0, 256, size=3).astype(np.float32)
            distance = np.linalg.norm(under - colour, axis=1)
            if np.mean(distance >= MIN_COLOUR_DISTANCE) >= MIN_CONTRASTED_FRACTION:
                break
        else:
            low_contrast += 1  # kept with its last colour (a busy background), but counted
        canvas[mask] = colour
        visible = np.concatenate([visible & ~mask, mask[None]])
        full_areas = np.append(full_areas, mask.sum())
        labels.append(label)
        colours.append(colour.astype(np.uint8))
    if cfg.noise > 0 and rng.random() < 0.5:  # half the images are clean, which also halves their PNG size
        canvas += rng.uniform(1, cfg.noise) * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    boxes = masks_to_boxes_xyxy(visible)
    debug = {
        "masks": visible,
        "full_areas": full_areas,
        "colours": np.array(colours, np.uint8).reshape(-1, 3),
        "rejected": rejected,
        "low_contrast": low_contrast,
    }
    return image, np.array(labels, np.int64), boxes, debug


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of non-empty bool masks [N, H, W] -> float64[N, 4] xyxy, x2 = last column + 1."""
    if len(masks) == 0:
        return np.zeros((0, 4))
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # [N, H], [N, W]
    height, width = masks.shape[1:]
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = height - rows[:, ::-1].argmax(axis=1)
    x2 = width - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float64)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator image ``index`` of ``split`` is drawn from (independent of every other image)."""
    return np.random.default_rng([seed, SPLITS[split], index])
