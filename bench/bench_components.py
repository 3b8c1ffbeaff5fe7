"""Time our matching + loss, post-processing and training step against torchvision's RetinaNet pieces.

    python bench/bench_components.py --threads 2 --repeats 5                 # CPU (2 cores), ~3 minutes
    python bench/bench_components.py --device cuda --repeats 20 --full_step_batch_size 8
    python bench/bench_components.py --threads 2 --skip_components --amp --channels_last   # CPU with AMX

Both sides get the same seeded tensors: a batch of ``--batch_size`` (8) images at 600x600, 81 score
columns, 2 to 20 ground-truth boxes per image, the 67,995 anchors of P3..P7 (9 per location).
- loss: our OHEM MultiBoxLoss (80 classes + background = 81 columns) and our FocalLoss (81 classes) vs
  ``RetinaNet.compute_loss`` (its Matcher on box_iou per image, then the head's focal + L1 losses). The
  forward pass only, on logits that require grad (so both sides record their autograd graph); then
  forward + backward (``*_fwd_bwd``, the figures to compare: our FocalLoss computes its gradient during
  the forward pass, so its forward row includes most of its backward).
- postprocess: ours (sigmoid, and softmax, the OHEM models' scores, which also need each anchor's
  normaliser over all 81 columns) vs ``RetinaNet.postprocess_detections`` on the outputs split per
  level, both with score 0.05, 1000 candidates per level, NMS 0.5, 100 detections.
  Logits are N(-6, 1.5^2), so about 2 % of the (anchor, class) pairs pass 0.05: the trained-model
  regime, rather than random logits where every pair passes.
- full_step: zero_grad + forward + loss + backward of our ResNet-50 FPN detector (from scratch: nothing
  frozen, batch norm trained) vs ``retinanet_resnet50_fpn(weights=None, weights_backbone=None,
  num_classes=81, min_size=600, max_size=600)`` (the same: trainable_backbone_layers 5, BatchNorm2d),
  fed the same 600x600 batch (a list of images for torchvision, whose transform normalises and batches
  them; ours gets the batch tensor, normalised by the data loader in training). The default batch is 2,
  since batch 8 takes tens of seconds per step on 2 CPU cores. ``--amp`` (bf16 autocast) and
  ``--channels_last`` apply to both sides alike; with either, ours is also timed in plain fp32 NCHW
  (``full_step_ours_mbox_ohem_fp32``), so the speed-up they give is measured in the same run.
Each figure is the median of ``--repeats`` runs after one warm-up. The last line printed is one JSON
object with every median (seconds) and the ratio ours / torchvision of each comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torchvision
from torchvision.models.detection import retinanet_resnet50_fpn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from component_inputs import make_targets  # noqa: E402
from loss_memory import peak_memory  # noqa: E402

from layers.anchors import AnchorGenerator, predefined_anchor_whs  # noqa: E402
from layers.box_coder import BoxCoder  # noqa: E402
from layers.losses import FocalLoss, MultiBoxLoss  # noqa: E402
from layers.postprocess import PostProcess  # noqa: E402
from models import build_model  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.options import get_common_parser, resolve_defaults  # noqa: E402


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_components", add_help=add_help)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per figure (>= 5), after 1 warm-up"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images for the loss and post-processing")
    parser.add_argument("--input_dim", type=int, default=600)
    parser.add_argument("--num_classes", type=int, default=81, help="score columns")
    parser.add_argument("--full_step_batch_size", type=int, default=2)
    parser.add_argument("--full_step_repeats", type=int, default=5)
    parser.add_argument("--skip_full_step", action="store_true")
    parser.add_argument("--skip_components", action="store_true", help="time the full step only")
    parser.add_argument("--amp", action="store_true", help="full step under bf16 autocast, both sides")
    parser.add_argument("--channels_last", action="store_true", help="full step in NHWC, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also the peak memory of the loss forward + backward, ours vs torchvision (loss_memory.py)",
    )
    parser.add_argument("--skip_backward", action="store_true", help="time the losses' forward only")
    return parser


def timed(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median wall time of each function over ``repeats`` runs after one warm-up each.

    The functions are run in turn within each repeat (not all runs of one, then the next), so that a
    change in machine load hits every side alike.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_loss_and_postprocess(args, device, tv_model) -> Dict[str, float]:
    generator = torch.Generator().manual_seed(args.seed)
    anchor_generator = AnchorGenerator(predefined_anchor_whs())
    grid_sizes = anchor_generator.grid_sizes_for_input(args.input_dim, args.input_dim)
    anchors = anchor_generator(grid_sizes, device)
    num_anchors_per_level = anchor_generator.num_anchors_per_level(grid_sizes)
    num_anchors, n, c = anchors.shape[0], args.batch_size, args.num_classes
    print(f"{n} images at {args.input_dim}x{args.input_dim}, {num_anchors} anchors, {c} score columns")

    logits = (torch.randn(n, num_anchors, c, generator=generator) * 1.5 - 6.0).to(device)
    deltas = (torch.randn(n, num_anchors, 4, generator=generator) * 0.5).to(device)
    # Labels 0..c-2: valid for the multibox loss (c - 1 classes + background) and for the focal losses.
    targets = make_targets(n, args.input_dim, c - 1, generator, device)
    print("gt boxes per image:", [len(t["boxes"]) for t in targets])
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    logits_grad = logits.clone().requires_grad_(True)
    deltas_grad = deltas.clone().requires_grad_(True)
    outputs = {
        "pred_logits": logits_grad,
        "pred_box_deltas": deltas_grad,
        "anchors": anchors,
        "num_anchors_per_level": num_anchors_per_level,
        "grid_sizes": grid_sizes,
    }
    tv_head_outputs = {"cls_logits": logits_grad, "bbox_regression": deltas_grad}
    tv_anchors = [anchors] * n

    box_coder = BoxCoder((0.1, 0.2))
    mbox = MultiBoxLoss(box_coder, positive_threshold=0.5, negative_threshold=0.5, neg_pos_ratio=3)
    focal = FocalLoss(box_coder, positive_threshold=0.5, negative_threshold=0.4)
    loss_fns = {
        "loss_ours_mbox_ohem": lambda: mbox(outputs, targets),
        "loss_ours_focal": lambda: focal(outputs, targets),
        "loss_torchvision": lambda: tv_model.compute_loss(tv_targets, tv_head_outputs, tv_anchors),
    }
    results = timed(loss_fns, args.repeats, device)
    if not args.skip_backward:

        def forward_backward(fn):
            def run():
                logits_grad.grad = deltas_grad.grad = None
                sum(fn().values()).backward()

            return run

        results.update(
            timed(
                {f"{name}_fwd_bwd": forward_backward(fn) for name, fn in loss_fns.items()},
                args.repeats,
                device,
            )
        )

    post_sigmoid = PostProcess(
        box_coder, "sigmoid", conf_thresh=0.05, pre_nms_topk=1000, nms_thresh=0.5, max_detections=100
    )
    post_softmax = PostProcess(
        box_coder, "softmax", conf_thresh=0.05, pre_nms_topk=1000, nms_thresh=0.5, max_detections=100
    )
    eval_outputs = {**outputs, "pred_logits": logits, "pred_box_deltas": deltas}
    tv_split = {
        "cls_logits": list(logits.split(num_anchors_per_level, dim=1)),
        "bbox_regression": list(deltas.split(num_anchors_per_level, dim=1)),
    }
    tv_split_anchors = [list(anchors.split(num_anchors_per_level))] * n
    image_shapes = [(args.input_dim, args.input_dim)] * n

    def tv_post():
        with torch.no_grad():
            return tv_model.postprocess_detections(tv_split, tv_split_anchors, image_shapes)

    results.update(
        timed(
            {
                "postprocess_ours_sigmoid": lambda: post_sigmoid(eval_outputs, targets),
                "postprocess_ours_softmax": lambda: post_softmax(eval_outputs, targets),
                "postprocess_torchvision": tv_post,
            },
            args.repeats,
            device,
        )
    )
    num_dets = [len(d["boxes"]) for d in post_sigmoid(eval_outputs, targets)]
    num_dets_tv = [len(d["boxes"]) for d in tv_post()]
    print("detections per image, ours (sigmoid):", num_dets, "torchvision:", num_dets_tv)
    return results


def bench_full_step(args, device, tv_model) -> Dict[str, float]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    n, dim = args.full_step_batch_size, args.input_dim
    images = torch.randn(n, 3, dim, dim, generator=generator).to(device)
    targets = make_targets(n, dim, args.num_classes - 1, generator, device)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    tv_images = list(images.unbind(0))

    fast_mode = args.amp or args.channels_last
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def ours(loss_type: str, fast: bool = True):
        # train.py's own parser and resolution: RetinaNet's ResNet-50 FPN 256 with 4-conv heads, 9 anchors
        argv = ["--arch", "fpn_ohem", "--basenet", "resnet50", "--pretrained", "none", "--freeze_upto", "0"]
        argv += ["--fpn_channels", "256", "--p6_from", "c5", "--num_head_layers", "4", "--shared_heads", "0"]
        argv += ["--anchor_type", "predefined", "--num_scales", "3", "--aspect_ratios", "0.5,1,2"]
        argv += ["--loss_type", loss_type, "--conf_thresh", "0.05", "--nms_thresh", "0.5"]
        argv += ["--pre_nms_topk", "1000", "--topk", "100"]
        model_args = resolve_defaults(get_common_parser().parse_args(argv))
        model_args.num_classes = args.num_classes - 1 if loss_type == "mbox" else args.num_classes
        torch.manual_seed(args.seed)
        model, criterion, _ = build_model(model_args)
        model.to(device).train()
        if fast:
            model.to(memory_format=memory_format)

        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and fast):
                losses = criterion(model(images), targets)
            sum(losses.values()).backward()

        return step

    def torchvision_step():
        tv_model.zero_grad(set_to_none=True)
        with autocast:
            losses = tv_model(tv_images, tv_targets)
        sum(losses.values()).backward()

    tv_model.train()
    tv_model.to(memory_format=memory_format)
    steps = {
        "full_step_ours_mbox_ohem": ours("mbox"),
        "full_step_ours_focal": ours("focal"),
        "full_step_torchvision": torchvision_step,
    }
    if fast_mode:
        steps["full_step_ours_mbox_ohem_fp32"] = ours("mbox", fast=False)
    return timed(steps, args.full_step_repeats, device)


def main(args: argparse.Namespace) -> Dict[str, float]:
    if args.repeats < 5 or args.full_step_repeats < 5:
        raise SystemExit("--repeats and --full_step_repeats must be >= 5 (the figures are medians)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} torch {torch.__version__} "
        f"torchvision {torchvision.__version__} device {device} threads {torch.get_num_threads()}"
    )
    torch.manual_seed(args.seed)
    tv_model = retinanet_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=args.num_classes,
        min_size=args.input_dim,
        max_size=args.input_dim,
        detections_per_img=100,
    )
    tv_model.to(device).eval()

    results = {} if args.skip_components else bench_loss_and_postprocess(args, device, tv_model)
    if not args.skip_full_step:
        results.update(bench_full_step(args, device, tv_model))

    report = {k: round(v, 5) for k, v in results.items()}
    if args.memory:
        report.update(peak_memory(args, device))
    for ours, theirs in [
        ("loss_ours_mbox_ohem", "loss_torchvision"),
        ("loss_ours_focal", "loss_torchvision"),
        ("loss_ours_mbox_ohem_fwd_bwd", "loss_torchvision_fwd_bwd"),
        ("loss_ours_focal_fwd_bwd", "loss_torchvision_fwd_bwd"),
        ("peak_mb_loss_ours_mbox_ohem", "peak_mb_loss_torchvision"),
        ("peak_mb_loss_ours_focal", "peak_mb_loss_torchvision"),
        ("postprocess_ours_sigmoid", "postprocess_torchvision"),
        ("postprocess_ours_softmax", "postprocess_torchvision"),
        ("full_step_ours_mbox_ohem", "full_step_torchvision"),
        ("full_step_ours_focal", "full_step_torchvision"),
    ]:
        if ours in results and theirs in results:
            report[f"ratio_{ours}"] = round(results[ours] / results[theirs], 3)
    if "full_step_ours_mbox_ohem_fp32" in results and "full_step_ours_mbox_ohem" in results:
        # ours with --amp/--channels_last over ours in fp32 NCHW
        report["ratio_full_step_ours_mbox_ohem_vs_fp32"] = round(
            results["full_step_ours_mbox_ohem"] / results["full_step_ours_mbox_ohem_fp32"], 3
        )
    for key, value in report.items():
        unit = "" if key.startswith("ratio") else " MB" if key.startswith("peak_mb") else " s"
        print(f"{key:<40} {value:.4f}{unit}")
    report.update(
        device=str(device),
        threads=torch.get_num_threads(),
        batch_size=args.batch_size,
        full_step_batch_size=args.full_step_batch_size,
        repeats=args.repeats,
        full_step_repeats=args.full_step_repeats,
        amp=args.amp,
        channels_last=args.channels_last,
        input_dim=args.input_dim,
        num_classes=args.num_classes,
    )
    if args.memory:
        report["peak_memory_method"] = (
            "torch.cuda.max_memory_allocated over the call (after reset_peak_memory_stats)"
            if device.type == "cuda"
            else "torch.profiler(profile_memory=True): peak of the running sum of allocations during the call"
        )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_cli(main, get_args_parser(add_help=True))
