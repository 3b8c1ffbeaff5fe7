"""Targets for the Faster R-CNN tests (tests/test_faster_rcnn.py, tests/test_faster_rcnn_layers.py)."""

import torch


def target(boxes, labels, size, difficult=None, iscrowd=None, scale=(1.0, 1.0), orig_size=None, image_id=0):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult or [False] * n),
        "iscrowd": torch.tensor(iscrowd or [False] * n),
        "size": torch.tensor(size),
        "scale": torch.tensor(scale),
        "orig_size": torch.tensor(orig_size or size),
        "image_id": image_id,
        "file_name": f"img{image_id}.png",
    }
