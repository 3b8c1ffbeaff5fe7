"""Evaluate a trained detector, or a results file made elsewhere.

    python evaluate.py --checkpoint runs/RUN/model_050000.pth --dataset voc --val_sets test2007 --metric voc
    python evaluate.py --run_dir runs/RUN --eval_iters 30000,50000 --metric all  # needs --keep_checkpoints 0
    python evaluate.py <train.py's options> --eval_iters 30000,50000  # the run folder train.py derived
    python evaluate.py --detections results.json --dataset coco --val_sets val2017 --metric coco
    python evaluate.py --checkpoint CKPT --dataset openimages --val_sets validation --metric oid \
        --submission submission.csv
    python evaluate.py --detections submission.csv --dataset openimages --val_sets validation --metric oid

Metrics: ``voc`` prints per-class AP at --iou_thresh, both VOC07 11-point and area under the curve;
``coco`` the 12 pycocotools numbers; ``oid`` the Open Images challenge metric (needs the class
hierarchy: ``<data_root>/<dataset>/hierarchy.json`` or --hierarchy); ``all`` is voc + coco.
Detections are written as a COCO results JSON with the original category ids.

Several processes (``torchrun --nproc_per_node N evaluate.py ...``): each runs the model on its block
of the images and rank 0 gathers the detections, scores them and writes the outputs; the metrics are
those of one process.
With --skip_bad_images, unreadable images are left out of the ground truth as well, and the output and
the metrics file say "N images skipped; metrics over M images".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, List

import torch

from data.dataset import build_dataset, check_same_classes
from data.loaders import build_eval_loader, loader_options
from engine import compute_metrics, evaluate, metric_summary
from layers.tta import FlipTTA
from metrics.coco import write_coco_results
from utils import distributed as dist_utils
from utils.checkpoint import build_model_from_checkpoint, checkpoint_iteration, list_checkpoints
from utils.compile import compile_network
from utils.errors import UserError, run_cli
from utils.logger import setup_logging
from utils.options import (
    OptionParser,
    amp_dtype_of,
    check_common_args,
    get_common_parser,
    int_list,
    resolve_defaults,
    resolve_device,
    run_folder,
)

logger = logging.getLogger("evaluate")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = OptionParser(description=__doc__, add_help=add_help, parents=[get_common_parser()])
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", "--model_path", default=None, help="a checkpoint written by train.py")
    g.add_argument(
        "--run_dir", default=None, help="a run folder; with --eval_iters, several of its checkpoints"
    )
    g.add_argument(
        "--eval_iters",
        type=int_list,
        default=[],
        help="iterations to evaluate, e.g. 10000,20000, of --run_dir or, without it, of the run folder "
        "train.py derives from the same options (default: the newest checkpoint)",
    )
    g.add_argument(
        "--detections",
        default=None,
        help="score an existing COCO results JSON or Open Images submission CSV (.csv), no model needed",
    )
    g = parser.add_argument_group("metrics and outputs (--metric, --iou_thresh: see evaluation)")
    g.add_argument("--hierarchy", default=None, help="Open Images class hierarchy JSON (for --metric oid)")
    g.add_argument(
        "--group_of_weight",
        type=float,
        default=1.0,
        help="--metric oid: each group-of box counts as w objects and its one true positive is worth w, "
        "as the TF OD API's OpenImagesChallengeEvaluator (1: the challenge metric; 0: ignore regions)",
    )
    g.add_argument(
        "--coco_backend",
        default="pycocotools",
        choices=("pycocotools", "faster"),
        help="COCO metric implementation: pycocotools (the reference) or faster-coco-eval (the same 12 "
        "numbers, several times faster)",
    )
    g.add_argument(
        "--plot",
        action="store_true",
        help="also draw precision/recall curves per class: pr_<checkpoint>_<dataset>_<splits>.png",
    )
    g.add_argument(
        "--save_path",
        "--out",
        "--output",
        default=None,
        help="folder for results JSON and metrics (default: next to the checkpoint)",
    )
    g.add_argument(
        "--submission", default=None, help="also write an Open Images challenge submission CSV here"
    )
    return parser


def checkpoints_to_evaluate(args: argparse.Namespace) -> List[str]:
    """--checkpoint; else --eval_iters (default: the newest) of --run_dir or of the run folder that
    train.py derives from the same options, as the original's evaluation did."""
    if args.checkpoint:
        return [args.checkpoint]
    run_dir = args.run_dir
    if not run_dir:
        run_dir = run_folder(args)
        if not os.path.isdir(run_dir):
            raise SystemExit(
                f"no --checkpoint or --run_dir given, and the run folder derived from the options, "
                f"{run_dir!r}, does not exist (for a torchrun run, --batch_size is the total batch here): "
                "give --checkpoint, --run_dir (with optional --eval_iters) or --detections"
            )
        logger.info("evaluating the run folder derived from the options: %s", run_dir)
    available = list_checkpoints(run_dir)
    if not args.eval_iters:
        if not available:
            raise SystemExit(f"no checkpoints in the run folder {run_dir!r}")
        return [available[-1]]
    by_iter = {checkpoint_iteration(p): p for p in available}
    missing = [i for i in args.eval_iters if i not in by_iter]
    if missing:
        raise SystemExit(
            f"--eval_iters {missing} have no checkpoint in {run_dir!r} (available: {sorted(by_iter)})"
        )
    return [by_iter[i] for i in args.eval_iters]


