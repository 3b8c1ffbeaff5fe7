"""Anchor boxes for the P3..P7 pyramid, and the anchor file written by kmeans_for_anchors.py.

Order of the anchors (it MUST match the order in which the heads emit predictions): level-major
(P3 first), then feature cell row-major (y, then x), then anchor type within the cell. The centre of
cell (x, y) on the level with stride s is ((x + 0.5) * s, (y + 0.5) * s), in input pixels.

The per-level anchor sizes (w, h) are buffers of :class:`AnchorGenerator`, so they travel inside a
model checkpoint: a model trained with k-means anchors rebuilds them from its own state dict.
"""

import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from utils.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_BASE_SIZES = (32, 64, 128, 256, 512)
ANCHOR_FILE_FORMAT = "fpn-ohem-anchors"
ANCHOR_FILE_VERSION = 1


def predefined_anchor_whs(
    num_scales: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    base_sizes: Sequence[float] = DEFAULT_BASE_SIZES,
) -> List[Tensor]:
    """RetinaNet-style anchor sizes: per level ``num_scales * len(aspect_ratios)`` (w, h) pairs.

    Scales are ``2 ** (i / num_scales)`` for i in 0..num_scales-1 (so 1, 2^(1/3), 2^(2/3) for 3).
    Ratios keep the area: ``w = size / sqrt(ar)``, ``h = size * sqrt(ar)`` with ``ar = h / w``.
    Order within a cell: scale-major, then aspect ratio.

    Returns:
        list (one per level) of Tensor[num_scales * len(aspect_ratios), 2] float32 (w, h) in input pixels.
    """
    if num_scales < 1:
        raise UserError(f"num_scales must be >= 1, got {num_scales}")
    if len(aspect_ratios) == 0 or any(not ar > 0 for ar in aspect_ratios):
        raise UserError(
            f"aspect_ratios must be a non-empty list of positive numbers, got {list(aspect_ratios)}"
        )
    if any(not s > 0 for s in base_sizes):
        raise UserError(f"base_sizes must be positive, got {list(base_sizes)}")
    scales = torch.tensor([2.0 ** (i / num_scales) for i in range(num_scales)], dtype=torch.float64)
    ratios = torch.tensor(list(aspect_ratios), dtype=torch.float64)
    whs_per_level = []
    for base in base_sizes:
        sizes = base * scales[:, None]  # [S, 1]
        ws = sizes / ratios.sqrt()[None, :]  # [S, R]
        hs = sizes * ratios.sqrt()[None, :]
        whs_per_level.append(torch.stack([ws, hs], dim=-1).reshape(-1, 2).float())
    return whs_per_level


