"""Peak memory of one loss forward + backward (bench_components.py --memory): ours vs torchvision's.

CUDA: torch.cuda.max_memory_allocated over the call, after reset_peak_memory_stats, minus what was
allocated before it (the inputs). CPU: torch.profiler with profile_memory=True records every allocation
(+bytes) and free (-bytes) of torch's CPU allocator during the call; the peak of their running sum, in
time order, is the most bytes the call held at once beyond what existed before it. (The process's RSS,
which the CPU figure was before, is about 2.2 GB on every side: the interpreter, libraries and the
inputs, not the loss.) Allocations and frees inside one operator count at the operator's start, net, so a
temporary an operator allocates and frees itself without a child operator is not seen; torch's kernels
allocate through aten::empty, a child operator, so their outputs and workspaces are.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict

import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection import retinanet_resnet50_fpn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from component_inputs import loss_inputs  # noqa: E402

from layers.box_coder import BoxCoder  # noqa: E402
from layers.losses import FocalLoss, MultiBoxLoss  # noqa: E402

SIDES = ("ours_mbox_ohem", "ours_focal", "torchvision")


def peak_allocated_bytes_cpu(fn: Callable[[], object]) -> int:
    """The peak, during fn(), of the bytes torch's CPU allocator holds beyond what it held at the call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage != 0
    )
    running, peak = 0, 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def loss_step(side: str, batch_size: int, input_dim: int, num_columns: int, seed: int, device: torch.device):
    """forward + backward of one loss (one of SIDES) on loss_inputs' tensors, as a closure."""
    anchors, logits, deltas, targets = loss_inputs(batch_size, input_dim, num_columns, seed, device)
    box_coder = BoxCoder((0.1, 0.2))
    if side == "torchvision":
        torch.manual_seed(seed)
        head = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_columns)
        tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        head_outputs = {"cls_logits": logits, "bbox_regression": deltas}
        fn = lambda: head.compute_loss(tv_targets, head_outputs, [anchors] * len(targets))  # noqa: E731
    else:
        loss = (
            MultiBoxLoss(box_coder, 0.5, 0.5, 3)
            if side == "ours_mbox_ohem"
            else FocalLoss(box_coder, 0.5, 0.4)
        )
        outputs = {"pred_logits": logits, "pred_box_deltas": deltas, "anchors": anchors}
        fn = lambda: loss(outputs, targets)  # noqa: E731

    def step():
        sum(fn().values()).backward()

    return step


def peak_memory(args, device: torch.device) -> Dict[str, float]:
    """Peak memory (MB) of the loss forward + backward at --batch_size, --num_classes columns, per side.

    Each side once on tiny inputs first (lazy initialisation is not the loss's memory), then measured on
    the real ones; the inputs exist before the call and are not counted.
    """
    out: Dict[str, float] = {}
    for side in SIDES:
        loss_step(side, 1, 64, args.num_classes, args.seed, device)()
        step = loss_step(side, args.batch_size, args.input_dim, args.num_classes, args.seed, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = peak_allocated_bytes_cpu(step)
        out[f"peak_mb_loss_{side}"] = round(peak / 2**20, 1)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
