"""Checkpoints that carry everything needed to rebuild and resume a run.

A checkpoint holds: model, optimizer, lr_scheduler, scaler, iteration, the resolved options
(as a dict), class names, original category ids and the anchors (w, h) per level. It is written
atomically (temp file + rename), so a crash while saving never corrupts the last good one.
It is loaded with ``torch.load(..., weights_only=True)``: a checkpoint from the internet cannot run
code, which is why options are stored as a plain dict, not a Namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import logging
import os
import pickle
import re
from typing import Any, Dict, List, Tuple

import torch

from utils import distributed as dist_utils
from utils.errors import CheckpointError

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


def non_finite_tensors(state: Any, prefix: str = "") -> List[str]:
    """Names (dotted paths) of the floating-point tensors in ``state`` holding a NaN or an infinity.

    state: a tensor, or dicts / lists / tuples of them at any depth (a model or optimizer state dict,
    a whole checkpoint); other values are ignored. One host-device sync for all tensors.
    """
    names: List[str] = []
    tensors: List[torch.Tensor] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                names.append(name)
                tensors.append(value.detach())
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else str(i))

    walk(state, prefix)
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def check_finite_state(state: Dict[str, Any], what: str) -> None:
    """CheckpointError naming ``what`` and the first tensors when the model or optimizer state of a
    checkpoint dict holds NaN or infinite values."""
    bad = non_finite_tensors({k: state[k] for k in ("model", "optimizer") if k in state})
    if bad:
        raise CheckpointError(
            f"{what} has non-finite (NaN or infinite) values in {len(bad)} tensor(s), e.g. "
            f"{', '.join(bad[:3])}: the run diverged before it was saved; use an earlier checkpoint"
        )


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically and durably; never write a non-finite model or optimizer.

    The bytes go to ``path.tmp``, are fsync'ed, and the file is renamed over ``path`` (then the folder
    is fsync'ed, so the rename survives a power cut): a crash, a kill or a full disk at any point
    leaves the previous checkpoints as they were. On an error the ``.tmp`` file is removed and a
    CheckpointError says why (ENOSPC: the disk is full).
    """
    check_finite_state(state, f"the state to be saved as {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise CheckpointError(
            f"could not write checkpoint {path!r}: {reason} ({e.__class__.__name__}: {e}); nothing was "
            "written and the earlier checkpoints are intact: free space (or change --save_root) and "
            "continue with --resume auto"
        ) from e
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_torch_load(path: str, what: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(path, weights_only=True) with an error that names the file and ``what`` it should be.

    weights_only refuses files that would run code when unpickled; the message says so instead of
    quoting torch's advice to turn it off.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "allowed global" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{what} {path!r} holds Python objects other than tensors and plain containers, which "
                "are refused because loading them could run code: save its state dict (tensors) instead"
            ) from e
        raise CheckpointError(f"{what} {path!r} is not a PyTorch file (or it is corrupt)") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"{what} {path!r} is not a readable PyTorch file: it is truncated or corrupt "
            f"({e.__class__.__name__})"
        ) from e


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", allow_original: bool = False
) -> Dict[str, Any]:
    """Load a checkpoint safely (weights_only=True), with a clear error (CheckpointError) for a missing,
    unreadable or foreign file, and for one whose model or optimizer state is not finite.

    ``allow_original``: also accept the original codebase's bare state dict (models/original.py)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        from models.original import is_original_state_dict  # late import, as build_model's below

        if is_original_state_dict(state):
            if allow_original:
                return state
            raise CheckpointError(
                f"{path!r} is an original FPN.pytorch1.0 checkpoint: evaluate.py, demo.py "
                "and extract_features.py load it, training does not"
            )
        raise CheckpointError(f"{path!r} is not a checkpoint of this project (needs 'model' and 'args')")
    check_finite_state(state, f"checkpoint {path!r}")
    return state


def load_newest_checkpoint(run_dir: str) -> Tuple[str | None, Dict[str, Any] | None]:
    """The newest checkpoint of ``run_dir`` that loads, as (path, state); (None, None) when it has none.

    A newer one that does not load (truncated by a crash outside save_checkpoint, corrupt, non-finite)
    is passed over with a warning naming it and why. CheckpointError when none of them loads.
    """
    paths = list_checkpoints(run_dir)
    errors = []
    for path in reversed(paths):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            logger.warning("--resume auto: passing over %s: %s", os.path.basename(path), e)
            errors.append(str(e))
            continue
        if errors:
            logger.warning(
                "--resume auto: resuming from %s, the newest of %d checkpoints that loads", path, len(paths)
            )
        return path, state
    if paths:
        raise CheckpointError(f"no checkpoint of {run_dir!r} loads: " + "; ".join(errors))
    return None, None


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


def weights_to_run(checkpoint: Dict[str, Any], eval_weights: str, path: str) -> str:
    """The checkpoint key of the weights to run: "model_ema" (``--ema`` runs, unless raw) or "model"."""
    has_ema = checkpoint.get("model_ema") is not None
    if eval_weights == "ema" and not has_ema:
        raise CheckpointError(
            f"--eval_weights ema: checkpoint {path!r} has no EMA weights (trained without --ema)"
        )
    return "model_ema" if has_ema and eval_weights != "raw" else "model"


def build_model_from_checkpoint(
    path: str, cli_args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device
):
    """Rebuild the trained model of a checkpoint. Returns (model, postprocessor, args, checkpoint).

    The model is in eval mode on ``device``; ``args`` are the merged options (see args_from_checkpoint),
    with ``class_names`` and ``category_ids`` of the training set attached.
    """
    from models import build_model  # late import: utils must not depend on models at import time
    from utils.options.resolve import resolve_defaults

    # A command line parsed but not resolved (Detector.from_checkpoint's) is resolved as the scripts' are
    # (a copy; idempotent for theirs): its options fill what the checkpoint lacks.
    cli_args = resolve_defaults(argparse.Namespace(**vars(cli_args)))
    checkpoint = load_checkpoint(path, allow_original=True)
    if "args" not in checkpoint:  # the original codebase's bare state dict, detected by its keys
        from models.original import build_model_from_original

        return build_model_from_original(path, checkpoint, cli_args, device)
    args = args_from_checkpoint(checkpoint, cli_args, parser)
    model, _criterion, postprocessor = build_model(
        args, anchor_whs_per_level=anchors_from_checkpoint(checkpoint), load_pretrained=False
    )
    weights = weights_to_run(checkpoint, args.eval_weights, path)
    problem = state_dict_mismatch(model.state_dict(), checkpoint[weights])
    if problem:
        raise CheckpointError(
            f"checkpoint {path!r}: its weights do not fit the options saved with it: {problem}"
        )
    model.load_state_dict(checkpoint[weights])
    args.class_names = checkpoint.get("class_names")
    args.category_ids = checkpoint.get("category_ids")
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    postprocessor.to(device)
    logger.info(
        "loaded %s (iteration %s, %s %s, %s weights)",
        path,
        checkpoint.get("iteration"),
        args.arch,
        args.basenet,
        "EMA" if weights == "model_ema" else "trained",
    )
    return model, postprocessor, args, checkpoint


# Which options shape the weights under a key (first match wins), for naming the option behind a mismatch.
KEY_OPTIONS = (
    (
        ("cls_pred", "cls_score", "cls_logits"),
        "--num_classes (the training classes) or the anchors per "
        "position (--num_scales, --aspect_ratios, --anchor_file)",
    ),
    (
        ("box_pred", "bbox_pred", "anchor"),
        "the anchors per position (--num_scales, --aspect_ratios, --anchor_file) or --num_classes",
    ),
    (("backbone.",), "--basenet"),
    (
        ("fpn.", "tower", "rpn.head.conv", "box_head"),
        "--fpn_channels, --num_head_layers, --shared_heads or --head_norm",
    ),
)


def options_behind(key: str) -> str:
    """The options that decide the shape (or presence) of the weight ``key``."""
    for patterns, options in KEY_OPTIONS:
        if any(p in key for p in patterns):
            return options
    return "--arch"


def state_dict_mismatch(model_state: Dict[str, torch.Tensor], loaded: Dict[str, torch.Tensor]) -> str:
    """'' when ``loaded`` fits ``model_state`` key for key and shape for shape; else a message naming the
    first wrongly shaped, missing and unexpected keys and the options that decide them."""
    wrong = [k for k in loaded if k in model_state and loaded[k].shape != model_state[k].shape]
    missing = [k for k in model_state if k not in loaded]
    unexpected = [k for k in loaded if k not in model_state]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} weight(s) of another shape, e.g. {k}: saved {tuple(loaded[k].shape)}, built "
            f"{tuple(model_state[k].shape)} (set by {options_behind(k)})"
        )
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label} weight(s), e.g. {keys[0]} (set by {options_behind(keys[0])})")
    return "; ".join(parts)


class NonFiniteWeightsError(FloatingPointError):
    """The model or optimizer state became NaN or infinite: nothing is saved, and the message says which
    checkpoint is the last good one."""

    def __init__(self, iteration: int, names: List[str], last_saved: str | None):
        kept = f"the last checkpoint, {last_saved}, is intact" if last_saved else "no checkpoint was saved"
        super().__init__(
            f"non-finite weights or optimizer state at iteration {iteration} (in {len(names)} tensor(s), "
            f"e.g. {', '.join(names[:3])}): not saved; {kept}. Try a lower --lr, --clip_grad or "
            "--warmup_iters."
        )


def non_finite_state(model: torch.nn.Module, optimizer: Any, device: torch.device) -> List[str]:
    """Names of the non-finite tensors of the model and optimizer states, agreed over all ranks (every
    rank gets [] only when every rank's are finite): a collective in a distributed run."""
    bad = non_finite_tensors({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    if not dist_utils.all_true(not bad, device) and not bad:
        bad = ["(on another process)"]
    return bad
