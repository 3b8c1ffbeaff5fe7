"""The one option parser every script shares, and the checks that make bad values fail at start.

Scripts build their parser as ``OptionParser(parents=[get_common_parser()])`` and add only what is
theirs (OptionParser records which options were typed, for merging with a checkpoint's). Groups: data,
input, model, anchors, loss, evaluation, schedule, logging and runtime. Every script accepts every group,
so a training command line works unchanged with evaluate.py (which finds the run folder from it), as in
the original. Option names follow the original codebase (``--basenet``, ``--shared_heads``,
``--anchor_type``, ``--loss_type``, ``--max_iter``, ``--step_values``, ``--val_step``).
"""

from __future__ import annotations

import argparse
import os
from typing import List

import torch

from data.transforms import AUGMENTATIONS

BASENETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = ("fpn_ohem", "faster_rcnn_fpn")


def float_list(text: str) -> List[float]:
    """Parse "0.5,1,2" into [0.5, 1.0, 2.0]."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def int_list(text: str) -> List[int]:
    """Parse "30000,40000" into [30000, 40000] (an empty string gives [])."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


class OptionParser(argparse.ArgumentParser):
    """ArgumentParser that also records which options were given on the command line.

    ``parse_args`` sets ``args.explicit_options`` (sorted dests), so that a checkpoint's options can be
    overridden by a value typed on the command line even when it equals the parser default (e.g.
    ``--data_root datasets/`` for a checkpoint trained with ``/scratch/data``).
    """

    _probing = False

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if not self._probing:
            parsed.explicit_options = sorted(self._given_dests(args))
        return parsed, extras

    def _given_dests(self, args) -> set:
        # Parse again with every default suppressed: only what was given ends up in the namespace.
        defaults = [(action, action.default) for action in self._actions]
        parser_defaults = self._defaults  # from set_defaults(), applied whatever was typed
        self._probing, self._defaults = True, {}
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            probe, _ = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action, default in defaults:
                action.default = default
            self._probing, self._defaults = False, parser_defaults
        return set(vars(probe))


