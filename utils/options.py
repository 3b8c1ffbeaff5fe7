"""The one option parser every script shares, and the checks that make bad values fail at start.

Scripts build their parser as ``OptionParser(description=__doc__, parents=[get_common_parser()])`` and
add only what is theirs (OptionParser, in utils/cli.py, records which options were given, reads
``--config FILE`` and shows defaults in ``--help``). Groups: data, sampling, input, model, anchors, loss,
evaluation, schedule, logging, runtime and the original's options. Every script accepts every group,
so a training command line works unchanged with evaluate.py (which finds the run folder from it), as in
the original; demo.py and extract_features.py hide the training groups from ``--help``.

Option names follow the original codebase (``--basenet``, ``--shared_heads``, ``--anchor_type``,
``--loss_type``, ``--max_iter``, ``--step_values``, ``--val_step``, ``--man_seed``), and every option of
its four scripts parses: its other spellings are aliases (``--learning-rate``, ``--jaccard_threshold``,
``--num_nodes``), its booleans take ``=True/False/1/0`` (``BoolAction``) and ``--ngpu`` launches torchrun
(utils/launch.py). One spelling per concept: the first option string is the one ``--help`` shows.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import List

import torch

from layers.anchor_sets import shipped_anchor_file
from utils.choices import AUGMENTATIONS, CHECK_MODES, CROP_RULES, PIN_MEMORY_MODES
from utils.cli import BoolAction, OptionParser, add_config_option  # noqa: F401 (OptionParser re-exported)
from utils.compile import COMPILE_MODES

logger = logging.getLogger(__name__)

BASENETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = ("fpn_ohem", "faster_rcnn_fpn")
PROTOCOLS = ("ours", "original")
# --protocol original: the original's evaluate.py / train.py validation (modules/box_utils.nms): softmax
# scores > 0.001, per class the 200 best over all anchors, NMS at 0.45, no cap per image (its per-class
# caps, 50 for VOC and 20 for COCO, depend on the dataset: see --max_per_class and models.build_model).
# Option groups of training only: demo.py and extract_features.py accept them (a training command line
# works there unchanged) but do not list them in --help.
TRAINING_GROUPS = ("loss", "sampling", "schedule", "logging")
TRAINING_OPTIONS = ("train_sets", "augment", "crop_rule", "pretrained", "freeze_upto", "freeze_bn")
# --dataset voc / coco without --train_sets / --val_sets: the original's splits (as prep/voc.py and
# prep/coco.py name them), so that its command lines (which name no splits) run unchanged.
COMMON_SPLITS = {"train_sets": "train", "val_sets": "val"}
ORIGINAL_SPLITS = {"voc": ("trainval2007,trainval2012", "test2007"), "coco": ("train2017", "val2017")}
ORIGINAL_PROTOCOL = {"conf_thresh": 0.001, "pre_nms_topk": 200, "nms_thresh": 0.45, "topk": 0}
OURS_PROTOCOL = {"conf_thresh": 0.05, "pre_nms_topk": 1000, "nms_thresh": 0.5, "topk": 100}  # the defaults


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


class _OriginalBNAction(argparse.Action):
    """--bn N: freeze_bn = (N == 0)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values == 0)


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

    # * Evaluation / post-processing
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--protocol",
        default="ours",
        choices=PROTOCOLS,
        help="post-processing: ours (per level the --pre_nms_topk best pairs above --conf_thresh, NMS, "
        "--topk per image) or original (the original's: per class the best 200 above 0.001 over all "
        "levels, NMS 0.45 on unclipped boxes, at most 50 per class for VOC and 20 for COCO, no cap per "
        "image); options given explicitly override the protocol's values",
    )
    g.add_argument(
        "--conf_thresh",
        type=float,
        default=OURS_PROTOCOL["conf_thresh"],
        help="score threshold before NMS (strict >)",
    )
    g.add_argument(
        "--nms_thresh",
        type=float,
        default=OURS_PROTOCOL["nms_thresh"],
        help="NMS IoU threshold (an IoU above it suppresses)",
    )
    g.add_argument(
        "--pre_nms_topk",
        type=int,
        default=OURS_PROTOCOL["pre_nms_topk"],
        help="candidates before NMS: per level (--protocol ours) or per class (--protocol original)",
    )
    g.add_argument(
        "--topk",
        "--num_nodes",
        type=int,
        default=OURS_PROTOCOL["topk"],
        help="detections kept per image after NMS, best first (0: no cap)",
    )
    g.add_argument(
        "--max_per_class",
        type=int,
        default=None,
        help="detections kept per class and image after NMS (0: no cap; default: no cap, or 50 for VOC and "
        "20 for COCO datasets with --protocol original)",
    )
    g.add_argument(
        "--class_agnostic_nms", action=BoolAction, help="one NMS over all classes instead of one per class"
    )
    g.add_argument("--eval_batch_size", type=int, default=8, help="images per batch in evaluation")
    g.add_argument(
        "--iou_thresh", type=float, default=0.5, help="VOC metric: IoU threshold of a true positive"
    )
    g.add_argument(
        "--metric",
        "--val_metric",
        default="voc",
        choices=("voc", "coco", "oid", "all"),
        help="voc: VOC AP at --iou_thresh; coco: the 12 COCO numbers; oid: Open Images; all: voc + coco",
    )
    g.add_argument(
        "--tta",
        default="none",
        choices=("none", "flip"),
        help="test-time augmentation: flip adds the horizontally flipped image, merged before NMS (fpn_ohem)",
    )
    g.add_argument(
        "--eval_weights",
        default="auto",
        choices=("auto", "ema", "raw"),
        help="weights to run from a checkpoint: auto = the EMA weights when it has them (--ema)",
    )

    # * Schedule and optimisation (train.py; the other scripts accept them so that a training command
    # line can be reused as it is, e.g. by evaluate.py to find the run folder)
    g = parser.add_argument_group("schedule")
    g.add_argument("--batch_size", type=int, default=24, help="images per process and iteration")
    g.add_argument(
        "--optimizer", default="sgd", choices=("sgd", "adamw"), help="sgd (with --momentum) or adamw"
    )
    g.add_argument(
        "--lr",
        "--learning-rate",
        type=float,
        default=0.0005,
        help="base learning rate (see the lr rule in train.py's docstring)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="not applied to norm layers and biases")
    g.add_argument("--max_iter", type=int, default=50000, help="training iterations")
    g.add_argument(
        "--step_values", type=int_list, default=[30000, 40000], help="iterations where lr *= --gamma"
    )
    g.add_argument("--gamma", type=float, default=0.1, help="lr factor at each of --step_values")
    g.add_argument("--warmup_iters", type=int, default=500, help="linear warm-up from --warmup_factor * lr")
    g.add_argument(
        "--warmup_factor", type=float, default=1.0 / 3, help="lr factor at iteration 0 of the warm-up"
    )
    g.add_argument("--clip_grad", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--sync_bn", action=BoolAction, help="SyncBatchNorm under DDP (for trainable BN)")
    g.add_argument(
        "--ema", action=BoolAction, help="keep an EMA of the weights; validated and saved beside them"
    )
    g.add_argument("--ema_decay", type=float, default=0.9998, help="EMA decay (the asymptote of the ramp)")
    g.add_argument(
        "--ema_tau", type=float, default=2000.0, help="EMA decay ramp: decay * (1 - exp(-iter / tau))"
    )

    # * Runs, validation and logging
    g = parser.add_argument_group("logging")
    g.add_argument("--save_root", default="runs/", help="parent of the run folders")
    g.add_argument("--run_name", default=None, help="run folder name (default: derived from the options)")
    g.add_argument(
        "--save_step", type=int, default=5000, help="checkpoint every N iterations (and at the end)"
    )
    g.add_argument("--keep_checkpoints", type=int, default=3, help="keep the last N checkpoints (0: all)")
    g.add_argument(
        "--resume",
        default=None,
        type=resume_option,
        help="checkpoint path, 'auto' for the newest in the run folder, or (as in the original) an "
        "iteration N for the run folder's model_N checkpoint; 0: start afresh",
    )
    g.add_argument(
        "--val_step", type=int, default=5000, help="validate every N iterations (0: only at the end)"
    )
    g.add_argument("--no_val", action=BoolAction, help="skip validation entirely")
    g.add_argument("--log_step", type=int, default=20, help="log every N iterations")
    g.add_argument(
        "--tensorboard", action=BoolAction, help="also write TensorBoard event files to the run folder"
    )
    g.add_argument("--visdom", action=BoolAction, help="also plot to a visdom server at --vis_port")
    g.add_argument("--vis_port", type=int, default=8097, help="visdom server port")

    # * Runtime
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    g.add_argument("--man_seed", "--seed", type=int, default=123, help="random seed (offset by rank)")
    g.add_argument(
        "--dist_timeout",
        type=float,
        default=30.0,
        help="torchrun: minutes a process waits in a collective (e.g. for a slower rank) before failing",
    )
    g.add_argument(
        "--amp",
        action=BoolAction,
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
        action=BoolAction,
        help="NHWC weights and activations: faster convolutions with oneDNN on CPU (most of all with "
        "--amp bf16 on CPUs with AMX) and with tensor cores on GPU; results are unchanged",
    )
    g.add_argument(
        "--compile",
        action=BoolAction,
        help="torch.compile the network (backbone, FPN, heads; not the loss or post-processing) in place: "
        "checkpoints are the same with or without it (utils/compile.py). A choice of this command only, "
        "never taken from a checkpoint. The first iterations compile (about a minute on a GPU)",
    )
    g.add_argument(
        "--compile_mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode with --compile: reduce-overhead adds CUDA graphs, max-autotune also "
        "benchmarks kernels while compiling (a longer start)",
    )
    add_config_option(g)

    # * The original codebase's options that have no equivalent here (its other names are aliases above:
    # --learning-rate, --jaccard_threshold, --num_nodes, and demo.py's --model_path ...)
    g = parser.add_argument_group("the original's options (so that its command lines run unchanged)")
    g.add_argument(
        "--ngpu",
        type=int,
        default=1,
        help="train.py: run N processes with torchrun, --batch_size split over them as the original's "
        "DataParallel did (the command is printed); evaluate.py, demo.py and extract_features.py run in "
        "one process",
    )
    g.add_argument(
        "--bn",
        type=int,
        dest="freeze_bn",
        default=argparse.SUPPRESS,  # --train_bn sets the default
        metavar="N",
        action=_OriginalBNAction,
        help="the original's batch norm switch: 0 frozen, anything else trained (= --train_bn)",
    )
    g.add_argument("--log_iters", action=BoolAction, default=True, help="unused (as in the original)")
    g.add_argument("--start", type=int, default=0, help="unused (an option of the original's demo.py)")
    g.add_argument("--end", type=int, default=200, help="unused (an option of the original's demo.py)")
    return parser


def resume_option(text: str) -> str | None:
    """--resume: a path, 'auto', or the original's iteration number (0: start afresh, as there)."""
    return None if text.strip() in ("0", "") else text


def resume_checkpoint_path(resume: str | None, run_dir: str) -> str | None:
    """The checkpoint --resume names: None, the run folder's newest ('auto') or its model_N (an iteration)."""
    from utils.checkpoint import CHECKPOINT_PATTERN, latest_checkpoint  # utils.checkpoint imports torch only

    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume is not None and resume.isdigit():
        return os.path.join(run_dir, CHECKPOINT_PATTERN.format(int(resume)))
    return resume


def run_name(args: argparse.Namespace, world_size: int = 1) -> str:
    """Run folder name from the options: as in the original (backbone, anchors, loss, input, batch, lr),
    then the RUN_NAME_EXTRAS options that differ from their defaults.

    The batch in the name is the total over ``world_size`` processes.
    """
    if args.arch == "faster_rcnn_fpn":
        anchors = "rpn"
    elif args.anchor_type == "kmeans":
        anchor_file = args.anchor_file or f"original_{args.dataset}.json"  # no file: the shipped set
        anchors = f"kmeans-{os.path.splitext(os.path.basename(anchor_file))[0]}"
    elif args.anchor_type in ("pdf9", "default"):
        anchors = args.anchor_type
    else:
        anchors = f"pre{args.num_scales}x{len(args.aspect_ratios)}"
    size = f"sq{args.input_dim}" if args.resize_mode == "square" else f"ka{args.min_size}-{args.max_size}"
    heads = ""
    if args.arch == "fpn_ohem":
        heads = f"sh{args.shared_heads}" + ("gn" if args.head_norm == "gn" else "")
        shared = getattr(args, "num_shared_layers", None)  # None: not resolved yet, implied by --shared_heads
        if shared is not None and shared != (args.num_head_layers - 1 if args.shared_heads > 0 else 0):
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
    parts = []
    for key, tag, default in RUN_NAME_EXTRAS:
        value = getattr(args, key, default)
        if value != default:
            parts.append(f"{tag}{value}")
    pretrained = getattr(args, "pretrained", "imagenet")
    if pretrained != "imagenet":
        parts.append(
            "pt" + (pretrained if pretrained == "none" else os.path.splitext(os.path.basename(pretrained))[0])
        )
    return parts


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
    """Fill the defaults that depend on other options (loss-dependent thresholds, --protocol's values).

    ``--protocol original`` sets ORIGINAL_PROTOCOL's values for the options not given explicitly. When
    the protocol is original or given explicitly, its options count as given (``explicit_options``), so
    that they win over a checkpoint's values when evaluating it.
    """
    typed = getattr(args, "explicit_options", None)
    splits = ORIGINAL_SPLITS.get(str(getattr(args, "dataset", "")).lower())
    if splits is not None:  # the original's splits for --dataset voc / coco, unless given
        for key, value in zip(("train_sets", "val_sets"), splits):
            untyped = typed is None or key not in typed
            if untyped and getattr(args, key, None) == COMMON_SPLITS[key]:
                setattr(args, key, value)
    protocol = getattr(args, "protocol", "ours")
    if protocol == "original":
        for key, value in ORIGINAL_PROTOCOL.items():
            # Not given, and the common default (extract_features.py keeps its own --topk 10).
            if (typed is None or key not in typed) and getattr(args, key) == OURS_PROTOCOL[key]:
                setattr(args, key, value)
    if typed is not None and (protocol == "original" or "protocol" in typed):
        args.explicit_options = sorted(set(typed) | set(ORIGINAL_PROTOCOL) | {"protocol", "max_per_class"})
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


def check_range_options(args: argparse.Namespace) -> List[str]:
    """Range checks of the float and integer options not covered elsewhere (the value must make sense
    before the run starts, not crash or train on NaN later). Options a script lacks are not checked."""
    errors: List[str] = []

    def has(*keys: str) -> bool:
        return all(isinstance(getattr(args, k, None), (int, float)) for k in keys)

    if has("negative_threshold") and not args.negative_threshold >= 0:
        errors.append(
            f"--negative_threshold must be in [0, --positive_threshold], got {args.negative_threshold}"
        )
    if has("smooth_l1_beta") and not args.smooth_l1_beta >= 0:
        errors.append(f"--smooth_l1_beta must be >= 0 (0: L1), got {args.smooth_l1_beta}")
    if has("focal_alpha") and not 0 <= args.focal_alpha <= 1:
        errors.append(f"--focal_alpha must be in [0, 1], got {args.focal_alpha}")
    if has("focal_gamma") and not args.focal_gamma >= 0:
        errors.append(f"--focal_gamma must be >= 0, got {args.focal_gamma}")
    if has("neg_pos_ratio") and args.neg_pos_ratio < 1:
        errors.append(f"--neg_pos_ratio must be >= 1, got {args.neg_pos_ratio}")
    if has("fpn_channels") and args.fpn_channels < 1:
        errors.append(f"--fpn_channels must be >= 1, got {args.fpn_channels}")
    if has("momentum") and not 0 <= args.momentum < 1:
        errors.append(f"--momentum must be in [0, 1), got {args.momentum}")
    if has("weight_decay") and not args.weight_decay >= 0:
        errors.append(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if has("gamma") and not 0 < args.gamma <= 1:
        errors.append(f"--gamma (lr factor at each --step_values) must be in (0, 1], got {args.gamma}")
    if has("warmup_factor") and not 0 <= args.warmup_factor <= 1:
        errors.append(f"--warmup_factor must be in [0, 1], got {args.warmup_factor}")
    if has("clip_grad") and not args.clip_grad >= 0:
        errors.append(f"--clip_grad must be >= 0 (0: off), got {args.clip_grad}")
    if has("keep_checkpoints") and args.keep_checkpoints < 0:
        errors.append(f"--keep_checkpoints must be >= 0 (0: all), got {args.keep_checkpoints}")
    if has("dist_timeout") and not args.dist_timeout > 0:
        errors.append(f"--dist_timeout must be > 0 minutes, got {args.dist_timeout}")
    if has("vis_port") and not 0 < args.vis_port < 65536:
        errors.append(f"--vis_port must be in 1..65535, got {args.vis_port}")
    if has("man_seed") and args.man_seed < 0:
        errors.append(f"--man_seed must be >= 0, got {args.man_seed}")
    return errors


def check_common_args(args: argparse.Namespace) -> None:
    """Fail at start, with the option's name, rather than an hour into a run."""
    non_finite = non_finite_options(args)
    errors: List[str] = check_range_options(args)
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
    if args.pretrained not in ("imagenet", "none") and not os.path.isfile(args.pretrained):
        errors.append(f"--pretrained {args.pretrained!r} is neither 'imagenet', 'none' nor an existing file")
    if getattr(args, "init_from", None) and not os.path.isfile(args.init_from):
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
    if getattr(args, "atss_topk", 9) < 1:
        errors.append(f"--atss_topk must be >= 1, got {args.atss_topk}")
    if args.negative_threshold is not None and args.negative_threshold > args.positive_threshold:
        errors.append(
            f"--negative_threshold ({args.negative_threshold}) must not exceed "
            f"--positive_threshold ({args.positive_threshold})"
        )
    if not 0 < args.nms_thresh <= 1:
        errors.append(f"--nms_thresh must be in (0, 1], got {args.nms_thresh}")
    if not 0 <= args.conf_thresh < 1:
        errors.append(f"--conf_thresh must be in [0, 1), got {args.conf_thresh}")
    if args.pre_nms_topk < 1 or args.eval_batch_size < 1:
        errors.append(
            f"--pre_nms_topk and --eval_batch_size must be >= 1, got {args.pre_nms_topk} and "
            f"{args.eval_batch_size}"
        )
    if args.topk < 0 or (getattr(args, "max_per_class", None) or 0) < 0:
        errors.append(
            f"--topk and --max_per_class must be >= 0 (0: no cap), got {args.topk} and {args.max_per_class}"
        )
    if getattr(args, "protocol", "ours") == "original" and args.arch != "fpn_ohem":
        errors.append(
            "--protocol original is the single-stage original's post-processing: --arch fpn_ohem only"
        )
    if args.arch == "faster_rcnn_fpn" and args.topk == 0:
        errors.append("--arch faster_rcnn_fpn needs --topk >= 1")
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
    if args.arch == "faster_rcnn_fpn" and args.loss_type == "focal":
        errors.append("--loss_type focal applies to --arch fpn_ohem only")
    if args.head_norm == "gn":
        if args.arch != "fpn_ohem":
            errors.append("--head_norm gn applies to --arch fpn_ohem only")
        if args.fpn_channels % 32:
            errors.append(f"--head_norm gn needs --fpn_channels divisible by 32, got {args.fpn_channels}")
    if not 0 <= args.ema_decay < 1 or not args.ema_tau >= 0:
        errors.append(
            f"--ema_decay must be in [0, 1) and --ema_tau >= 0, got {args.ema_decay}, {args.ema_tau}"
        )
    if getattr(args, "compile_mode", "default") != "default" and not getattr(args, "compile", False):
        errors.append(f"--compile_mode {args.compile_mode} needs --compile")
    if args.tta != "none" and args.arch != "fpn_ohem":
        errors.append(f"--tta {args.tta} applies to --arch fpn_ohem only")
    # A NaN fails every range check too: report it once, as not finite.
    named = tuple(e.split(" ", 1)[0] + " " for e in non_finite)
    errors = non_finite + [e for e in errors if not e.startswith(named)]
    if errors:
        raise SystemExit("Bad options:\n  " + "\n  ".join(errors))
    if getattr(args, "ngpu", 1) > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        logger.warning("--ngpu %d ignored: only train.py starts several processes", args.ngpu)


def split_names(text: str | None) -> List[str]:
    """Split a comma-separated option ("trainval2007,trainval2012") into names."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]
