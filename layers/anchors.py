"""Anchor boxes for the P3..P7 pyramid, and the anchor file written by kmeans_for_anchors.py.

Order of the anchors (it MUST match the order in which the heads emit predictions): level-major
(P3 first), then feature cell row-major (y, then x), then anchor type within the cell, in the order of
the level's (w, h) list. This is also the original codebase's order (its ``anchorBox.forward`` loops
levels, then ``product(range(f), repeat=2)`` = (row i, column j), then the shapes of the cell), so the
original's head outputs, permuted and flattened the same way, map onto the same anchors.

Two centre layouts (``AnchorGenerator(layout=...)``), for a level with feature size (f_h, f_w) on an
input of H x W pixels:
- ``"stride"`` (ours, RetinaNet's): the centre of cell (x, y) is ((x + 0.5) * s, (y + 0.5) * s) with s the
  level's stride.
- ``"original"`` (the original codebase's): ((x + 0.5) / f_w * W, (y + 0.5) / f_h * H). The same as
  "stride" when s divides the input, not otherwise: at 600, P4 has f = 38 and a spacing of
  600 / 38 = 15.79 px instead of 16, P6 f = 10 and 60 px instead of 64. Used with the original's anchor
  sets (``layers/anchor_sets.py``) so that its checkpoints predict the same boxes.

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
LAYOUTS = ("stride", "original")
# Units of an anchor file's sizes: input pixels (kmeans_for_anchors.py), or fractions of the input side
# (the original codebase's shipped sets, so they scale with --input_dim as in the original).
ANCHOR_FILE_UNITS = ("pixels", "input_fraction")


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
        layout: "stride" or "original", where the cell centres are (see the module docstring). With
            "original", ``forward`` needs ``image_size``.

    The sizes are stored as one buffer ``anchor_whs`` (Tensor[L, k, 2]) so they are saved in the model's
    state dict. Loading a state dict whose ``anchor_whs`` has the same shape (other sizes, same k) works
    and clears the cache. A different k (or level count) changes the head's output channels too, so it
    needs a new generator and model (``utils.checkpoint.build_model_from_checkpoint`` rebuilds both from
    the anchors a checkpoint carries).
    """

    def __init__(
        self,
        anchor_whs_per_level: Sequence[Tensor],
        strides: Sequence[int] = DEFAULT_STRIDES,
        max_cache_entries: int = 16,
        layout: str = "stride",
    ):
        super().__init__()
        whs = [torch.as_tensor(w, dtype=torch.float32) for w in anchor_whs_per_level]
        _check_anchor_whs(whs, strides, source="AnchorGenerator")
        if layout not in LAYOUTS:
            raise UserError(f"anchor layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
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
        return self(self.grid_sizes_for_input(h, w), device, image_size=(h, w))

    def cell_sizes(
        self, grid_sizes: Sequence[Tuple[int, int]], image_size: Tuple[int, int] | None = None
    ) -> List[Tuple[float, float]]:
        """Spacing (cell_h, cell_w) of the cell centres of each level, in input pixels.

        The stride for ``layout="stride"``; (H / f_h, W / f_w) for ``"original"`` (needs ``image_size``).
        """
        if self.layout == "stride":
            return [(float(s), float(s)) for s in self.strides]
        if image_size is None:
            raise UserError("anchor layout 'original' needs the input size (image_size=(H, W))")
        h, w = image_size
        return [(float(h) / int(gh), float(w) / int(gw)) for gh, gw in grid_sizes]

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(
        self,
        grid_sizes: Sequence[Tuple[int, int]],
        device: torch.device | None = None,
        image_size: Tuple[int, int] | None = None,
    ) -> Tensor:
        """Anchors for the given feature map sizes.

        Args:
            grid_sizes (list of (h_l, w_l)): one per level, P3 first.
            device: where the anchors live (default: the buffer's device).
            image_size ((H, W), network input pixels): needed by ``layout="original"``, unused by "stride".

        Returns:
            Tensor[A, 4] float32, xyxy input pixels, A = sum_l h_l * w_l * k. Treat it as read-only:
            the same tensor is returned from the cache on later calls.
        """
        if len(grid_sizes) != self.num_levels:
            raise UserError(f"got {len(grid_sizes)} grid sizes for {self.num_levels} anchor levels")
        device = torch.device(device) if device is not None else self.anchor_whs.device
        grids = tuple((int(gh), int(gw)) for gh, gw in grid_sizes)
        cells = self.cell_sizes(grids, image_size)
        size_key = None if self.layout == "stride" else tuple(int(v) for v in image_size)
        key = (grids, size_key, str(device))
        anchors = self._cache.get(key)
        if anchors is not None:
            self._cache.move_to_end(key)
            return anchors
        anchors = torch.cat(
            [
                _grid_anchors(gh, gw, cell, whs.to(device))
                for (gh, gw), cell, whs in zip(grids, cells, self.anchor_whs)
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
        return (
            f"strides={self.strides}, num_anchors_per_location={self.num_anchors_per_location}, "
            f"layout={self.layout!r}"
        )


def _grid_anchors(grid_h: int, grid_w: int, cell: Tuple[float, float], whs: Tensor) -> Tensor:
    """Tensor[grid_h * grid_w * k, 4] xyxy, cell row-major then anchor type; centres (j + 0.5) * cell."""
    device = whs.device
    # Centres in float64 on the CPU (cached, so cheap): (j + 0.5) * (600 / 38) rounded once, not twice.
    cx = ((torch.arange(grid_w, dtype=torch.float64) + 0.5) * cell[1]).float().to(device)
    cy = ((torch.arange(grid_h, dtype=torch.float64) + 0.5) * cell[0]).float().to(device)
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # [H, W] each, row-major
    centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [H*W, 1, 2]
    half = 0.5 * whs.float()[None]  # [1, k, 2]
    return torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)


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
        meta: extra fields (``strides`` defaults to (8, 16, 32, 64, 128); ``layout`` "stride" (default)
            or "original", the centre layout the set is meant for; ``units`` "pixels" (default) or
            "input_fraction"; kmeans_for_anchors.py adds resize_mode, input_dim, min_size, max_size,
            dataset, train_sets, method).
    """
    strides = [int(s) for s in meta.pop("strides", DEFAULT_STRIDES)]
    whs = [torch.as_tensor(w, dtype=torch.float32) for w in anchor_whs_per_level]
    _check_anchor_whs(whs, strides, source=path)
    _check_layout_and_units(meta, path)
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


def _check_layout_and_units(record: Dict, path: str) -> None:
    if record.get("layout", "stride") not in LAYOUTS:
        raise UserError(f"{path}: layout must be one of {LAYOUTS}, got {record.get('layout')!r}")
    if record.get("units", "pixels") not in ANCHOR_FILE_UNITS:
        raise UserError(f"{path}: units must be one of {ANCHOR_FILE_UNITS}, got {record.get('units')!r}")


def load_anchor_file(
    path: str, expected_strides: Sequence[int] | None = None, input_side: float | None = None
) -> Tuple[List[Tensor], Dict]:
    """Read and validate an anchor file.

    Args:
        input_side: the square input side (pixels) that ``"units": "input_fraction"`` sizes are fractions
            of; required by such files, ignored by pixel files.

    Returns:
        (anchor_whs_per_level: list of Tensor[k, 2] float32 in input pixels, meta: dict of the other
        fields, incl. strides, layout ("stride" when the file does not say) and units)

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
    _check_layout_and_units(record, path)
    if expected_strides is not None and [int(s) for s in strides] != [int(s) for s in expected_strides]:
        raise UserError(
            f"{path}: anchors were made for strides {strides}, the model uses {list(expected_strides)}"
        )
    meta = {k: v for k, v in record.items() if k not in ("format", "version", "anchors_per_level")}
    meta["strides"] = [int(s) for s in strides]
    meta.setdefault("layout", "stride")
    meta.setdefault("units", "pixels")
    if meta["units"] == "input_fraction":
        if input_side is None or not input_side > 0:
            raise UserError(
                f"{path}: sizes are fractions of the input side; give the input side to scale them"
            )
        whs = [w * float(input_side) for w in whs]
    return whs, meta