def load_hierarchy(args: argparse.Namespace) -> Any:
    path = args.hierarchy or os.path.join(args.data_root, args.dataset, "hierarchy.json")
    if not os.path.isfile(path):
        raise SystemExit(
            f"--metric oid needs the class hierarchy: {path!r} does not exist (pass --hierarchy)"
        )
    with open(path) as f:
        return json.load(f)


def report(metrics: Dict[str, Any], tag: str) -> Dict[str, float]:
    """Print every metric table; return the headline numbers (engine.metric_summary)."""
    images = metrics.get("images")
    if images is not None and images["skipped"]:
        print(
            f"\n[{tag}] {images['skipped']} images skipped; metrics over {images['evaluated']} images "
            f"(unreadable: {', '.join(images['skipped_files'][:5])})"
        )
    if "voc" in metrics:
        print(f"\n[{tag}] PASCAL VOC AP@{metrics['voc'].get('iou_thresh', 0.5)}\n{metrics['voc']['table']}")
    if "coco" in metrics:
        print(f"\n[{tag}] COCO bbox\n{metrics['coco']['summary']}")
    if "oid" in metrics:
        print(f"\n[{tag}] Open Images challenge metric\n{metrics['oid']['table']}")
    return metric_summary(metrics)


def inference_amp(run_args: argparse.Namespace, device: Any) -> Any:
    """Autocast dtype for inference: the checkpoint's --amp (or the command line's), except fp16 off CUDA,
    which falls back to fp32 with a log line."""
    if run_args.amp and run_args.amp_dtype == "fp16" and device.type != "cuda":
        logger.info(
            "the checkpoint trained with --amp fp16, which needs CUDA: inference in fp32 on %s", device
        )
        return None
    amp_dtype = amp_dtype_of(run_args, device.type)
    if amp_dtype is not None:
        logger.info("inference under autocast %s (--amp of the checkpoint or the command line)", amp_dtype)
    return amp_dtype


def save_metrics(
    args: argparse.Namespace,
    metrics: Dict[str, Any],
    headline: Dict[str, Any],
    save_dir: str,
    stem: str,
    tag: str,
) -> None:
    """metrics_<stem>.json with everything computed (metrics.metrics_file); pr_<stem>.png with --plot."""
    from metrics.metrics_file import write_metrics_file

    inference = metrics.pop("inference", None)
    extra = {"inference": inference} if inference else {}
    path = os.path.join(save_dir, f"metrics_{stem}.json")
    write_metrics_file(path, headline, metrics, **extra)
    logger.info("wrote %s", path)
    if args.plot:
        from utils.plots import plot_pr_curves

        png = plot_pr_curves(metrics, os.path.join(save_dir, f"pr_{stem}.png"), title=tag)
        logger.info("wrote %s", png)


def main(args: argparse.Namespace) -> Dict[str, Any]:
    setup_logging(int(os.environ.get("RANK", 0)))
    resolve_defaults(args)
    check_common_args(args)
    if not 0 < args.iou_thresh <= 1:
        raise SystemExit(f"--iou_thresh must be in (0, 1], got {args.iou_thresh}")
    if not 0 <= args.group_of_weight <= 1:
        raise SystemExit(f"--group_of_weight must be in [0, 1], got {args.group_of_weight}")
    if args.plot and args.detections and not args.save_path:
        raise SystemExit("--plot with --detections needs --save_path (the folder for the PNG)")
    if args.checkpoint and (args.run_dir or args.eval_iters):
        raise SystemExit("give --checkpoint (one checkpoint) or --run_dir with --eval_iters, not both")
    device = resolve_device(args.device)
    dist_info = dist_utils.init_distributed(device, args.dist_timeout)
    if device.type == "cuda" and dist_info["world_size"] > 1:
        device = torch.device("cuda", dist_info["local_rank"])
    try:
        return evaluate_all(args, device)
    finally:
        dist_utils.cleanup()


