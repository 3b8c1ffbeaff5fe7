"""The checks that make bad option values fail at start, all errors at once, each naming its option.

``check_common_args(args)`` runs on resolved options (utils/options/resolve.py) in every script before
anything is loaded. What an architecture supports comes from its description (models/archs.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Callable, List, Tuple

from layers.anchor_sets import shipped_anchor_file
from models.archs import ARCH_SPECS, archs_with

logger = logging.getLogger(__name__)


def non_finite_options(args: argparse.Namespace) -> List[str]:
    """``--name value`` of every float option (or list of floats) that is NaN or infinite.

    Generic over the namespace, so the float options of every script that calls check_common_args are
    covered, its own ones included.
    """
    bad = []
    for key, value in sorted(vars(args).items()):
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            bad.append(f"--{key} must be a finite number, got {value}")
    return bad


# (option, valid(value), what the error says): range checks of the float and integer options not
# covered elsewhere (the value must make sense before the run starts, not crash or train on NaN later).
# Written as "valid", not as "bad", so that a NaN fails them.
RANGE_CHECKS: Tuple[Tuple[str, Callable[[float], bool], str], ...] = (
    ("negative_threshold", lambda v: v >= 0, "must be in [0, --positive_threshold]"),
    ("smooth_l1_beta", lambda v: v >= 0, "must be >= 0 (0: L1)"),
    ("focal_alpha", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("focal_gamma", lambda v: v >= 0, "must be >= 0"),
    ("neg_pos_ratio", lambda v: v >= 1, "must be >= 1"),
    ("fpn_channels", lambda v: v >= 1, "must be >= 1"),
    ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("gamma", lambda v: 0 < v <= 1, "(lr factor at each --step_values) must be in (0, 1]"),
    ("warmup_factor", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("clip_grad", lambda v: v >= 0, "must be >= 0 (0: off)"),
    ("keep_checkpoints", lambda v: v >= 0, "must be >= 0 (0: all)"),
    ("dist_timeout", lambda v: v > 0, "must be > 0 minutes"),
    ("vis_port", lambda v: 0 < v < 65536, "must be in 1..65535"),
    ("man_seed", lambda v: v >= 0, "must be >= 0"),
)


def check_range_options(args: argparse.Namespace) -> List[str]:
    """The RANGE_CHECKS errors (an option still None, not resolved, is not checked)."""
    errors = []
    for key, valid, text in RANGE_CHECKS:
        value = getattr(args, key)
        if isinstance(value, (int, float)) and not valid(value):
            errors.append(f"--{key} {text}, got {value}")
    return errors


def check_anchor_options(args: argparse.Namespace) -> List[str]:
    """--anchor_type kmeans needs a file (voc / coco: the original's set, filled in here); a file needs it."""
    errors = []
    if args.anchor_type == "kmeans":
        if not args.anchor_file and shipped_anchor_file(args.dataset):
            args.anchor_file = shipped_anchor_file(args.dataset)  # the original's clustered voc / coco set
        if not args.anchor_file:
            errors.append(
                f"--anchor_type kmeans needs --anchor_file for --dataset {args.dataset}: write one with "
                f"`python kmeans_for_anchors.py --dataset {args.dataset} --out anchors/{args.dataset}.json` "
                "(voc and coco use the original's clustered sets without one)"
            )
        elif not os.path.isfile(args.anchor_file):
            errors.append(f"--anchor_file {args.anchor_file!r} does not exist")
    if args.anchor_file and args.anchor_type != "kmeans":
        exists = "" if os.path.isfile(args.anchor_file) else " (and the file does not exist)"
        errors.append(
            f"--anchor_file {args.anchor_file!r} is not used with --anchor_type {args.anchor_type}{exists}: "
            "add --anchor_type kmeans to use it, or leave --anchor_file out"
        )
    if not args.aspect_ratios or any(r <= 0 for r in args.aspect_ratios):
        errors.append(f"--aspect_ratios must be positive, got {args.aspect_ratios}")
    return errors


def check_network_options(args: argparse.Namespace) -> List[str]:
    """Backbone weights and freezing, head towers and their sharing."""
    errors = []
    if args.pretrained not in ("imagenet", "none") and not os.path.isfile(args.pretrained):
        errors.append(f"--pretrained {args.pretrained!r} is neither 'imagenet', 'none' nor an existing file")
    if args.init_from and not os.path.isfile(args.init_from):
        errors.append(f"--init_from {args.init_from!r} does not exist")
    if not 0 <= args.freeze_upto <= 4:
        errors.append(f"--freeze_upto must be in 0..4, got {args.freeze_upto}")
    if args.shared_heads < 0:
        errors.append(f"--shared_heads must be 0 (separate towers) or > 0 (SH head), got {args.shared_heads}")
    elif args.shared_heads > 0 and args.num_shared_layers != args.num_head_layers - 1:
        errors.append(
            f"--shared_heads {args.shared_heads} is the SH head ({args.num_head_layers - 1} shared layers); "
            f"for {args.num_shared_layers} shared layers give --num_shared_layers alone"
        )
    if not 0 <= args.num_shared_layers <= args.num_head_layers:
        errors.append(
            f"--num_shared_layers must be in 0..--num_head_layers ({args.num_head_layers}), "
            f"got {args.num_shared_layers}"
        )
    if args.num_head_layers < 1:
        errors.append(f"--num_head_layers must be >= 1, got {args.num_head_layers}")
    if args.head_norm == "gn" and args.fpn_channels % 32:
        errors.append(f"--head_norm gn needs --fpn_channels divisible by 32, got {args.fpn_channels}")
    return errors


def check_arch_support(args: argparse.Namespace) -> List[str]:
    """Options that only some architectures have, as their descriptions (models/archs.py) say."""
    spec = ARCH_SPECS[args.arch]
    errors = []
    if args.fpn_variant == "original" and (not spec.our_heads or args.p6_from != "c5"):
        errors.append(
            f"--fpn_variant original is the single-stage FPN with P6 from C5 ({archs_with('our_heads')}, "
            "--p6_from c5)"
        )
    for setting, given in (
        ("--bn_mode eval", args.bn_mode == "eval"),
        ("--head_norm gn", args.head_norm == "gn"),
    ):
        if given and not spec.our_heads:
            errors.append(f"{setting} applies to --arch {archs_with('our_heads')} only")
    if args.protocol == "original" and not spec.original_protocol:
        errors.append(
            "--protocol original is the single-stage original's post-processing: "
            f"--arch {archs_with('original_protocol')} only"
        )
    if spec.needs_topk and args.topk == 0:
        errors.append(f"--arch {args.arch} needs --topk >= 1")
    if args.loss_type not in spec.loss_types:
        archs = " / ".join(name for name, other in ARCH_SPECS.items() if args.loss_type in other.loss_types)
        errors.append(f"--loss_type {args.loss_type} applies to --arch {archs} only")
    if args.tta != "none" and not spec.tta:
        errors.append(f"--tta {args.tta} applies to --arch {archs_with('tta')} only")
    return errors


def check_matching_options(args: argparse.Namespace) -> List[str]:
    """Box coding and the anchor / ground-truth matching thresholds."""
    errors = []
    if len(args.box_variances) != 2 or any(v <= 0 for v in args.box_variances):
        errors.append(f"--box_variances needs two positive numbers, got {args.box_variances}")
    if not 0 < args.positive_threshold <= 1:
        errors.append(f"--positive_threshold must be in (0, 1], got {args.positive_threshold}")
    if args.atss_topk < 1:
        errors.append(f"--atss_topk must be >= 1, got {args.atss_topk}")
    if args.negative_threshold is not None and args.negative_threshold > args.positive_threshold:
        errors.append(
            f"--negative_threshold ({args.negative_threshold}) must not exceed "
            f"--positive_threshold ({args.positive_threshold})"
        )
    return errors


def check_evaluation_options(args: argparse.Namespace) -> List[str]:
    """Post-processing thresholds and caps."""
    errors = []
    if not 0 < args.nms_thresh <= 1:
        errors.append(f"--nms_thresh must be in (0, 1], got {args.nms_thresh}")
    if not 0 <= args.conf_thresh < 1:
        errors.append(f"--conf_thresh must be in [0, 1), got {args.conf_thresh}")
    if args.pre_nms_topk < 1 or args.eval_batch_size < 1:
        errors.append(
            f"--pre_nms_topk and --eval_batch_size must be >= 1, got {args.pre_nms_topk} and "
            f"{args.eval_batch_size}"
        )
    if args.topk < 0 or (args.max_per_class or 0) < 0:
        errors.append(
            f"--topk and --max_per_class must be >= 0 (0: no cap), got {args.topk} and {args.max_per_class}"
        )
    return errors


def check_runtime_options(args: argparse.Namespace) -> List[str]:
    """Data loading workers, input sizes, EMA and torch.compile."""
    errors = []
    if args.num_workers < 0:
        errors.append(f"-j/--num_workers must be >= 0, got {args.num_workers}")
    elif args.num_workers == 0:  # the main process loads the batches: there is no worker to keep or ask
        if args.persistent_workers:
            errors.append("--persistent_workers needs worker processes: give -j/--num_workers > 0")
        if args.prefetch_factor is not None:
            errors.append("--prefetch_factor needs worker processes: give -j/--num_workers > 0")
    if args.prefetch_factor is not None and args.prefetch_factor < 1:
        errors.append(f"--prefetch_factor must be >= 1, got {args.prefetch_factor}")
    if args.input_dim < 32 or args.min_size < 32 or args.max_size < args.min_size:
        errors.append(
            f"input sizes too small or inconsistent: --input_dim {args.input_dim}, "
            f"--min_size {args.min_size}, --max_size {args.max_size}"
        )
    if not 0 <= args.ema_decay < 1 or not args.ema_tau >= 0:
        errors.append(
            f"--ema_decay must be in [0, 1) and --ema_tau >= 0, got {args.ema_decay}, {args.ema_tau}"
        )
    if args.compile_mode != "default" and not args.compile:
        errors.append(f"--compile_mode {args.compile_mode} needs --compile")
    return errors


def check_common_args(args: argparse.Namespace) -> None:
    """Fail at start, with the option's name, rather than an hour into a run: SystemExit listing every
    error. (--anchor_type kmeans without a file for voc / coco fills in the original's set.)"""
    non_finite = non_finite_options(args)
    errors = check_range_options(args)
    for check in (
        check_anchor_options,
        check_network_options,
        check_arch_support,
        check_matching_options,
        check_evaluation_options,
        check_runtime_options,
    ):
        errors += check(args)
    # A NaN fails every range check too: report it once, as not finite.
    named = tuple(e.split(" ", 1)[0] + " " for e in non_finite)
    errors = non_finite + [e for e in errors if not e.startswith(named)]
    if errors:
        raise SystemExit("Bad options:\n  " + "\n  ".join(errors))
    if args.ngpu > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        logger.warning("--ngpu %d ignored: only train.py starts several processes", args.ngpu)
