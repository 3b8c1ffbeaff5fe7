"""Detection quality at equal budget: our FPN-OHEM, our focal variant and torchvision's RetinaNet.

    python bench/bench_quality.py --dataset shapes --data_root datasets --basenet resnet18 \
        --pretrained none --fpn_channels 64 --num_head_layers 2 --input_dim 256 --channels_last \
        --anchor_type kmeans --anchor_file anchors/shapes_256.json --augment flip --amp \
        --batch_size 16 --optimizer adamw --lr 0.002 --weight_decay 0.0001 --max_iter 800 \
        --step_values 605,720 --warmup_iters 50 -j 1 --device cpu      # the make demo budget
    python bench/bench_quality.py ... --models ours,torchvision                   # a subset

Every model trains on the same data, input size, augmentation, batch, iterations, optimizer and lr
schedule, with the same seed, and is scored by our evaluator (VOC AP@0.5 area, COCO AP):
- ``ours``: train.py itself (``--loss_type mbox``) with the given options (``--anchor_type``,
  ``--anchor_file``, ``--matcher``, ``--num_head_layers``, ``--ema``, ``--tta`` ... all apply), then
  engine.evaluate; with ``--ema`` or ``--tta`` also ``ours_plain``: the same checkpoint's trained weights
  without TTA, so the table shows what the training recipe gives and what EMA/TTA add.
- ``ours_focal``: the same with ``--loss_type focal`` (its thresholds and box loss beta follow).
- ``torchvision``: ``torchvision.models.detection.RetinaNet`` with a ResNet of the same depth (from
  scratch, or from the same ``--pretrained`` weights; BatchNorm2d from scratch and FrozenBatchNorm2d when
  pretrained, as ``retinanet_resnet50_fpn`` does), an FPN of ``--fpn_channels``, its own head (4 convs)
  and loss in the design of ``retinanet_resnet50_fpn_v2`` by default (``--torchvision_variant``: v2 =
  GroupNorm head, GIoU box loss, P6 from C5; v1 = the original RetinaNet's, whose unnormalised head does
  not train from scratch at 64 FPN channels), and its anchors (``--torchvision_anchors``: its 32..512 px
  set, 3 scales x 3 ratios, scaled by --input_dim / 800 by default, i.e. the sizes relative to the image
  it was designed for); its transform set to our input size with identity normalisation, so it neither
  resizes nor normalises again (our loader did both). It is fed our train loader's batches through the
  same optimizer builder, lr schedule, AMP and clipping as train.py, and its post-processing uses our
  --conf_thresh, --nms_thresh, --pre_nms_topk and --topk. No EMA or TTA on its side: compare it with
  ``ours_plain`` for the recipes alone.
Prints a table, then one JSON line: ``ours_map50``, ``ours_plain_map50``, ``ours_focal_map50``,
``torchvision_map50``, ``ratio_map50`` (ours / torchvision), ``ratio_plain_map50``, the COCO APs and
the training seconds of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from typing import Any, Dict, List

import torch
import torchvision
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluate as evaluate_script  # noqa: E402
import train  # noqa: E402
from data.dataset import build_dataset  # noqa: E402
from data.loaders import build_eval_loader, build_train_loader, iterate_batches, loader_options  # noqa: E402
from engine import autocast_context, compute_metrics, evaluate, targets_to_device  # noqa: E402
from layers.tta import FlipTTA  # noqa: E402
from metrics.coco import detections_to_coco_results  # noqa: E402
from models.backbone import load_resnet_weights  # noqa: E402
from utils.checkpoint import build_model_from_checkpoint, latest_checkpoint  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.options import amp_dtype_of, resolve_defaults, resolve_device  # noqa: E402

MODELS = ("ours", "ours_focal", "torchvision")
TORCHVISION_VARIANTS = ("v2", "v1")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "bench_quality", parents=[train.get_args_parser(add_help=False)], add_help=add_help
    )
    g = parser.add_argument_group("bench")
    g.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    g.add_argument("--bench_root", default="runs/bench_quality", help="run folders of the trained models")
    g.add_argument(
        "--torchvision_anchors",
        default="scaled",
        choices=("scaled", "default"),
        help="torchvision's anchor sizes: default = 32..512 px (3 scales, 3 ratios) as made for its 800-px "
        "inputs; scaled = the same set times --input_dim / 800, i.e. the same sizes relative to the image",
    )
    g.add_argument(
        "--torchvision_variant",
        default="v2",
        choices=TORCHVISION_VARIANTS,
        help="v2 = retinanet_resnet50_fpn_v2's design (GroupNorm head, GIoU box loss, P6 from C5); "
        "v1 = retinanet_resnet50_fpn's (no norm in the head, L1 box loss, P6 from P5). v1's "
        "4-conv head without norm, initialised N(0, 0.01), does not train from scratch at a narrow "
        "--fpn_channels (BENCHMARKS.md), so v2 is the default peer",
    )
    return parser


def torchvision_anchor_generator(input_dim: int, mode: str) -> AnchorGenerator:
    """retinanet_resnet50_fpn's anchors (P3..P7 bases 32..512, scales 2^0, 2^1/3, 2^2/3, ratios 0.5, 1, 2),
    as they are (``default``) or scaled by ``input_dim / 800`` (``scaled``): torchvision resizes images to
    800 px, so its 32-px P3 anchors meet objects 4 % of the image; at 256 px they would be 12.5 %."""
    factor = input_dim / 800.0 if mode == "scaled" else 1.0
    # torchvision's own table, int() included (retinanet._default_anchorgen), then scaled
    sizes = tuple(
        tuple(size * factor for size in (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))))
        for x in (32, 64, 128, 256, 512)
    )
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _torchvision_retinanet(args: argparse.Namespace, num_classes: int) -> RetinaNet:
    """RetinaNet with our backbone depth, FPN width, input size and post-processing settings."""
    pretrained = args.pretrained != "none"
    norm_layer = FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d
    resnet = torchvision.models.get_model(args.basenet, weights=None, norm_layer=norm_layer)
    if pretrained:
        load_resnet_weights(resnet, args.basenet, args.pretrained)
    channels = [resnet.layer2[-1].conv1.in_channels, resnet.layer3[-1].conv1.in_channels]
    channels.append(resnet.layer4[-1].conv1.in_channels)
    if args.basenet in ("resnet18", "resnet34"):  # BasicBlock: conv1 keeps the width
        channels = [128, 256, 512]
    v2 = args.torchvision_variant == "v2"
    # LastLevelP6P7 takes P6 from C5 when its in_channels differ from out_channels (v2), else from P5 (v1)
    p6_in = channels[-1] if v2 else args.fpn_channels
    if v2 and args.fpn_channels % 32:
        raise SystemExit(
            f"--torchvision_variant v2 has GroupNorm(32) heads: --fpn_channels {args.fpn_channels} "
            "is not a multiple of 32"
        )
    if v2 and p6_in == args.fpn_channels:
        raise SystemExit(
            f"--torchvision_variant v2 takes P6 from C5: --fpn_channels must differ from {p6_in}"
        )
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=channels,
        out_channels=args.fpn_channels,
        extra_blocks=LastLevelP6P7(p6_in, args.fpn_channels),
    )
    anchor_generator = torchvision_anchor_generator(args.input_dim, args.torchvision_anchors)
    head = RetinaNetHead(
        args.fpn_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=partial(torch.nn.GroupNorm, 32) if v2 else None,
    )
    if v2:
        head.regression_head._loss_type = "giou"  # as retinanet_resnet50_fpn_v2 sets it
    return RetinaNet(
        backbone,
        num_classes,
        anchor_generator=anchor_generator,
        head=head,
        min_size=args.input_dim,
        max_size=args.input_dim,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        score_thresh=args.conf_thresh,
        nms_thresh=args.nms_thresh,
        detections_per_img=args.topk,
        topk_candidates=args.pre_nms_topk,
    )


def _torchvision_targets(targets: List[Dict[str, Any]]) -> List[Dict[str, torch.Tensor]]:
    """Our targets (labels 0..K-1, -1 = other class) as torchvision's: usable boxes only."""
    out = []
    for t in targets:
        keep = t["labels"] >= 0
        for flag in ("difficult", "iscrowd"):
            if flag in t:
                keep &= ~t[flag]
        out.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep]})
    return out


