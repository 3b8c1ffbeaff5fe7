"""Checkpoints that carry everything needed to rebuild and resume a run.

A checkpoint holds: model, optimizer, lr_scheduler, scaler, iteration, the resolved options
(as a dict), class names, original category ids and the anchors (w, h) per level. It is written
atomically (temp file + rename), so a crash while saving never corrupts the last good one.
It is loaded with ``torch.load(..., weights_only=True)``: a checkpoint from the internet cannot run
code, which is why options are stored as a plain dict, not a Namespace.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
from typing import Any, Dict, List

import torch

from utils.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = "model_{:06d}.pth"


def args_to_dict(args: argparse.Namespace) -> Dict[str, Any]:
    """Options as plain Python values (weights_only loading accepts only those)."""
    out = {}
    for key, value in vars(args).items():
        if key == "explicit_options":  # how this command line was typed, not an option of the run
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
    return out


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", allow_original: bool = False
) -> Dict[str, Any]:
    """Load a checkpoint safely (weights_only=True), with a clear error for a missing or foreign file.

    ``allow_original``: also accept the original codebase's bare state dict (models/original.py)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise UserError(f"could not load checkpoint {path!r} with weights_only=True: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        from models.original import is_original_state_dict  # late import, as build_model's below

        if is_original_state_dict(state):
            if allow_original:
                return state
            raise CheckpointError(
                f"{path!r} is an original FPN.pytorch1.0 checkpoint: evaluate.py, demo.py "
                "and extract_features.py load it, training does not"
            )
        raise UserError(f"{path!r} is not a checkpoint of this project (needs 'model' and 'args')")
    return state


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoints of a run folder, oldest iteration first."""
    paths = glob.glob(os.path.join(run_dir, "model_*.pth"))
    return sorted(paths, key=checkpoint_iteration)


def checkpoint_iteration(path: str) -> int:
    match = re.search(r"model_(\d+)\.pth$", os.path.basename(path))
    return int(match.group(1)) if match else -1


def latest_checkpoint(run_dir: str) -> str | None:
    paths = list_checkpoints(run_dir)
    return paths[-1] if paths else None


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (keep_last <= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep_last]:
        os.remove(path)
        logger.info("removed old checkpoint %s", path)


# Options that define the network and its label space: always taken from the checkpoint, since the
# weights only fit the model they were trained with.
STRUCTURAL_OPTIONS = (
    "arch",
    "basenet",
    "fpn_channels",
    "p6_from",
    "num_head_layers",
    "head_norm",
    "shared_heads",
    "num_shared_layers",
    "fpn_variant",
    "bias_heads",
    "bn_mode",
    "anchor_type",
    "anchor_file",
    "num_scales",
    "aspect_ratios",
    "loss_type",
    "num_classes",
    "box_variances",
    "positive_threshold",
    "negative_threshold",
    "smooth_l1_beta",
    "focal_alpha",
    "focal_gamma",
    "neg_pos_ratio",
    # how the backbone was frozen: rebuilding with other values would change which weights train on resume
    "pretrained",
    "freeze_upto",
    "freeze_bn",
)


def upgrade_saved_args(saved: Dict[str, Any]) -> Dict[str, Any]:
    """Saved options of checkpoints older than an option, with the meaning they were trained with."""
    saved = dict(saved)
    if "num_shared_layers" not in saved:  # --shared_heads k used to mean k shared tower layers
        k, layers = int(saved.get("shared_heads") or 0), int(saved.get("num_head_layers", 4))
        saved.update(num_shared_layers=k, shared_heads=int(k > 0 and k == layers - 1))
    saved.setdefault("fpn_variant", "ours")
    saved.setdefault("bias_heads", 1)
    saved.setdefault("bn_mode", "frozen" if saved.get("freeze_bn", True) else "train")
    return saved


def args_from_checkpoint(
    checkpoint: Dict[str, Any], cli_args: argparse.Namespace, parser: argparse.ArgumentParser
) -> argparse.Namespace:
    """Options for rebuilding a trained model: the checkpoint's, with the command line's on top.

    Structural options come from the checkpoint (a different value typed for one is logged as ignored).
    Any other option given on the command line wins: typed, as recorded by ``OptionParser`` in
    ``cli_args.explicit_options``, or, for a namespace without that record, differing from the parser
    default. The rest keep the checkpoint's values, falling back to the command line's defaults for
    options the checkpoint predates. Weights come from the checkpoint: callers build with
    ``load_pretrained=False`` so no ImageNet file is read.
    """
    merged = dict(vars(cli_args))
    typed = getattr(cli_args, "explicit_options", None)
    checkpoint = {**checkpoint, "args": upgrade_saved_args(checkpoint["args"])}

    def explicit(key: str) -> bool:
        if key not in merged:
            return False
        return key in typed if typed is not None else merged[key] != parser.get_default(key)

    for key, value in checkpoint["args"].items():
        if key in STRUCTURAL_OPTIONS and explicit(key) and merged[key] != value:
            logger.warning(
                "--%s %s ignored: the checkpoint's model was built with %s", key, merged[key], value
            )
        if key in STRUCTURAL_OPTIONS or not explicit(key):
            merged[key] = value
    for key, value in vars(cli_args).items():  # script-only options (e.g. --checkpoint) stay as given
        merged.setdefault(key, value)
    if checkpoint["args"].get("classes") and checkpoint.get("class_names"):
        # A model trained on a class subset evaluates on the same subset; the names are stored because the
        # --classes file the run used may not exist where the checkpoint is evaluated.
        merged["classes"] = list(checkpoint["class_names"])
    return argparse.Namespace(**merged)


def anchors_from_checkpoint(checkpoint: Dict[str, Any]):
    """The checkpoint's anchors as a list of Tensor[k, 2] (w, h), or None."""
    import torch as _torch

    anchors = checkpoint.get("anchors")
    return None if anchors is None else [_torch.tensor(a, dtype=_torch.float32) for a in anchors]


def build_model_from_checkpoint(
    path: str, cli_args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device
):
    """Rebuild the trained model of a checkpoint. Returns (model, postprocessor, args, checkpoint).

    The model is in eval mode on ``device``; ``args`` are the merged options (see args_from_checkpoint),
    with ``class_names`` and ``category_ids`` of the training set attached.
    """
    from models import build_model  # late import: utils must not depend on models at import time

    checkpoint = load_checkpoint(path, allow_original=True)
    if "args" not in checkpoint:  # the original codebase's bare state dict, detected by its keys
        from models.original import build_model_from_original

        return build_model_from_original(path, checkpoint, cli_args, device)
    args = args_from_checkpoint(checkpoint, cli_args, parser)
    model, _criterion, postprocessor = build_model(
        args, anchor_whs_per_level=anchors_from_checkpoint(checkpoint), load_pretrained=False
    )
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path!r} does not fit the model it describes: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    args.class_names = checkpoint.get("class_names")
    args.category_ids = checkpoint.get("category_ids")
    model.to(device).eval()
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    postprocessor.to(device)
    logger.info("loaded %s (iteration %s, %s %s)", path, checkpoint.get("iteration"), args.arch, args.basenet)
    return model, postprocessor, args, checkpoint
