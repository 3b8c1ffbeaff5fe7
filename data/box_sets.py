"""A dataset's training boxes in network-input pixels, for anchor clustering (kmeans_for_anchors.py).

Boxes come from annotation files in the common format (data/annotations.py) and are rescaled exactly
as training resizes their image (``data.transforms.compute_resize``), grouped by the padded input size
of their image. Difficult, crowd and zero-size boxes are kept in the set but flagged, so that they can
be left out and counted (``kept_boxes``, ``box_counts``).
"""

from typing import Dict, Sequence

import numpy as np

from data.annotations import load_annotations
from data.transforms import compute_resize
from utils.errors import UserError

# Keep-aspect batches are padded to a multiple of this (data.collate.Collate); square inputs are not.
KEEP_ASPECT_SIZE_DIVISIBILITY = 32


def load_boxes(
    annotation_files: Sequence[str],
    resize_mode: str,
    input_dim: int,
    min_size: int,
    max_size: int,
) -> Dict:
    """Boxes of the given split files in network-input pixels, grouped by input size.

    Returns a dict:
        gt_boxes (ndarray[G, 4] float64, xyxy input px), difficult / crowd / degenerate (ndarray[G] bool;
        degenerate = zero width or height), gt_input_size_idxs (ndarray[G] int64 into input_sizes),
        input_sizes (ndarray[S, 2] int64 (h, w) of the padded network input), num_images_per_size
        (ndarray[S]), num_images, annotation_files.
    """
    heights, widths, boxes, image_idxs, difficult, crowd = [], [], [], [], [], []
    num_images = 0  # images of the previous files: offsets this file's image rows
    for path in annotation_files:
        coco = load_annotations(path)
        ids = np.array([im["id"] for im in coco["images"]], dtype=np.int64)
        heights.append(np.array([im["height"] for im in coco["images"]], dtype=np.float64))
        widths.append(np.array([im["width"] for im in coco["images"]], dtype=np.float64))
        anns = coco["annotations"]
        ann_image_ids = np.array([a["image_id"] for a in anns], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids[order], ann_image_ids).clip(max=max(len(ids) - 1, 0))
        if len(anns) and (len(ids) == 0 or np.any(ids[order][pos] != ann_image_ids)):
            bad = ann_image_ids[ids[order][pos] != ann_image_ids] if len(ids) else ann_image_ids
            raise UserError(f"{path}: annotations refer to unknown image ids, e.g. {bad[:5].tolist()}")
        image_idxs.append(num_images + order[pos])
        boxes.append(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4))
        difficult.append(np.array([bool(a.get("difficult", 0)) for a in anns], dtype=bool))
        crowd.append(np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool))
        num_images += len(ids)
    return resize_boxes(
        np.concatenate(heights),
        np.concatenate(widths),
        np.concatenate(boxes),
        np.concatenate(image_idxs).astype(np.int64),
        np.concatenate(difficult),
        np.concatenate(crowd),
        resize_mode,
        input_dim,
        min_size,
        max_size,
        annotation_files=annotation_files,
    )


def resize_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    gt_boxes_xywh: np.ndarray,
    gt_image_idxs: np.ndarray,
    difficult: np.ndarray,
    crowd: np.ndarray,
    resize_mode: str,
    input_dim: int,
    min_size: int,
    max_size: int,
    annotation_files: Sequence[str] = (),
) -> Dict:
    """The box set of :func:`load_boxes` from arrays (vectorised over all images and boxes).

    Args:
        heights, widths (ndarray[M]): original image sizes.
        gt_boxes_xywh (ndarray[G, 4]): [x, y, w, h] original pixels. gt_image_idxs (ndarray[G]): row of
            each box's image in heights / widths. difficult, crowd (ndarray[G] bool).
    """
    new_h, new_w, sx, sy = compute_resize(heights, widths, resize_mode, input_dim, min_size, max_size)
    divisibility = KEEP_ASPECT_SIZE_DIVISIBILITY if resize_mode == "keep_aspect" else 1
    padded = np.stack([np.broadcast_to(new_h, heights.shape), np.broadcast_to(new_w, widths.shape)], axis=1)
    padded = -(-padded.astype(np.int64) // divisibility) * divisibility  # round up
    input_sizes, image_size_idxs, num_images_per_size = np.unique(
        padded.reshape(-1, 2), axis=0, return_inverse=True, return_counts=True
    )
    scale = np.stack(np.broadcast_arrays(sx, sy, sx, sy), axis=1)[gt_image_idxs]  # [G, 4]
    xywh = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * scale
    return {
        "gt_boxes": gt_boxes,
        "difficult": np.asarray(difficult, dtype=bool),
        "crowd": np.asarray(crowd, dtype=bool),
        "degenerate": (gt_boxes[:, 2] <= gt_boxes[:, 0]) | (gt_boxes[:, 3] <= gt_boxes[:, 1]),
        "gt_input_size_idxs": image_size_idxs.reshape(-1)[gt_image_idxs],
        "input_sizes": input_sizes,
        "num_images_per_size": num_images_per_size,
        "num_images": int(heights.shape[0]),
        "annotation_files": list(annotation_files),
    }


def kept_boxes(box_set: Dict) -> np.ndarray:
    """Mask of the boxes that count: not difficult, not crowd, positive width and height."""
    return ~(box_set["difficult"] | box_set["crowd"] | box_set["degenerate"])


def box_counts(box_set: Dict) -> Dict:
    keep = kept_boxes(box_set)
    return {
        "num_images": int(box_set["num_images"]),
        "num_input_sizes": int(len(box_set["input_sizes"])),
        "num_boxes": int(keep.sum()),
        "num_ignored_difficult": int(box_set["difficult"].sum()),
        "num_ignored_crowd": int(box_set["crowd"].sum()),
        "num_ignored_degenerate": int(box_set["degenerate"].sum()),
    }
