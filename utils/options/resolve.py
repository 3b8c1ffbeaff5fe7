"""Resolve the options once: every default that depends on other options is filled here, and only here.

Scripts call ``resolve_defaults(args)`` right after parsing; builders (models.build_model,
data.dataset.build_dataset) then read plain attributes and have no defaults of their own, and
``models.build_model`` refuses an object that was not resolved (``require_resolved``). Resolving is
idempotent: a resolved object comes back unchanged. A checkpoint's options were resolved when it was
trained (utils.checkpoint.upgrade_saved_args fills what older ones lack), so the options merged from a
checkpoint and a resolved command line are resolved too.

The one value decided later is the per-class cap of ``--protocol original`` (``max_per_class_of``): it
depends on the dataset, which a checkpoint may supply after the command line was resolved.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, FrozenSet

import torch

from utils.errors import UserError
from utils.options.groups_run import ORIGINAL_PROTOCOL, OURS_PROTOCOL

# --dataset voc / coco without --train_sets / --val_sets: the original's splits (as prep/voc.py and
# prep/coco.py name them), so that its command lines (which name no splits) run unchanged.
COMMON_SPLITS = {"train_sets": "train", "val_sets": "val"}
ORIGINAL_SPLITS = {"voc": ("trainval2007,trainval2012", "test2007"), "coco": ("train2017", "val2017")}
# Options whose parser default is None, "decided by resolve_defaults": never None once resolved.
RESOLVED_OPTIONS = ("negative_threshold", "smooth_l1_beta", "num_shared_layers", "bias_heads", "bn_mode")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other options (loss-dependent thresholds, --protocol's values,
    the original's splits, the head options); returns ``args``, changed in place.

    ``--protocol original`` sets ORIGINAL_PROTOCOL's values for the options not given explicitly. When
    the protocol is original or given explicitly, its options count as given (``explicit_options``), so
    that they win over a checkpoint's values when evaluating it.
    """
    typed = getattr(args, "explicit_options", None)  # None: not parsed by OptionParser
    splits = ORIGINAL_SPLITS.get(str(args.dataset).lower())
    if splits is not None:  # the original's splits for --dataset voc / coco, unless given
        for key, value in zip(("train_sets", "val_sets"), splits):
            if (typed is None or key not in typed) and getattr(args, key) == COMMON_SPLITS[key]:
                setattr(args, key, value)
    if args.protocol == "original":
        for key, value in ORIGINAL_PROTOCOL.items():
            # Not given, and the common default (extract_features.py keeps its own --topk 10).
            if (typed is None or key not in typed) and getattr(args, key) == OURS_PROTOCOL[key]:
                setattr(args, key, value)
    if typed is not None and (args.protocol == "original" or "protocol" in typed):
        args.explicit_options = sorted(set(typed) | set(ORIGINAL_PROTOCOL) | {"protocol", "max_per_class"})
    if args.negative_threshold is None:
        args.negative_threshold = 0.4 if args.loss_type == "focal" else args.positive_threshold
    if args.smooth_l1_beta is None:
        args.smooth_l1_beta = 1.0 / 9 if args.loss_type == "focal" else 1.0
    return resolve_head_defaults(args)


def resolve_head_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--num_shared_layers from --shared_heads, and what --fpn_variant original implies unless typed."""
    original = args.fpn_variant == "original"
    if args.num_shared_layers is None:
        args.num_shared_layers = args.num_head_layers - 1 if args.shared_heads > 0 else 0
    if args.bias_heads is None:
        args.bias_heads = 0 if original else 1
    if args.bn_mode is None:
        args.bn_mode = "train" if not args.freeze_bn else ("eval" if original else "frozen")
    elif not args.freeze_bn and args.bn_mode != "train":
        raise SystemExit(f"--train_bn contradicts --bn_mode {args.bn_mode}: give one of them")
    args.freeze_bn = args.bn_mode != "train"  # for the builders that read only --train_bn (Faster R-CNN)
    typed = getattr(args, "explicit_options", None)  # None: not parsed by OptionParser
    if original and ("freeze_upto" not in typed if typed is not None else args.freeze_upto == 1):
        args.freeze_upto = 0  # the original trains every conv, the stem included
    return args


def set_as_typed(args: argparse.Namespace, **values: Any) -> None:
    """Set options as if typed on the command line, so that they win over a checkpoint's values (a
    script's fixed choices: extract_features.py's class-agnostic NMS, its --num_nodes and no TTA)."""
    for key, value in values.items():
        setattr(args, key, value)
    typed = getattr(args, "explicit_options", None)  # None: not parsed by OptionParser, nothing typed
    if typed is not None:
        args.explicit_options = sorted(set(typed) | set(values))


@functools.cache
def common_option_names() -> FrozenSet[str]:
    """The dests of every option of the common parser (what a builder may read)."""
    from utils.options.parser import get_common_parser

    return frozenset(vars(get_common_parser().parse_args([])))


def require_resolved(args: argparse.Namespace, what: str = "the model builder") -> None:
    """UserError unless ``args`` holds every common option, resolved: builders read plain attributes.

    Made by hand (an ``argparse.Namespace(...)`` listing some options) or parsed but not resolved, such
    an object would be built with whatever defaults each builder assumed; build it with a script's
    parser (``get_args_parser().parse_args([...])``) and ``resolve_defaults`` instead.
    """
    missing = sorted(common_option_names() - set(vars(args)))
    unresolved = [key for key in RESOLVED_OPTIONS if key not in missing and getattr(args, key) is None]
    if missing or unresolved:
        problems = (
            [f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else []
        )
        problems += [f"not resolved: {', '.join(unresolved)} (None)"] if unresolved else []
        raise UserError(
            f"{what} needs options parsed by a script's parser and resolved by "
            f"utils.options.resolve_defaults; got {'; '.join(problems)}"
        )


def max_per_class_of(args: argparse.Namespace) -> int:
    """Detections kept per class and image: --max_per_class, or the protocol's cap (--protocol original:
    50 for VOC, 20 for COCO, as the original's evaluate.py tests dataset == "coco"; ours: no cap, 0).

    Decided when the model is built, not by resolve_defaults: the dataset may be a checkpoint's."""
    if args.max_per_class is not None:
        return args.max_per_class
    if args.protocol != "original":
        return 0
    return 20 if str(args.dataset).lower().startswith("coco") else 50


def resolve_device(requested: str | None) -> torch.device:
    """``--device`` as given, or cuda when available, else cpu."""
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def amp_dtype_of(args: argparse.Namespace, device_type: str) -> torch.dtype | None:
    """The autocast dtype ``--amp``/``--amp_dtype`` ask for on ``device_type``, or None without --amp."""
    if not args.amp:
        return None
    if args.amp_dtype == "fp16" and device_type != "cuda":
        raise SystemExit("--amp --amp_dtype fp16 needs CUDA; use bf16 on the CPU")
    return torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
