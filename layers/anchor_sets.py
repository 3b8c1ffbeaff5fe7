"""The original codebase's anchor sets (gurkirt/FPN.pytorch1.0, MIT), rebuilt from its definitions.

``--anchor_type pdf9`` and ``--anchor_type default`` are its ``modules/anchor_box_base.py`` sets;
``--anchor_type kmeans`` with no ``--anchor_file`` and ``--dataset voc`` or ``coco`` is its
``modules/anchor_box_kmeans.py`` clustered set, shipped as ``anchors/original_<dataset>.json``.

Per level k, with f_k the level's real feature size at a square input of ``input_side`` pixels
(ceil(input_side / stride): 75, 38, 19, 10, 5 at 600) the base area is ``s_k = (c_k * input_side / f_k)^2``,
and an aspect ratio ``ar = w / h`` (note: the other way round from ``--aspect_ratios``, which is h / w)
with a scale ``sr`` gives ``h = sqrt(s_k / ar) * sr``, ``w = ar * sqrt(s_k / ar) * sr``. So the sets scale
with the input, as the original's fractions of the input side do.

Order within a cell (the original's): aspect ratio major, then scale, i.e. for pdf9
(0.5, 1), (0.5, 1.34), (0.5, 1.67), (1, 1), ... With the level-major, row-major cell order of
``layers.anchors`` this is the original's anchor order, so its head outputs map onto the same anchors.
These sets are meant for ``AnchorGenerator(layout="original")``.

| set | c_k (P3..P7) | ar = w / h | scales | per cell | anchors at 600 |
| --- | --- | --- | --- | --- | --- |
| pdf9 | 2.4, 2.8, 3, 3.2, 3.4 | 0.5, 1, 1.5 | 1, 1.34, 1.67 | 9 | 67,995 |
| pdf6 (report only) | 2.4, 2.8, 3, 3.2, 3.4 | 0.5, 1, 1.5 | 1, 1.5 | 6 | 45,330 |
| default | 2.8, 3, 3, 3.2, 3.4 | 0.54, 1, 1.45 | 1 | 3 | 22,665 |
"""

import math
import os
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from layers.anchors import DEFAULT_STRIDES
from utils.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS_DIR = os.path.join(REPO_ROOT, "anchors")


class OriginalSet(NamedTuple):
    base_scales: Tuple[float, ...]  # c_k, one per level
    aspect_ratios: Tuple[float, ...]  # w / h
    scales: Tuple[float, ...]


ORIGINAL_SETS: Dict[str, OriginalSet] = {
    "pdf9": OriginalSet((2.4, 2.8, 3.0, 3.2, 3.4), (0.5, 1.0, 1.5), (1.0, 1.34, 1.67)),
    "pdf6": OriginalSet((2.4, 2.8, 3.0, 3.2, 3.4), (0.5, 1.0, 1.5), (1.0, 1.5)),
    "default": OriginalSet((2.8, 3.0, 3.0, 3.2, 3.4), (0.54, 1.0, 1.45), (1.0,)),
}
# The --anchor_type values that select an original set (pdf6 only appears in the anchor report).
ORIGINAL_ANCHOR_TYPES = ("pdf9", "default")
# --dataset -> the original's clustered set (modules/anchor_box_kmeans.py), shipped in anchors/.
SHIPPED_KMEANS_FILES = {
    "voc": os.path.join(ANCHORS_DIR, "original_voc.json"),
    "coco": os.path.join(ANCHORS_DIR, "original_coco.json"),
}


def feature_sizes(input_side: int, strides: Sequence[int] = DEFAULT_STRIDES) -> List[int]:
    """The pyramid's feature size per level for a square input: ceil(input_side / stride)."""
    return [math.ceil(input_side / s) for s in strides]


def original_anchor_fractions(
    name: str, input_side: int, strides: Sequence[int] = DEFAULT_STRIDES
) -> List[np.ndarray]:
    """The original's anchor set ``name`` as fractions of the input side, in its float64 arithmetic.

    The operations are the original's, in its order (``s = c * side / f``, ``s *= s``, ``h = sqrt(s / ar)``,
    ``w = ar * h``, times the scale, divided by the side), so that their float32 roundings are its
    float32 values bit for bit (its k-means breaks IoU ties by them).

    Returns:
        list (one per level, P3 first) of ndarray[len(ar) * len(scales), 2] float64 (w, h), aspect ratio
        major then scale within the cell.
    """
    if name not in ORIGINAL_SETS:
        raise UserError(f"unknown original anchor set {name!r} (expected one of {sorted(ORIGINAL_SETS)})")
    spec = ORIGINAL_SETS[name]
    if len(spec.base_scales) != len(strides):
        raise UserError(
            f"the original's {name} set has {len(spec.base_scales)} levels, got strides {strides}"
        )
    ratios = np.asarray(spec.aspect_ratios, dtype=np.float64)[:, None]  # [R, 1] w / h
    scales = np.asarray(spec.scales, dtype=np.float64)[None, :]  # [1, S]
    fractions_per_level = []
    for c, f in zip(spec.base_scales, feature_sizes(input_side, strides)):
        side = c * input_side / f
        h = np.sqrt(side * side / ratios)  # [R, 1]
        w = ratios * h
        whs = np.stack(np.broadcast_arrays(w * scales, h * scales), axis=-1)  # [R, S, 2]
        fractions_per_level.append(whs.reshape(-1, 2) / input_side)
    return fractions_per_level


def original_anchor_whs(name: str, input_side: int, strides: Sequence[int] = DEFAULT_STRIDES) -> List[Tensor]:
    """The original's anchor set ``name`` (pdf9, pdf6 or default) for a square input of ``input_side``.

    Returns:
        list (one per level, P3 first) of Tensor[len(ar) * len(scales), 2] float32 (w, h) in input
        pixels, aspect ratio major then scale within the cell.
    """
    return [
        torch.from_numpy(f * input_side).float() for f in original_anchor_fractions(name, input_side, strides)
    ]


def shipped_anchor_file(dataset: str) -> str | None:
    """The original's clustered set for ``dataset`` (voc or coco) shipped in anchors/, else None."""
    return SHIPPED_KMEANS_FILES.get(dataset)


def resolve_anchor_file(anchor_file: str | None, dataset: str) -> str | None:
    """The anchor file ``--anchor_type kmeans`` reads.

    ``anchor_file`` when given, except that a shipped file's path from another checkout (a checkpoint
    trained elsewhere) resolves to this checkout's copy; without one, the shipped set of ``dataset``
    (None for a dataset without one).
    """
    if not anchor_file:
        return shipped_anchor_file(dataset)
    if not os.path.isfile(anchor_file):
        for path in SHIPPED_KMEANS_FILES.values():
            if os.path.basename(anchor_file) == os.path.basename(path):
                return path
    return anchor_file
