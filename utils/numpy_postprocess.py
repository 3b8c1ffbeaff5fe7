"""Reference pre- and post-processing in NumPy (and OpenCV for the resize) for exported networks.

An ONNX or TorchScript file written by export.py maps ``images`` (float32[N, 3, H, W]) to
``pred_logits`` (float32[N, A, C]) and ``pred_box_deltas`` (float32[N, A, 4]); everything else is
here, driven by the JSON written next to the file (``meta``: class names, anchors, strides, box
variances, score type, thresholds, resize options). It follows the PyTorch code step by step and
tests/test_export.py checks it against it:

1. ``preprocess``: resize as data/transforms.py's Resize (``compute_resize``), normalise with the
   ImageNet mean/std, HWC -> CHW; batch with zero padding at the bottom/right (0 is the mean pixel).
2. ``grid_anchors``: per level l of stride s_l, cell centres ((x + 0.5) s_l, (y + 0.5) s_l) for the
   ceil(H / s_l) x ceil(W / s_l) grid, row-major, k anchor sizes per cell (layers/anchors.py).
3. ``postprocess``: per level, the ``pre_nms_topk`` best (anchor, class) pairs with score >
   ``conf_thresh`` (softmax without the background column 0, or sigmoid); decode the deltas
   (layers/box_coder.py); clip to the valid (unpadded) size; greedy NMS per class (or over all classes
   with ``class_agnostic``) at ``nms_thresh``; the ``max_detections`` best; divide by the resize scale
   and clip to the original size.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from utils.box_ops import paired_box_iou_xyxy_np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_shape(h: int, w: int, meta: Dict[str, Any]) -> Tuple[int, int]:
    """Network input (new_h, new_w) for an h x w image (data/transforms.py's compute_resize)."""
    if meta["resize_mode"] == "square":
        return meta["input_dim"], meta["input_dim"]
    scale = min(meta["min_size"] / min(h, w), meta["max_size"] / max(h, w))
    return max(int(math.floor(h * scale + 0.5)), 1), max(int(math.floor(w * scale + 0.5)), 1)


def preprocess(images_rgb: Sequence[np.ndarray], meta: Dict[str, Any]) -> Tuple[np.ndarray, List[Dict]]:
    """np.uint8[H, W, 3] RGB images -> (float32[N, 3, Hp, Wp], per image {size, scale, orig_size})."""
    tensors, infos = [], []
    for image in images_rgb:
        h, w = image.shape[:2]
        new_h, new_w = resize_shape(h, w, meta)
        if (new_h, new_w) != (h, w):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        mean = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0)
        tensors.append(((image.astype(np.float32) - mean) * inv_std).transpose(2, 0, 1))
        infos.append({"size": (new_h, new_w), "scale": (new_w / w, new_h / h), "orig_size": (h, w)})
    d = 32 if meta["resize_mode"] == "keep_aspect" else 1
    hp = -(-max(t.shape[1] for t in tensors) // d) * d
    wp = -(-max(t.shape[2] for t in tensors) // d) * d
    batch = np.zeros((len(tensors), 3, hp, wp), np.float32)
    for t, slot in zip(tensors, batch):
        slot[:, : t.shape[1], : t.shape[2]] = t
    return batch, infos


def grid_anchors(
    height: int, width: int, anchor_whs: Sequence, strides: Sequence[int]
) -> Tuple[np.ndarray, List[int]]:
    """Anchors float32[A, 4] (xyxy input pixels) for an H x W input, and the anchor count per level."""
    per_level, counts = [], []
    for whs, stride in zip(anchor_whs, strides):
        gh, gw = math.ceil(height / stride), math.ceil(width / stride)
        cx = (np.arange(gw, dtype=np.float32) + 0.5) * stride
        cy = (np.arange(gh, dtype=np.float32) + 0.5) * stride
        cy, cx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.stack([cx, cy], axis=-1).reshape(-1, 1, 2)  # [h*w, 1, 2]
        half = 0.5 * np.asarray(whs, np.float32)[None]  # [1, k, 2]
        per_level.append(np.concatenate([centres - half, centres + half], axis=-1).reshape(-1, 4))
        counts.append(len(per_level[-1]))
    return np.concatenate(per_level), counts


def decode(
    deltas: np.ndarray, anchors: np.ndarray, variances: Sequence[float], clamp_dwdh: float
) -> np.ndarray:
    """Deltas [M, 4] against anchors [M, 4] (xyxy) -> boxes [M, 4] xyxy."""
    v0, v1 = variances
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cxa, cya = anchors[:, 0] + 0.5 * wa, anchors[:, 1] + 0.5 * ha
    cx, cy = deltas[:, 0] * v0 * wa + cxa, deltas[:, 1] * v0 * ha + cya
    w = np.exp(np.minimum(deltas[:, 2] * v1, clamp_dwdh)) * wa
    h = np.exp(np.minimum(deltas[:, 3] * v1, clamp_dwdh)) * ha
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS (as torchvision.ops.nms): indices kept, by decreasing score."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        # In the boxes' dtype, as torchvision. Two empty boxes: IoU 0 here, NaN there; kept by both.
        iou = paired_box_iou_xyxy_np(boxes[i], boxes[rest], dtype=None)  # [len(rest)]
        order = rest[~(iou > iou_thresh)]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    pred_logits: np.ndarray,
    pred_box_deltas: np.ndarray,
    infos: Sequence[Dict],
    meta: Dict[str, Any],
    input_hw: Tuple[int, int],
) -> List[Dict[str, np.ndarray]]:
    """Network outputs [N, A, C] and [N, A, 4] of one padded batch of size ``input_hw`` (Hp, Wp) -> per
    image {boxes (xyxy original pixels), scores, labels (0..K-1), label_names}, as PostProcess does."""
    anchors, counts = grid_anchors(input_hw[0], input_hw[1], meta["anchor_whs"], meta["strides"])
    softmax = meta["score_type"] == "softmax"
    results = []
    for logits, deltas, info in zip(pred_logits.astype(np.float64), pred_box_deltas, infos):
        if softmax:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores_all = (e / e.sum(axis=1, keepdims=True))[:, 1:]
        else:
            scores_all = 1.0 / (1.0 + np.exp(-logits))
        num_classes = scores_all.shape[1]
        cand_scores, cand_anchors, cand_labels, start = [], [], [], 0
        for count in counts:  # per level: the pre_nms_topk best pairs above conf_thresh
            level = scores_all[start : start + count].reshape(-1)
            idx = np.flatnonzero(level > meta["conf_thresh"])
            idx = idx[np.argsort(-level[idx], kind="stable")[: meta["pre_nms_topk"]]]
            cand_scores.append(level[idx])
            cand_anchors.append(idx // num_classes + start)
            cand_labels.append(idx % num_classes)
            start += count
        scores, anchor_idxs, labels = (np.concatenate(c) for c in (cand_scores, cand_anchors, cand_labels))
        h, w = info["size"]
        boxes = decode(
            deltas[anchor_idxs].astype(np.float64),
            anchors[anchor_idxs],
            meta["box_variances"],
            meta["clamp_dwdh"],
        )
        boxes = np.clip(boxes, 0, [w, h, w, h])
        groups = np.zeros_like(labels) if meta["class_agnostic"] else labels
        kept_per_group = [np.zeros(0, np.int64)]
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            kept_per_group.append(members[nms(boxes[members], scores[members], meta["nms_thresh"])])
        keep = np.concatenate(kept_per_group)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: meta["max_detections"]]
        sx, sy = info["scale"]
        oh, ow = info["orig_size"]
        out_boxes = np.clip(boxes[keep] / np.array([sx, sy, sx, sy]), 0, [ow, oh, ow, oh])
        results.append(
            {
                "boxes": out_boxes.astype(np.float32),
                "scores": scores[keep].astype(np.float32),
                "labels": labels[keep],
                "label_names": [meta["class_names"][int(k)] for k in labels[keep]],
            }
        )
    return results


def detect(
    session_run, images_rgb: Sequence[np.ndarray], meta: Dict[str, Any]
) -> List[Dict[str, np.ndarray]]:
    """End to end with any runner ``session_run(batch float32[N, 3, H, W]) -> (logits, deltas)``, e.g.
    ``lambda x: onnxruntime.InferenceSession(path).run(None, {"images": x})``."""
    batch, infos = preprocess(images_rgb, meta)
    pred_logits, pred_box_deltas = session_run(batch)
    return postprocess(np.asarray(pred_logits), np.asarray(pred_box_deltas), infos, meta, batch.shape[2:])