class AnchorGenerator(nn.Module):
    """Anchors in xyxy input pixels for any input size, cached per (grid sizes, device).

    Args:
        anchor_whs_per_level (list of Tensor[k, 2]): (w, h) of the k anchor types of each level, in
            input pixels. k must be the same on all levels (the heads share one output layout).
        strides (sequence of int): stride of each level, P3 first.

    The sizes are stored as one buffer ``anchor_whs`` (Tensor[L, k, 2]) so they are saved in the model's
    state dict. Loading a state dict whose ``anchor_whs`` has the same shape (other sizes, same k) works
    and clears the cache. A different k (or level count) changes the head's output channels too, so it
    needs a new generator and model: build them from ``anchor_whs_from_state_dict`` instead.
    """

    def __init__(
        self,
        anchor_whs_per_level: Sequence[Tensor],
        strides: Sequence[int] = DEFAULT_STRIDES,
        max_cache_entries: int = 16,
    ):
        super().__init__()
        whs = [torch.as_tensor(w, dtype=torch.float32) for w in anchor_whs_per_level]
        _check_anchor_whs(whs, strides, source="AnchorGenerator")
        self.strides = tuple(int(s) for s in strides)
        self.register_buffer("anchor_whs", torch.stack(whs))  # [L, k, 2]
        self.max_cache_entries = max_cache_entries
        # keep_aspect inputs come in many sizes: bound the cache (LRU) instead of growing without limit.
        self._cache: OrderedDict[Tuple, Tensor] = OrderedDict()

    @property
    def num_anchors_per_location(self) -> int:
        return int(self.anchor_whs.shape[1])

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def anchor_whs_per_level(self) -> List[Tensor]:
        """The (w, h) sizes as a list of Tensor[k, 2], one per level (copies, on the buffer's device)."""
        return [w.clone() for w in self.anchor_whs]

    def grid_sizes_for_input(self, h: int, w: int) -> List[Tuple[int, int]]:
        """Feature map size (h_l, w_l) = (ceil(h / s), ceil(w / s)) of each level for an input of h x w."""
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]

    def num_anchors_per_level(self, grid_sizes: Sequence[Tuple[int, int]]) -> List[int]:
        k = self.num_anchors_per_location
        return [int(gh) * int(gw) * k for gh, gw in grid_sizes]

    def anchors_for_input(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
        return self(self.grid_sizes_for_input(h, w), device)

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, grid_sizes: Sequence[Tuple[int, int]], device: torch.device | None = None) -> Tensor:
        """Anchors for the given feature map sizes.

        Args:
            grid_sizes (list of (h_l, w_l)): one per level, P3 first.
            device: where the anchors live (default: the buffer's device).

        Returns:
            Tensor[A, 4] float32, xyxy input pixels, A = sum_l h_l * w_l * k. Treat it as read-only:
            the same tensor is returned from the cache on later calls.
        """
        if len(grid_sizes) != self.num_levels:
            raise UserError(f"got {len(grid_sizes)} grid sizes for {self.num_levels} anchor levels")
        device = torch.device(device) if device is not None else self.anchor_whs.device
        key = (tuple((int(gh), int(gw)) for gh, gw in grid_sizes), str(device))
        anchors = self._cache.get(key)
        if anchors is not None:
            self._cache.move_to_end(key)
            return anchors
        anchors = torch.cat(
            [
                _grid_anchors(gh, gw, stride, whs.to(device))
                for (gh, gw), stride, whs in zip(key[0], self.strides, self.anchor_whs)
            ]
        )
        self._cache[key] = anchors
        while len(self._cache) > self.max_cache_entries:
            self._cache.popitem(last=False)
        return anchors

    def _load_from_state_dict(self, *args, **kwargs):
        # New sizes invalidate every cached anchor set.
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"strides={self.strides}, num_anchors_per_location={self.num_anchors_per_location}"


def _grid_anchors(grid_h: int, grid_w: int, stride: int, whs: Tensor) -> Tensor:
    """Tensor[grid_h * grid_w * k, 4] xyxy, cell row-major then anchor type."""
    device = whs.device
    cx = (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) * stride
    cy = (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # [H, W] each, row-major
    centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [H*W, 1, 2]
    half = 0.5 * whs.float()[None]  # [1, k, 2]
    return torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)


def anchor_whs_from_state_dict(state_dict: Dict[str, Tensor], prefix: str = "") -> List[Tensor]:
    """The per-level (w, h) sizes saved in a model state dict, to rebuild a generator with another k.

    ``prefix`` is the generator's key prefix (e.g. ``"anchor_generator."``); with an empty prefix the
    single key ending in ``anchor_whs`` is used.
    """
    if prefix:
        key = prefix + "anchor_whs"
        if key not in state_dict:
            raise UserError(f"state dict has no {key!r}")
    else:
        keys = [k for k in state_dict if k == "anchor_whs" or k.endswith(".anchor_whs")]
        if len(keys) != 1:
            raise UserError(f"expected one '*anchor_whs' key in the state dict, found {keys}")
        key = keys[0]
    return [w.clone().float() for w in state_dict[key]]


