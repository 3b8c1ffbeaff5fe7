"""Batching: pad images of different sizes into one tensor, and report samples that were skipped."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from utils.errors import UserError

UNNAMED_SAMPLE = "<unnamed sample>"


class SkippedSample:
    """Stands in for ``(image, target)`` when a dataset skips a sample (an unreadable image with
    skip_bad_images), so the collate function can drop it and still report which file it was.

    file_name (str): the image path; reason (str): why it was skipped.
    """

    __slots__ = ("file_name", "reason")

    def __init__(self, file_name: str, reason: str = ""):
        self.file_name = file_name
        self.reason = reason

    def __getstate__(self) -> Tuple[str, str]:  # __slots__ classes need this to cross worker processes
        return self.file_name, self.reason

    def __setstate__(self, state: Tuple[str, str]) -> None:
        self.file_name, self.reason = state

    def __repr__(self) -> str:
        return f"SkippedSample({self.file_name!r}, {self.reason!r})"


class Collate:
    """collate_fn for DataLoader: ``samples -> (images, targets, skipped)``.

    samples: (Tensor[3, H_i, W_i], target dict) pairs, SkippedSample markers, or None.
    images (Tensor[N, 3, Hp, Wp]): the N kept images, top-left aligned and zero-padded (0 is the mean
    pixel after normalisation) to Hp = max H_i and Wp = max W_i rounded up to size_divisibility
    (32 so that every FPN level's feature map divides the input evenly; 1 for no rounding).
    targets (list[dict]): the kept targets, unchanged (target["size"] keeps each image's valid h, w).
    skipped (list[str]): the file names of the markers (UNNAMED_SAMPLE for a None).
    A batch where every sample was skipped gives images Tensor[0, 3, 0, 0] and targets [].
    """

    def __init__(self, size_divisibility: int = 32):
        if size_divisibility < 1:
            raise UserError(f"size_divisibility must be >= 1, got {size_divisibility}")
        self.size_divisibility = size_divisibility

    def __call__(self, samples: Sequence[Any]) -> Tuple[torch.Tensor, List[Dict[str, Any]], List[str]]:
        skipped = [
            s.file_name if isinstance(s, SkippedSample) else UNNAMED_SAMPLE
            for s in samples
            if s is None or isinstance(s, SkippedSample)
        ]
        kept = [s for s in samples if s is not None and not isinstance(s, SkippedSample)]
        if not kept:
            return torch.zeros(0, 3, 0, 0), [], skipped
        images = [image for image, _ in kept]
        targets = [target for _, target in kept]
        d = self.size_divisibility
        max_h = max(image.shape[1] for image in images)
        max_w = max(image.shape[2] for image in images)
        padded_h, padded_w = -(-max_h // d) * d, -(-max_w // d) * d
        batch = images[0].new_zeros((len(images), images[0].shape[0], padded_h, padded_w))
        for image, slot in zip(images, batch):
            slot[:, : image.shape[1], : image.shape[2]].copy_(image)
        return batch, targets, skipped

    def __repr__(self) -> str:
        return f"Collate(size_divisibility={self.size_divisibility})"


collate_fn = Collate(32)
