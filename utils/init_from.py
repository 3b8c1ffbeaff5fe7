"""``--init_from CHECKPOINT``: start a new run from the weights of a trained detector.

Sources:
- a checkpoint of this project (train.py's, or export.py's ``--format weights``), of either
  architecture: every tensor whose name and shape fit the new model is loaded;
- a torchvision RetinaNet or Faster R-CNN state dict (``model.state_dict()``, or a dict holding it
  under "model" as torchvision's references save it): the backbone (``backbone.body.*``) and FPN
  (``backbone.fpn.*``) are renamed to ours; the rest keeps its name, so that the RPN and RoI heads of a
  torchvision Faster R-CNN load into ``--arch faster_rcnn_fpn`` (whose heads are torchvision's).

FPN levels are matched by pyramid level, not position: the laterals of a C2..C5 FPN (Faster R-CNN)
give C3..C5 to a single-stage model and the other way round. The predictors, the layers whose size
follows the class count or the anchors per location (``head.cls_pred``, ``head.box_pred``,
``rpn.head.cls_logits``, ``rpn.head.bbox_pred``, ``roi_heads.box_predictor``), keep their fresh
initialisation when their shapes differ; any other shape mismatch is an error naming the layers (the
options that set them differ). The new run's anchors (``anchor_generator.anchor_whs``) are never
replaced. The log says which tensors were loaded, re-initialised, kept (not in the source) and left
out (in the source, not in the model).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from utils.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

PREDICTOR_PREFIXES = (
    "head.cls_pred.",
    "head.box_pred.",
    "rpn.head.cls_logits.",
    "rpn.head.bbox_pred.",
    "roi_heads.box_predictor.",
)
NEVER_LOADED = ("anchor_generator.anchor_whs",)
_FPN_LEVEL_KEY = re.compile(r"^fpn\.(lateral_convs|output_convs)\.(\d+)\.(.*)$")


def load_init_source(path: str) -> Tuple[Dict[str, Tensor], str, int]:
    """The source's state dict, a description, and the pyramid level of its first FPN lateral."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--init_from {path!r} does not exist") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"--init_from {path!r}: could not load it with weights_only=True: {e}") from e
    if isinstance(state, dict) and "model" in state and "args" in state:
        from models.archs import ARCH_SPECS  # late import: utils must not depend on models at import time

        args = state["args"]
        arch = args.get("arch", "fpn_ohem")  # checkpoints written before --arch existed
        if arch not in ARCH_SPECS:
            raise CheckpointError(
                f"--init_from {path!r}: its arch {arch!r} is none of this codebase's "
                f"({', '.join(ARCH_SPECS)})"
            )
        source = f"{arch} {args.get('basenet')} checkpoint, {len(state.get('class_names') or [])} classes"
        return dict(state["model"]), source, ARCH_SPECS[arch].first_fpn_level
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision's references save {"model": ..., "optimizer": ..., ...}
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"--init_from {path!r} is neither a checkpoint of this project nor a state dict of tensors"
        )
    if not any(k.startswith("backbone.body.") for k in state):
        raise CheckpointError(
            f"--init_from {path!r}: a state dict without 'backbone.body.*' keys is not a torchvision "
            "RetinaNet / Faster R-CNN (give a checkpoint of this project or such a state dict)"
        )
    mapped, first_level = torchvision_to_ours(state)
    return mapped, "torchvision detection state dict", first_level


def torchvision_to_ours(state: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], int]:
    """Rename torchvision's ``backbone.body`` / ``backbone.fpn`` keys to ours; returns (state, first level).

    torchvision: body.conv1/bn1/layerN; fpn.inner_blocks.i[.0] (1x1 laterals), fpn.layer_blocks.i[.0]
    (3x3 outputs), fpn.extra_blocks.p6/p7 (RetinaNet's LastLevelP6P7). Four laterals start at C2
    (Faster R-CNN), three at C3 (RetinaNet).
    """
    out: Dict[str, Tensor] = {}
    num_laterals = len({k.split(".")[3] for k in state if k.startswith("backbone.fpn.inner_blocks.")})
    for key, value in state.items():
        new = key
        if key.startswith("backbone.body.conv1."):
            new = "backbone.stem.0." + key[len("backbone.body.conv1.") :]
        elif key.startswith("backbone.body.bn1."):
            new = "backbone.stem.1." + key[len("backbone.body.bn1.") :]
        elif key.startswith("backbone.body."):
            new = "backbone." + key[len("backbone.body.") :]
        elif key.startswith("backbone.fpn."):
            match = re.match(
                r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(?:0\.)?(weight|bias)$", key
            )
            extra = re.match(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)$", key)
            if match:
                part = "lateral_convs" if match.group(1) == "inner_blocks" else "output_convs"
                new = f"fpn.{part}.{match.group(2)}.{match.group(3)}"
            elif extra:
                new = f"fpn.{extra.group(1)}.{extra.group(2)}"
        out[new] = value
    return out, 2 if num_laterals == 4 else 3


