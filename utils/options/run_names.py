"""Run folder names derived from the options, and the checkpoint ``--resume`` names in a run folder."""

from __future__ import annotations

import argparse
import os
from typing import List

from models.archs import ARCH_SPECS


def resume_checkpoint_path(resume: str | None, run_dir: str) -> str | None:
    """The checkpoint --resume names: None, the run folder's newest ('auto') or its model_N (an iteration)."""
    from utils.checkpoint import CHECKPOINT_PATTERN, latest_checkpoint  # utils.checkpoint imports torch only

    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume is not None and resume.isdigit():
        return os.path.join(run_dir, CHECKPOINT_PATTERN.format(int(resume)))
    return resume


def anchor_name(args: argparse.Namespace) -> str:
    """The run name's anchor part: the architecture's own (Faster R-CNN's "rpn"), or from --anchor_type."""
    spec = ARCH_SPECS[args.arch]
    if not spec.our_anchors:
        return spec.run_name_anchors
    if args.anchor_type == "kmeans":
        anchor_file = args.anchor_file or f"original_{args.dataset}.json"  # no file: the shipped set
        return f"kmeans-{os.path.splitext(os.path.basename(anchor_file))[0]}"
    if args.anchor_type in ("pdf9", "default"):
        return args.anchor_type
    return f"pre{args.num_scales}x{len(args.aspect_ratios)}"


def head_name(args: argparse.Namespace) -> str:
    """The run name's head part ("sh0", "sh1gn", "sh0k2-fpnorig"); "" for architectures with other heads."""
    if not ARCH_SPECS[args.arch].our_heads:
        return ""
    heads = f"sh{args.shared_heads}" + ("gn" if args.head_norm == "gn" else "")
    # A command line not resolved yet (None) shares what --shared_heads implies: nothing to add.
    shared = args.num_shared_layers
    if shared is not None and shared != (args.num_head_layers - 1 if args.shared_heads > 0 else 0):
        heads += f"k{args.num_shared_layers}"  # --num_shared_layers k
    return heads + ("-fpnorig" if args.fpn_variant == "original" else "")


def run_name(args: argparse.Namespace, world_size: int = 1) -> str:
    """Run folder name from the options: as in the original (backbone, anchors, loss, input, batch, lr),
    then the RUN_NAME_EXTRAS options that differ from their defaults.

    The batch in the name is the total over ``world_size`` processes. The loss is named for the
    architectures that train with more than one.
    """
    size = f"sq{args.input_dim}" if args.resize_mode == "square" else f"ka{args.min_size}-{args.max_size}"
    parts = [
        args.dataset,
        args.arch,
        args.basenet,
        anchor_name(args),
        args.loss_type if len(ARCH_SPECS[args.arch].loss_types) > 1 else "",
        head_name(args),
        size,
        f"bs{args.batch_size * world_size}",
        f"lr{args.lr:g}",
    ]
    return "_".join([p for p in parts if p] + run_name_extras(args))


# Options that change what a run trains but are not in the original's name: each one that differs from
# its default adds "<tag><value>" to the derived name, so runs that differ in them get their own folders
# (and a run with the defaults keeps the original's name). The schedule length (--max_iter,
# --step_values) is left out on purpose: extending a run with --resume auto --max_iter N continues the
# same folder. Any other difference is caught by train.py's args.json check (utils/run_folder.py).
RUN_NAME_EXTRAS = (
    ("fpn_channels", "fpn", 256),
    ("num_head_layers", "hl", 4),
    ("p6_from", "p6", "c5"),
    ("optimizer", "", "sgd"),
    ("augment", "aug", "ssd"),
    ("sampler", "", "random"),
)


def run_name_extras(args: argparse.Namespace) -> List[str]:
    """The name parts of RUN_NAME_EXTRAS options that differ from their defaults, plus the weights the
    backbone starts from when not ImageNet ("ptnone", or "pt" + the weights file's stem)."""
    parts = [
        f"{tag}{getattr(args, key)}" for key, tag, default in RUN_NAME_EXTRAS if getattr(args, key) != default
    ]
    if args.pretrained != "imagenet":
        stem = os.path.splitext(os.path.basename(args.pretrained))[0]
        parts.append("pt" + (args.pretrained if args.pretrained == "none" else stem))
    return parts


def run_folder(args: argparse.Namespace, world_size: int = 1) -> str:
    """The run folder train.py writes to: ``--save_root``/(``--run_name`` or the derived name)."""
    return os.path.join(args.save_root, args.run_name or run_name(args, world_size))
