"""A dataset over plain image files (no annotations), for demo.py and extract_features.py."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data.collate import SkippedSample
from data.image_io import ImageReadError, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def find_images(paths: Sequence[str]) -> List[str]:
    """Image files named directly or found (non-recursively, sorted) in the given folders."""
    found: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found.extend(
                sorted(
                    os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)
                )
            )
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"{path!r} is neither an image file nor a folder")
    return found


class ImageListDataset(Dataset):
    """Images from files, with the same (image, target) interface as DetectionDataset but no boxes.

    skip_bad_images: an unreadable file gives a SkippedSample (the collate function drops and reports
    it) instead of raising ImageReadError.
    """

    def __init__(self, files: Sequence[str], transforms: Callable, skip_bad_images: bool = False):
        self.files = list(files)
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]] | SkippedSample:
        path = self.files[index]
        try:
            image = read_image(path)
        except ImageReadError as e:
            if not self.skip_bad_images:
                raise
            return SkippedSample(e.path, e.reason)
        h, w = image.shape[:2]
        target = {
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros((0,), np.int64),
            "difficult": np.zeros((0,), bool),
            "iscrowd": np.zeros((0,), bool),
            "image_id": index,
            "file_name": path,
            "orig_size": np.array([h, w], np.int64),
        }
        return self.transforms(image, target)