def _check_anchor_whs(whs_per_level: Sequence[Tensor], strides: Sequence[int], source: str) -> None:
    problems = []
    if len(whs_per_level) != len(strides):
        problems.append(f"{len(whs_per_level)} anchor levels but {len(strides)} strides {list(strides)}")
    counts = []
    for level, whs in enumerate(whs_per_level):
        if whs.dim() != 2 or whs.shape[1] != 2:
            problems.append(
                f"level {level}: anchors must be a list of [w, h] pairs, got shape {list(whs.shape)}"
            )
            continue
        counts.append(whs.shape[0])
        if whs.shape[0] == 0:
            problems.append(f"level {level}: no anchors")
        elif not bool(torch.isfinite(whs).all()) or not bool((whs > 0).all()):
            problems.append(f"level {level}: anchor sizes must be finite and positive, got {whs.tolist()}")
    if len(set(counts)) > 1:
        problems.append(f"anchors per level differ {counts}: the heads need the same number on every level")
    if any(not (isinstance(s, int) or float(s).is_integer()) or s <= 0 for s in strides):
        problems.append(f"strides must be positive integers, got {list(strides)}")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


def save_anchor_file(path: str, anchor_whs_per_level: Sequence[Tensor], **meta: Any) -> None:
    """Write anchor sizes as the JSON anchor file (atomic: a partial file never replaces a good one).

    Args:
        path: output .json file.
        anchor_whs_per_level (list of Tensor[k, 2] or nested lists): (w, h) per level, input pixels.
        meta: extra fields (``strides`` defaults to (8, 16, 32, 64, 128); kmeans_for_anchors.py adds
            resize_mode, input_dim, min_size, max_size, dataset, train_sets).
    """
    strides = [int(s) for s in meta.pop("strides", DEFAULT_STRIDES)]
    whs = [torch.as_tensor(w, dtype=torch.float32) for w in anchor_whs_per_level]
    _check_anchor_whs(whs, strides, source=path)
    for reserved in ("format", "version", "anchors_per_level"):
        if reserved in meta:
            raise UserError(f"{path}: {reserved!r} is written by save_anchor_file, not passed as meta")
    record = {
        "format": ANCHOR_FILE_FORMAT,
        "version": ANCHOR_FILE_VERSION,
        "strides": strides,
        "anchors_per_level": [
            [[round(float(w), 4), round(float(h), 4)] for w, h in level.tolist()] for level in whs
        ],
    }
    record.update(meta)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def load_anchor_file(path: str, expected_strides: Sequence[int] | None = None) -> Tuple[List[Tensor], Dict]:
    """Read and validate an anchor file.

    Returns:
        (anchor_whs_per_level: list of Tensor[k, 2] float32, meta: dict of the other fields, incl. strides)

    Raises:
        ValueError naming ``path``: not JSON, wrong format or version, level count that does not match the
        file's strides (or ``expected_strides``), malformed or non-positive sizes, unequal counts per level.
    """
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a JSON anchor file ({e})") from e
    if not isinstance(record, dict) or record.get("format") != ANCHOR_FILE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{path}: not an anchor file (format {found!r}, expected {ANCHOR_FILE_FORMAT!r}); "
            "write one with kmeans_for_anchors.py"
        )
    if record.get("version") != ANCHOR_FILE_VERSION:
        raise UserError(
            f"{path}: anchor file version {record.get('version')!r} is not supported "
            f"(expected {ANCHOR_FILE_VERSION})"
        )
    for key in ("strides", "anchors_per_level"):
        if not isinstance(record.get(key), list):
            raise UserError(f"{path}: missing or malformed {key!r} (expected a list)")
    strides = record["strides"]
    if not all(isinstance(s, (int, float)) for s in strides):
        raise UserError(f"{path}: strides must be numbers, got {strides}")
    whs = []
    for level, pairs in enumerate(record["anchors_per_level"]):
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in pairs
        ):
            raise UserError(f"{path}: level {level} must be a list of [w, h] number pairs")
        whs.append(torch.tensor(pairs, dtype=torch.float32).reshape(-1, 2))
    _check_anchor_whs(whs, strides, source=path)
    if expected_strides is not None and [int(s) for s in strides] != [int(s) for s in expected_strides]:
        raise UserError(
            f"{path}: anchors were made for strides {strides}, the model uses {list(expected_strides)}"
        )
    meta = {k: v for k, v in record.items() if k not in ("format", "version", "anchors_per_level")}
    meta["strides"] = [int(s) for s in strides]
    return whs, meta