def get_common_parser() -> argparse.ArgumentParser:
    """Options shared by train.py, evaluate.py, demo.py and extract_features.py.

    (kmeans_for_anchors.py has its own parser with the same data and input names: its --max_iter is
    k-means iterations.)
    """
    parser = argparse.ArgumentParser(add_help=False)

    # * Data
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", help="dataset folder name under --data_root")
    g.add_argument("--data_root", default="datasets/", help="root holding <dataset>/annotations/<split>.json")
    g.add_argument("--train_sets", default="train", help="comma-separated training splits")
    g.add_argument("--val_sets", default="val", help="comma-separated validation splits")
    g.add_argument(
        "--classes",
        default=None,
        help="train/evaluate on a class subset: a file with one name or MID per line, or a comma list; "
        "boxes of other classes are ignored in the loss (neither positive nor negative)",
    )
    g.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="skip missing/corrupt images with a warning (counted, reported at the end) instead of failing",
    )
    g.add_argument(
        "--augment",
        default="ssd",
        choices=AUGMENTATIONS,
        help="training augmentation: ssd (photometric, zoom out, IoU crop, flip), flip, or none",
    )
    g.add_argument("-j", "--num_workers", type=int, default=2, help="data loading worker processes")

    # * Input size
    g = parser.add_argument_group("input")
    g.add_argument(
        "--resize_mode",
        default="square",
        choices=("square", "keep_aspect"),
        help="square: --input_dim x --input_dim (the original); keep_aspect: short side --min_size, "
        "long side at most --max_size, batches padded to a multiple of 32",
    )
    g.add_argument("--input_dim", type=int, default=600, help="square input size")
    g.add_argument("--min_size", type=int, default=600, help="keep_aspect: short side")
    g.add_argument("--max_size", type=int, default=1000, help="keep_aspect: long side at most")

    # * Model
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch",
        default="fpn_ohem",
        choices=ARCHS,
        help="fpn_ohem: single-stage FPN detector; faster_rcnn_fpn: two-stage Faster R-CNN with FPN",
    )
    g.add_argument("--basenet", default="resnet50", choices=BASENETS, help="ResNet backbone")
    g.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet (torchvision weights from torch's cache), none (random init) or a state-dict PATH",
    )
    g.add_argument(
        "--freeze_upto",
        type=int,
        default=1,
        help="with pretrained weights, freeze the stem and the first N residual stages (0-4)",
    )
    g.add_argument(
        "--train_bn",
        dest="freeze_bn",
        action="store_false",
        help="train batch norm even with pretrained weights (it is frozen by default then)",
    )
    parser.set_defaults(freeze_bn=True)
    g.add_argument("--fpn_channels", type=int, default=256, help="FPN and head channels")
    g.add_argument("--p6_from", default="c5", choices=("c5", "p5"), help="input of the stride-2 P6 conv")
    g.add_argument("--num_head_layers", type=int, default=4, help="3x3 conv layers per head tower")
    g.add_argument(
        "--head_norm",
        default="none",
        choices=("none", "gn"),
        help="none (RetinaNet heads) or gn: GroupNorm(32) after each head conv (FCOS/ATSS heads)",
    )
    g.add_argument(
        "--shared_heads",
        type=int,
        default=0,
        help="as the original: 0 = separate cls and box towers of --num_head_layers convs; >0 = its SH head: "
        "all but the last tower conv shared (3 shared + 1 per branch at 4 layers)",
    )
    g.add_argument(
        "--num_shared_layers",
        type=int,
        default=None,
        help="share the first k of the --num_head_layers tower convs between the cls and box heads "
        "(0..num_head_layers; default: what --shared_heads says)",
    )
    g.add_argument(
        "--fpn_variant",
        default="ours",
        choices=("ours", "original"),
        help="ours (RetinaNet's FPN) or original (the original codebase's FPN; it also defaults "
        "--bias_heads 0, --bn_mode eval and --freeze_upto 0, as the original trained)",
    )
    g.add_argument(
        "--bias_heads",
        type=int,
        default=None,
        help="1/0: head tower convs with/without bias (default 1; 0 with --fpn_variant original)",
    )
    g.add_argument(
        "--bn_mode",
        default=None,
        choices=("frozen", "eval", "train"),
        help="backbone batch norm with loaded weights: frozen (statistics and affine), eval (statistics "
        "frozen, affine trains: the original's), train (= --train_bn); default frozen, eval with "
        "--fpn_variant original",
    )

    # * Anchors
    g = parser.add_argument_group("anchors")
    g.add_argument("--anchor_type", default="predefined", choices=("predefined", "kmeans"))
    g.add_argument("--anchor_file", default=None, help="anchor JSON written by kmeans_for_anchors.py")
    g.add_argument(
        "--num_scales", type=int, default=3, choices=(1, 2, 3), help="predefined anchors: scales per level"
    )
    g.add_argument(
        "--aspect_ratios", type=float_list, default=[0.5, 1.0, 2.0], help="predefined anchors: h/w ratios"
    )

    # * Loss and matching
    g = parser.add_argument_group("loss")
    g.add_argument(
        "--loss_type",
        default="mbox",
        choices=("mbox", "focal"),
        help="mbox: softmax + OHEM hard negatives; focal: sigmoid focal loss",
    )
    g.add_argument("--positive_threshold", type=float, default=0.5)
    g.add_argument(
        "--negative_threshold",
        type=float,
        default=None,
        help="anchors with IoU in [negative, positive) are ignored (default: 0.5 for mbox, 0.4 for focal)",
    )
    g.add_argument("--neg_pos_ratio", type=int, default=3, help="OHEM negatives per positive")
    g.add_argument("--smooth_l1_beta", type=float, default=None, help="default: 1.0 for mbox, 1/9 for focal")
    g.add_argument("--focal_alpha", type=float, default=0.25)
    g.add_argument("--focal_gamma", type=float, default=2.0)
    g.add_argument(
        "--box_variances", type=float_list, default=[0.1, 0.2], help="box coding variances (centre, size)"
    )

    # * Evaluation / post-processing
    g = parser.add_argument_group("evaluation")
    g.add_argument("--conf_thresh", type=float, default=0.05, help="per-level score threshold before NMS")
    g.add_argument("--nms_thresh", type=float, default=0.5)
    g.add_argument("--pre_nms_topk", type=int, default=1000, help="candidates per level before NMS")
    g.add_argument("--topk", type=int, default=100, help="detections kept per image")
    g.add_argument("--class_agnostic_nms", action="store_true")
    g.add_argument("--eval_batch_size", type=int, default=8)

    # * Schedule and optimisation (train.py; the other scripts accept them so that a training command
    # line can be reused as it is, e.g. by evaluate.py to find the run folder)
    g = parser.add_argument_group("schedule")
    g.add_argument("--batch_size", type=int, default=24, help="images per process and iteration")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    g.add_argument(
        "--lr",
        type=float,
        default=0.0005,
        help="base learning rate (see the lr rule in train.py's docstring)",
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-4, help="not applied to norm layers and biases")
    g.add_argument("--max_iter", type=int, default=50000)
    g.add_argument(
        "--step_values", type=int_list, default=[30000, 40000], help="iterations where lr *= --gamma"
    )
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--warmup_iters", type=int, default=500, help="linear warm-up from --warmup_factor * lr")
    g.add_argument("--warmup_factor", type=float, default=1.0 / 3)
    g.add_argument("--clip_grad", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm under DDP (for trainable BN)")

    # * Runs, validation and logging
    g = parser.add_argument_group("logging")
    g.add_argument("--save_root", default="runs/", help="parent of the run folders")
    g.add_argument("--run_name", default=None, help="run folder name (default: derived from the options)")
    g.add_argument(
        "--save_step", type=int, default=5000, help="checkpoint every N iterations (and at the end)"
    )
    g.add_argument("--keep_checkpoints", type=int, default=3, help="keep the last N checkpoints (0: all)")
    g.add_argument(
        "--resume", default=None, help="checkpoint path, or 'auto' for the newest in the run folder"
    )
    g.add_argument(
        "--val_step", type=int, default=5000, help="validate every N iterations (0: only at the end)"
    )
    g.add_argument(
        "--val_metric", default="voc", choices=("voc", "coco", "oid", "all"), help="metric for validation"
    )
    g.add_argument("--no_val", action="store_true", help="skip validation entirely")
    g.add_argument("--log_step", type=int, default=20, help="log every N iterations")
    g.add_argument("--tensorboard", action="store_true")
    g.add_argument("--visdom", action="store_true")
    g.add_argument("--vis_port", type=int, default=8097)

    # * Runtime
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    g.add_argument("--man_seed", type=int, default=123, help="random seed (offset by rank)")
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: bf16 or fp16 on CUDA, bf16 on CPU (fast where the CPU has AMX)",
    )
    g.add_argument(
        "--amp_dtype",
        default="bf16",
        choices=("bf16", "fp16"),
        help="fp16 (CUDA only) trains with a grad scaler",
    )
    g.add_argument(
        "--channels_last",
        action="store_true",
        help="NHWC weights and activations: faster convolutions with oneDNN on CPU (most of all with "
        "--amp bf16 on CPUs with AMX) and with tensor cores on GPU; results are unchanged",
    )
    return parser