def shift_fpn_levels(state: Dict[str, Tensor], source_first: int, target_first: int) -> Dict[str, Tensor]:
    """Renumber FPN laterals/outputs from a pyramid starting at C``source_first`` to one at C``target_first``
    (entries without a counterpart get a negative index and end up left out)."""
    if source_first == target_first:
        return state
    out = {}
    for key, value in state.items():
        match = _FPN_LEVEL_KEY.match(key)
        if match:
            index = int(match.group(2)) + source_first - target_first
            key = (
                f"fpn.{match.group(1)}.{index}.{match.group(3)}"
                if index >= 0
                else f"(level C{source_first + int(match.group(2))}) {key}"
            )
        out[key] = value
    return out


def check_resumable(checkpoint: Dict[str, Any], path: str) -> None:
    """A weights-only file (export.py --format weights) has no optimizer state to resume from."""
    missing = [k for k in ("optimizer", "lr_scheduler", "scaler", "iteration") if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"--resume {path!r} has no {', '.join(missing)} (a weights-only file?): "
            "use --init_from to start a new run from its weights"
        )


def _summary(keys: List[str]) -> str:
    """'backbone.layer1 (30), fpn (16)': counts per module, two name levels deep."""
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{name} ({n})" for name, n in counts.items()) or "none"


def init_model_from(model: nn.Module, path: str) -> Dict[str, Any]:
    """Load what fits of ``path`` into ``model`` (see the module doc); returns and logs the report."""
    source, description, source_first = load_init_source(path)
    backbone = getattr(model, "backbone", None)
    target_first = min(getattr(backbone, "return_levels", (3,)))
    source = shift_fpn_levels(source, source_first, target_first)
    target = model.state_dict()
    loaded, reinitialised, mismatched, left_out = {}, [], [], []
    for key, value in source.items():
        if key not in target or key in NEVER_LOADED:
            left_out.append(key)
        elif value.shape == target[key].shape:
            loaded[key] = value
        elif key.startswith(PREDICTOR_PREFIXES):
            reinitialised.append(f"{key} {list(value.shape)} -> {list(target[key].shape)}")
        else:
            mismatched.append(f"{key} {list(value.shape)} in the source, {list(target[key].shape)} here")
    if mismatched:
        raise UserError(
            f"--init_from {path!r} does not fit this model in {len(mismatched)} layers, e.g. "
            + "; ".join(mismatched[:4])
            + " (the options that size them differ, e.g. --basenet, --fpn_channels, --num_head_layers)"
        )
    if not loaded:
        raise UserError(f"--init_from {path!r}: no tensor of it fits this model ({description})")
    model.load_state_dict(loaded, strict=False)
    kept = [k for k in target if k not in loaded]
    report = {
        "source": description,
        "loaded": sorted(loaded),
        "reinitialised": reinitialised,
        "kept": kept,
        "left_out": left_out,
    }
    logger.info(
        "--init_from %s (%s): loaded %d of the model's %d tensors: %s",
        path,
        description,
        len(loaded),
        len(target),
        _summary(list(loaded)),
    )
    if reinitialised:
        logger.info("re-initialised (class count or anchors differ): %s", "; ".join(reinitialised))
    if kept:
        logger.info("not in the source, left as initialised: %s", _summary(kept))
    if left_out:
        logger.info("in the source but not used: %s", _summary(left_out))
    missing_backbone = [
        k for k in kept if k.startswith("backbone.") and not k.endswith("num_batches_tracked")
    ]
    if missing_backbone:
        logger.warning(
            "%d backbone tensors are not in %s and keep their initialisation", len(missing_backbone), path
        )
    return report
