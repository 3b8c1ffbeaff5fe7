"""The option groups of running: evaluation, schedule, logging, runtime and the original's leftovers.

Part of the common parser (utils/options/parser.py). The schedule and logging groups are train.py's;
the other scripts accept them so that a training command line can be reused as it is.
"""

from __future__ import annotations

import argparse

from utils.cli import BoolAction, add_config_option
from utils.compile import COMPILE_MODES
from utils.options.groups_model import int_list

PROTOCOLS = ("ours", "original")
# --protocol original: the original's evaluate.py / train.py validation (modules/box_utils.nms): softmax
# scores > 0.001, per class the 200 best over all anchors, NMS at 0.45, no cap per image (its per-class
# caps, 50 for VOC and 20 for COCO, depend on the dataset: see --max_per_class and
# utils.options.resolve.max_per_class_of).
ORIGINAL_PROTOCOL = {"conf_thresh": 0.001, "pre_nms_topk": 200, "nms_thresh": 0.45, "topk": 0}
OURS_PROTOCOL = {"conf_thresh": 0.05, "pre_nms_topk": 1000, "nms_thresh": 0.5, "topk": 100}  # the defaults


def resume_option(text: str) -> str | None:
    """--resume: a path, 'auto', or the original's iteration number (0: start afresh, as there)."""
    return None if text.strip() in ("0", "") else text


class _OriginalBNAction(argparse.Action):
    """--bn N: freeze_bn = (N == 0)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values == 0)


def add_run_groups(parser: argparse.ArgumentParser) -> None:
    """The evaluation, schedule, logging, runtime and original's-options groups."""
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