def train_torchvision(args: argparse.Namespace, train_set, device: torch.device) -> torch.nn.Module:
    """train.py's loop for torchvision's RetinaNet: same loader, optimizer, schedule, AMP and clipping."""
    torch.manual_seed(args.man_seed)
    model = _torchvision_retinanet(args, len(train_set.class_names)).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = train.build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: train.lr_factor(it, args.warmup_iters, args.warmup_factor, args.step_values, args.gamma),
    )
    amp_dtype = amp_dtype_of(args, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loader = build_train_loader(
        train_set,
        args.batch_size,
        args.num_workers,
        size_divisibility=1,
        seed=args.man_seed,
        **loader_options(args, device),
    )
    model.train()
    iteration = 0
    for _epoch, (images, targets, _skipped) in iterate_batches(loader, 0):
        if iteration >= args.max_iter:
            break
        if not targets:
            continue
        images = images.to(device, non_blocking=True)
        targets = _torchvision_targets(targets_to_device(targets, device))
        with autocast_context(device, amp_dtype):
            loss_dict = model(list(images), targets)
        loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            raise SystemExit(f"torchvision RetinaNet: non-finite loss at iteration {iteration + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        iteration += 1
        if iteration % args.log_step == 0:
            print(f"torchvision iteration {iteration}: loss {loss.item():.4f}", flush=True)
    return model


@torch.no_grad()
def evaluate_torchvision(model, val_set, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Our metrics ("all": VOC + COCO) on torchvision's detections, mapped to original pixels."""
    model.eval()
    amp_dtype = amp_dtype_of(args, device.type)
    loader = build_eval_loader(
        val_set, args.eval_batch_size, args.num_workers, size_divisibility=1, **loader_options(args, device)
    )
    results = []
    for images, targets, _ in loader:
        with autocast_context(device, amp_dtype):
            outputs = model(list(images.to(device)))
        detections = []
        for out, t in zip(outputs, targets):
            sx, sy = (float(v) for v in t["scale"])
            h, w = (float(v) for v in t["orig_size"])
            boxes = out["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
            boxes = clip_boxes_to_image(boxes, (h, w))
            detections.append(
                {"boxes": boxes, "scores": out["scores"].float().cpu(), "labels": out["labels"].cpu()}
            )
        results.extend(
            detections_to_coco_results(
                detections, [int(t["image_id"]) for t in targets], val_set.category_ids
            )
        )
    return compute_metrics(val_set.coco_gt(), results, "all")


def _evaluate_ours(path: str, args: argparse.Namespace, tta: str, weights: str, device: torch.device):
    """Our metrics ("all") of the checkpoint at ``path`` with test-time augmentation ``tta`` and weights
    ``weights`` (ema / raw / auto), through evaluate.py's own checkpoint loading."""
    parser = evaluate_script.get_args_parser()
    cli = parser.parse_args(
        ["--checkpoint", path, "--data_root", args.data_root, "--tta", tta, "--eval_weights", weights]
    )
    model, postprocessor, run_args, _ = build_model_from_checkpoint(path, cli, parser, device)
    val_set = build_dataset(run_args, run_args.val_sets, train=False)
    loader = build_eval_loader(
        val_set,
        run_args.eval_batch_size,
        run_args.num_workers,
        size_divisibility=1,
        **loader_options(run_args, device),
    )
    metrics, _ = evaluate(
        FlipTTA(model) if tta == "flip" else model,
        postprocessor,
        loader,
        val_set,
        device,
        "all",
        amp_dtype=amp_dtype_of(run_args, device.type),
    )
    return metrics


def _ours(args: argparse.Namespace, loss_type: str, device: torch.device) -> Dict[str, Any]:
    """train.py with --loss_type, then our evaluation of its last checkpoint: as asked (--tta,
    --eval_weights) and, when that differs, "plain" (the trained weights, no TTA) as well, so that the
    table separates what the training recipe gives from what EMA and TTA add."""
    argv_args = argparse.Namespace(**vars(args))
    argv_args.loss_type = loss_type
    argv_args.negative_threshold = argv_args.smooth_l1_beta = None  # loss-dependent defaults
    argv_args.save_root, argv_args.run_name, argv_args.no_val = args.bench_root, loss_type, True
    argv_args.resume = None
    start = time.time()
    train.main(argv_args)
    seconds = time.time() - start
    path = latest_checkpoint(os.path.join(args.bench_root, loss_type))
    run = {"metrics": _evaluate_ours(path, args, args.tta, args.eval_weights, device), "train_s": seconds}
    if args.tta != "none" or (args.ema and args.eval_weights != "raw"):
        run["plain_metrics"] = _evaluate_ours(path, args, "none", "raw", device)
    return run


def main(args: argparse.Namespace) -> Dict[str, Any]:
    resolve_defaults(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise SystemExit(f"--models: unknown {unknown}; choose from {MODELS}")
    if args.resize_mode != "square":
        raise SystemExit("bench_quality compares at a square --input_dim (--resize_mode square)")
    device = resolve_device(args.device)
    runs: Dict[str, Dict[str, Any]] = {}
    for name in models:
        if name == "torchvision":
            train_set = build_dataset(args, args.train_sets, train=True)
            val_set = build_dataset(args, args.val_sets, train=False)
            start = time.time()
            model = train_torchvision(args, train_set, device)
            seconds = time.time() - start
            runs[name] = {"metrics": evaluate_torchvision(model, val_set, args, device), "train_s": seconds}
        else:
            runs[name] = _ours(args, "mbox" if name == "ours" else "focal", device)

    print(f"\n{'model':<14}{'VOC mAP@0.5 (area)':>20}{'VOC07 11-pt':>14}{'COCO AP':>10}{'train s':>10}")
    summary: Dict[str, Any] = {}
    for name, run in runs.items():
        rows = [(name, run["metrics"])]
        if "plain_metrics" in run:  # "ours_plain": raw weights, no TTA
            rows.append((f"{name}_plain", run["plain_metrics"]))
        for row_name, metrics in rows:
            voc, coco = metrics["voc"], metrics["coco"]
            print(
                f"{row_name:<14}{voc['map_area']:>20.4f}{voc['map_07_11pt']:>14.4f}{coco['AP']:>10.4f}"
                f"{run['train_s']:>10.0f}"
            )
            summary[f"{row_name}_map50"] = round(float(voc["map_area"]), 4)
            summary[f"{row_name}_map50_07_11pt"] = round(float(voc["map_07_11pt"]), 4)
            summary[f"{row_name}_coco_ap"] = round(float(coco["AP"]), 4)
        summary[f"{name}_train_s"] = round(run["train_s"], 1)
    if "ours" in runs and "torchvision" in runs:
        for prefix in ("ours", "ours_plain"):
            if f"{prefix}_map50" not in summary:
                continue
            suffix = prefix[len("ours") :]
            for metric in ("map50", "coco_ap"):  # null, not a huge number, when torchvision scored 0
                peer = summary[f"torchvision_{metric}"]
                ratio = round(summary[f"{prefix}_{metric}"] / peer, 3) if peer > 0 else None
                summary[f"ratio{suffix}_{metric}"] = ratio
    summary.update(
        {
            "max_iter": args.max_iter,
            "batch_size": args.batch_size,
            "input_dim": args.input_dim,
            "basenet": args.basenet,
            "pretrained": args.pretrained,
            "ema": args.ema,
            "tta": args.tta,
            "torchvision_anchors": args.torchvision_anchors,
            "torchvision_variant": args.torchvision_variant,
        }
    )
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
