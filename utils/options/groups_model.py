"""The option groups that describe the data and the network: data, sampling, input, model, anchors, loss.

Part of the common parser (utils/options/parser.py); the names follow the original codebase.
"""

from __future__ import annotations

import argparse
from typing import List

from utils.choices import AUGMENTATIONS, CHECK_MODES, CROP_RULES, PIN_MEMORY_MODES
from utils.cli import BoolAction

BASENETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


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


def split_names(text: str | None) -> List[str]:
    """Split a comma-separated option ("trainval2007,trainval2012") into names."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def add_model_groups(parser: argparse.ArgumentParser) -> None:
    """The data, sampling, input, model, anchors and loss groups."""
    from models.archs import ARCH_SPECS  # late: models/__init__.py imports utils.options.resolve

    # * Data
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", help="dataset folder name under --data_root")
    g.add_argument("--data_root", default="datasets/", help="root holding <dataset>/annotations/<split>.json")
    g.add_argument(
        "--train_sets",
        default="train",
        help="comma-separated training splits (--dataset voc: trainval2007,trainval2012 and coco: train2017 "
        "unless given, as in the original)",
    )
    g.add_argument(
        "--val_sets",
        default="val",
        help="comma-separated validation splits (--dataset voc: test2007, coco: val2017 unless given)",
    )
    g.add_argument(
        "--classes",
        default=None,
        help="train/evaluate on a class subset: a file with one name or MID per line, or a comma list; "
        "boxes of other classes are ignored in the loss (neither positive nor negative)",
    )
    g.add_argument(
        "--skip_bad_images",
        action=BoolAction,
        help="skip missing/corrupt images with a warning (counted, reported at the end) instead of failing",
    )
    g.add_argument(
        "--check_images",
        default="headers",
        choices=CHECK_MODES,
        help="train.py, at start: read every train and val image's header (readable, complete, of the "
        "annotated size; no decode), only look for missing files (exist), or check nothing (none)",
    )
    g.add_argument(
        "--augment",
        default="ssd",
        choices=AUGMENTATIONS,
        help="training augmentation: ssd (photometric, zoom out, IoU crop, flip), flip, or none",
    )
    g.add_argument(
        "--crop_rule",
        default="any",
        choices=CROP_RULES,
        help="ssd augmentation's IoU crop: any (Caffe SSD: at least one box reaches the crop's minimum IoU, "
        "50 trials) or all (the original: every box must, 20 trials)",
    )
    g.add_argument("-j", "--num_workers", type=int, default=2, help="data loading worker processes")
    g.add_argument(
        "--pin_memory",
        default="auto",
        choices=PIN_MEMORY_MODES,
        help="DataLoaders put batches in pinned (page-locked) memory, for faster and asynchronous copies to "
        "the GPU: auto = when the device is CUDA",
    )
    g.add_argument(
        "--persistent_workers",
        action=BoolAction,
        help="keep the -j worker processes alive from epoch to epoch (and from one validation to the next) "
        "instead of starting them again; the batches are the same (needs -j > 0)",
    )
    g.add_argument(
        "--prefetch_factor",
        type=int,
        default=None,
        help="batches each worker loads ahead (default: the DataLoader's, 2; needs -j > 0)",
    )

    # * Sampling (train.py)
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--sampler",
        default="random",
        choices=("random", "class_balanced", "repeat_factor"),
        help="training image order: random (shuffled epochs), class_balanced or repeat_factor (LVIS)",
    )
    g.add_argument("--num_bins", type=int, default=1, help="class_balanced: frequency bins")
    g.add_argument("--repeat_threshold", type=float, default=0.001, help="repeat_factor: LVIS threshold t")
    g.add_argument("--aspect_ratio_group", action=BoolAction, help="batch images of similar aspect ratio")

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
        choices=tuple(ARCH_SPECS),
        help="; ".join(f"{name}: {spec.summary}" for name, spec in ARCH_SPECS.items()),
    )
    g.add_argument("--basenet", default="resnet50", choices=BASENETS, help="ResNet backbone")
    g.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet (torchvision weights from torch's cache), none (random init) or a state-dict PATH",
    )
    g.add_argument(
        "--init_from",
        default=None,
        help="start a new run from a trained detector: a checkpoint of this project or a torchvision "
        "RetinaNet / Faster R-CNN state dict (predictors of another class count are re-initialised)",
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
        action=BoolAction,
        invert=True,
        default=True,
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
    g.add_argument(
        "--anchor_type",
        default="predefined",
        choices=("predefined", "kmeans", "pdf9", "default"),
        help="predefined: RetinaNet's 32..512 px sets from --num_scales/--aspect_ratios (ratio = h/w); "
        "kmeans: --anchor_file, or for --dataset voc/coco without one the original codebase's clustered "
        "sets (anchors/original_*.json); pdf9 / default: the original's 9 / 3 per location (ratio = w/h). "
        "The original's sets use its cell centres (j + 0.5) / f * input",
    )
    g.add_argument(
        "--anchor_file",
        default=None,
        help="anchor JSON written by kmeans_for_anchors.py (kmeans; voc/coco default: the original's set)",
    )
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
    g.add_argument(
        "--positive_threshold",
        "--jaccard_threshold",
        type=float,
        default=0.5,
        help="anchors with IoU >= this with a gt box are its positives (the original's --jaccard_threshold)",
    )
    g.add_argument(
        "--best_anchor_match",
        default="ties",
        choices=("ties", "one"),
        help="each gt box also gets its best anchor as a positive: ties: every anchor tied at its best IoU; "
        "one: its first best anchor only, a later box winning a shared one (the original's SSD matching)",
    )
    g.add_argument(
        "--matcher",
        default="iou",
        choices=("iou", "atss"),
        help="iou: --positive_threshold / --negative_threshold for every box; atss: adaptive per-box "
        "thresholds (ATSS, Zhang et al. 2020: mean + std of the IoUs of the --atss_topk nearest anchors "
        "per level), which gives small boxes positives a fixed threshold denies them",
    )
    g.add_argument("--atss_topk", type=int, default=9, help="ATSS candidates per level and box")
    g.add_argument(
        "--negative_threshold",
        type=float,
        default=None,
        help="anchors with IoU in [negative, positive) are ignored (default: 0.5 for mbox, 0.4 for focal)",
    )
    g.add_argument("--neg_pos_ratio", type=int, default=3, help="OHEM negatives per positive")
    g.add_argument("--smooth_l1_beta", type=float, default=None, help="default: 1.0 for mbox, 1/9 for focal")
    g.add_argument("--focal_alpha", type=float, default=0.25, help="focal loss: weight of the positives")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss: focusing exponent")
    g.add_argument(
        "--box_variances", type=float_list, default=[0.1, 0.2], help="box coding variances (centre, size)"
    )