def run_name(args: argparse.Namespace, world_size: int = 1) -> str:
    """Run folder name from the options, as in the original (backbone, anchors, loss, input, batch, lr).

    The batch in the name is the total over ``world_size`` processes.
    """
    if args.arch == "faster_rcnn_fpn":
        anchors = "rpn"
    elif args.anchor_type == "kmeans":
        anchors = f"kmeans-{os.path.splitext(os.path.basename(args.anchor_file))[0]}"
    else:
        anchors = f"pre{args.num_scales}x{len(args.aspect_ratios)}"
    size = f"sq{args.input_dim}" if args.resize_mode == "square" else f"ka{args.min_size}-{args.max_size}"
    heads = ""
    if args.arch == "fpn_ohem":
        heads = f"sh{args.shared_heads}" + ("gn" if args.head_norm == "gn" else "")
        if args.num_shared_layers != (args.num_head_layers - 1 if args.shared_heads > 0 else 0):
            heads += f"k{args.num_shared_layers}"  # --num_shared_layers k
        heads += "-fpnorig" if args.fpn_variant == "original" else ""
    parts = [
        args.dataset,
        args.arch,
        args.basenet,
        anchors,
        args.loss_type if args.arch == "fpn_ohem" else "",
        heads,
        size,
        f"bs{args.batch_size * world_size}",
        f"lr{args.lr:g}",
    ]
    return "_".join(p for p in parts if p)