def evaluate_all(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """main's work once options and processes are set up; only rank 0 prints, writes and returns."""
    is_main = dist_utils.is_main_process()
    amp_dtype_of(args, device.type)  # fails early on --amp fp16 without CUDA
    metric_options = {"coco_backend": args.coco_backend, "group_of_weight": args.group_of_weight}
    hierarchy = load_hierarchy(args) if args.metric == "oid" else None

    if args.detections:
        if not is_main:  # no model to run: rank 0 scores the file alone
            return {}
        dataset = build_dataset(args, args.val_sets, train=False)
        if args.detections.endswith(".csv"):  # an Open Images submission (normalised boxes, MIDs)
            from metrics.oid.submission import oid_submission_to_coco_results, read_oid_submission

            results = oid_submission_to_coco_results(read_oid_submission(args.detections), dataset.coco_gt())
        else:
            try:
                with open(args.detections, encoding="utf-8") as f:
                    results = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"--detections {args.detections}: not a valid JSON file: {e}") from e
            if not isinstance(results, list):
                raise UserError(
                    f"--detections {args.detections}: expected a COCO results list "
                    f"([{{image_id, category_id, bbox, score}}, ...]), got a JSON {type(results).__name__}"
                )
        full_gt = dataset.coco_gt(all_classes=True) if args.metric == "oid" else None
        metrics = compute_metrics(
            dataset.coco_gt(), results, args.metric, args.iou_thresh, hierarchy, full_gt, **metric_options
        )
        headline = report(metrics, os.path.basename(args.detections))
        if args.save_path:  # the metrics file (and --plot) of a results file made elsewhere
            stem = os.path.splitext(os.path.basename(args.detections))[0]
            save_metrics(args, metrics, headline, args.save_path, stem, os.path.basename(args.detections))
        return {"detections": headline, "metrics": metrics}

    paths = checkpoints_to_evaluate(args)
    parser = get_args_parser()
    summary: Dict[str, Any] = {}
    for path in paths:
        model, postprocessor, run_args, _ = build_model_from_checkpoint(path, args, parser, device)
        if args.compile:  # this command's --compile, not the checkpoint's
            compile_network(model, args.compile_mode)
        dataset = build_dataset(run_args, run_args.val_sets, train=False)
        if run_args.class_names is not None and run_args.category_ids is not None:
            try:
                check_same_classes(dataset, run_args.class_names, run_args.category_ids, f"checkpoint {path}")
            except ValueError as e:
                raise SystemExit(str(e)) from None
        if hierarchy is not None:
            dataset.hierarchy = hierarchy
        loader = build_eval_loader(
            dataset,
            run_args.eval_batch_size,
            run_args.num_workers,
            size_divisibility=32 if run_args.resize_mode == "keep_aspect" else 1,
            indices=dist_utils.shard_range(len(dataset)) if dist_utils.is_distributed() else None,
            **loader_options(run_args, device),
        )
        metrics, results = evaluate(
            FlipTTA(model) if run_args.tta == "flip" else model,
            postprocessor,
            loader,
            dataset,
            device,
            args.metric,
            args.iou_thresh,
            amp_dtype=inference_amp(run_args, device),
            progress=is_main,
            sharded=True,
            metric_options=metric_options,
        )
        if not is_main:
            continue
        tag = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"
        headline = report(metrics, tag)
        save_dir = args.save_path or os.path.dirname(os.path.abspath(path))
        splits = run_args.val_sets.replace(",", "+")
        stem = f"{os.path.splitext(os.path.basename(path))[0]}_{run_args.dataset}_{splits}"
        write_coco_results(results, os.path.join(save_dir, f"detections_{stem}.json"))
        save_metrics(args, metrics, headline, save_dir, stem, tag)
        if args.submission:
            from metrics.oid.submission import write_oid_submission

            write_oid_submission(results, dataset.coco_gt(), args.submission)
            logger.info("wrote the Open Images submission %s", args.submission)
        summary[path] = headline
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