def run_folder(args: argparse.Namespace, world_size: int = 1) -> str:
    """The run folder train.py writes to: ``--save_root``/(``--run_name`` or the derived name)."""
    return os.path.join(args.save_root, args.run_name or run_name(args, world_size))


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


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other options (loss-dependent thresholds)."""
    if getattr(args, "negative_threshold", None) is None:
        args.negative_threshold = 0.4 if args.loss_type == "focal" else args.positive_threshold
    if getattr(args, "smooth_l1_beta", None) is None:
        args.smooth_l1_beta = 1.0 / 9 if args.loss_type == "focal" else 1.0
    resolve_head_defaults(args)
    return args


def resolve_head_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--num_shared_layers from --shared_heads, and what --fpn_variant original implies unless typed."""
    args.fpn_variant = getattr(args, "fpn_variant", None) or "ours"
    original = args.fpn_variant == "original"
    if getattr(args, "num_shared_layers", None) is None:
        args.num_shared_layers = args.num_head_layers - 1 if args.shared_heads > 0 else 0
    if getattr(args, "bias_heads", None) is None:
        args.bias_heads = 0 if original else 1
    if getattr(args, "bn_mode", None) is None:
        args.bn_mode = "train" if not args.freeze_bn else ("eval" if original else "frozen")
    elif not args.freeze_bn and args.bn_mode != "train":
        raise SystemExit(f"--train_bn contradicts --bn_mode {args.bn_mode}: give one of them")
    args.freeze_bn = args.bn_mode != "train"  # for the builders that read only --train_bn (Faster R-CNN)
    typed = getattr(args, "explicit_options", None)
    if original and ("freeze_upto" not in typed if typed is not None else args.freeze_upto == 1):
        args.freeze_upto = 0  # the original trains every conv, the stem included
    return args


def check_common_args(args: argparse.Namespace) -> None:
    """Fail at start, with the option's name, rather than an hour into a run."""
    errors: List[str] = []
    if args.anchor_type == "kmeans":
        if not args.anchor_file:
            errors.append("--anchor_type kmeans needs --anchor_file (write one with kmeans_for_anchors.py)")
        elif not os.path.isfile(args.anchor_file):
            errors.append(f"--anchor_file {args.anchor_file!r} does not exist")
    if args.pretrained not in ("imagenet", "none") and not os.path.isfile(args.pretrained):
        errors.append(f"--pretrained {args.pretrained!r} is neither 'imagenet', 'none' nor an existing file")
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
    if args.fpn_variant == "original" and (args.arch != "fpn_ohem" or args.p6_from != "c5"):
        errors.append(
            "--fpn_variant original is the single-stage FPN with P6 from C5 (fpn_ohem, --p6_from c5)"
        )
    if args.bn_mode == "eval" and args.arch != "fpn_ohem":
        errors.append("--bn_mode eval applies to --arch fpn_ohem only")
    if args.num_head_layers < 1:
        errors.append(f"--num_head_layers must be >= 1, got {args.num_head_layers}")
    if not args.aspect_ratios or any(r <= 0 for r in args.aspect_ratios):
        errors.append(f"--aspect_ratios must be positive, got {args.aspect_ratios}")
    if len(args.box_variances) != 2 or any(v <= 0 for v in args.box_variances):
        errors.append(f"--box_variances needs two positive numbers, got {args.box_variances}")
    if not 0 < args.positive_threshold <= 1:
        errors.append(f"--positive_threshold must be in (0, 1], got {args.positive_threshold}")
    if args.negative_threshold is not None and args.negative_threshold > args.positive_threshold:
        errors.append(
            f"--negative_threshold ({args.negative_threshold}) must not exceed "
            f"--positive_threshold ({args.positive_threshold})"
        )
    if not 0 < args.nms_thresh <= 1:
        errors.append(f"--nms_thresh must be in (0, 1], got {args.nms_thresh}")
    if not 0 <= args.conf_thresh < 1:
        errors.append(f"--conf_thresh must be in [0, 1), got {args.conf_thresh}")
    if args.topk < 1 or args.pre_nms_topk < 1 or args.eval_batch_size < 1:
        errors.append(
            f"--topk, --pre_nms_topk and --eval_batch_size must be >= 1, got {args.topk}, "
            f"{args.pre_nms_topk} and {args.eval_batch_size}"
        )
    if args.num_workers < 0:
        errors.append(f"-j/--num_workers must be >= 0, got {args.num_workers}")
    if args.input_dim < 32 or args.min_size < 32 or args.max_size < args.min_size:
        errors.append(
            f"input sizes too small or inconsistent: --input_dim {args.input_dim}, "
            f"--min_size {args.min_size}, --max_size {args.max_size}"
        )
    if args.arch == "faster_rcnn_fpn" and args.loss_type == "focal":
        errors.append("--loss_type focal applies to --arch fpn_ohem only")
    if args.head_norm == "gn":
        if args.arch != "fpn_ohem":
            errors.append("--head_norm gn applies to --arch fpn_ohem only")
        if args.fpn_channels % 32:
            errors.append(f"--head_norm gn needs --fpn_channels divisible by 32, got {args.fpn_channels}")
    if errors:
        raise SystemExit("Bad options:\n  " + "\n  ".join(errors))


def split_names(text: str | None) -> List[str]:
    """Split a comma-separated option ("trainval2007,trainval2012") into names."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]
