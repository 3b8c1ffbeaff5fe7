"""Our Faster R-CNN FPN (--arch faster_rcnn_fpn) against torchvision's fasterrcnn_resnet50_fpn.

    python bench/bench_two_stage.py                       # 2 images of 600x800, CPU, median of 5 runs
    python bench/bench_two_stage.py --runs 7 --threads 1 --device cuda

Both models: ResNet-50 from scratch (every layer and batch norm trainable), FPN 256, RPN with one anchor
size per level and 3 ratios, 2000/2000 (train) and 1000/1000 (test) proposals, 7x7 RoIAlign, two 1024-d
layers, 21 classes, 128 sampled RoIs per image (torchvision's default of 512 is set to ours so that
the same work is timed), score threshold 0.05, NMS 0.5, 100 detections. torchvision gets min_size 600 /
max_size 800 so its own transform does not rescale the 600x800 images (it still normalises, runs an
identity-size interpolation and pads to 608x800); ours gets the same images already normalised and
padded to 608x800 (what data/collate.py does), with the valid size in the targets.

A training step is forward + losses + backward + SGD step; inference is the forward pass in eval mode
under no_grad plus the post-processing to per-image boxes. Runs alternate between the two models after one
warm-up run each, and the median of ``--runs`` is reported, as wall seconds and process CPU seconds
(on a shared machine the CPU figure depends less on other jobs). Ratios are ours / torchvision's (below
1 = ours faster). The last line is one JSON object.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.faster_rcnn import ROIS_PER_IMAGE, build_faster_rcnn  # noqa: E402
from utils.options import get_common_parser, resolve_defaults  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench two-stage detectors", add_help=add_help)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model and mode (median)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def build_models(device: torch.device, height: int, width: int):
    args = resolve_defaults(
        get_common_parser().parse_args(
            ["--arch", "faster_rcnn_fpn", "--basenet", "resnet50", "--pretrained", "none"]
        )
    )
    args.num_classes = 20
    ours, criterion, postprocessor = build_faster_rcnn(args)
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=21,
        min_size=height,
        max_size=width,
        box_batch_size_per_image=ROIS_PER_IMAGE,
    )
    return ours.to(device), criterion, postprocessor.to(device), reference.to(device)


def make_inputs(batch_size: int, height: int, width: int, device: torch.device, seed: int):
    """Images in [0, 1] (torchvision), the same normalised and padded to 32 (ours), targets for both."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand(batch_size, 3, height, width, generator=generator)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
    ours_images = torch.zeros(batch_size, 3, padded_h, padded_w)
    ours_images[:, :, :height, :width] = (raw - mean) / std
    ours_targets, tv_targets = [], []
    for _ in range(batch_size):
        xy = torch.rand(3, 2, generator=generator) * torch.tensor([width, height]) * 0.6
        wh = torch.rand(3, 2, generator=generator) * torch.tensor([width, height]) * 0.35 + 20
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 20, (3,), generator=generator)
        ours_targets.append(
            {
                "boxes": boxes.to(device),
                "labels": labels.to(device),
                "difficult": torch.zeros(3, dtype=torch.bool, device=device),
                "iscrowd": torch.zeros(3, dtype=torch.bool, device=device),
                "size": torch.tensor([height, width], device=device),
                "scale": torch.ones(2, device=device),
                "orig_size": torch.tensor([height, width], device=device),
            }
        )
        tv_targets.append({"boxes": boxes.to(device), "labels": (labels + 1).to(device)})
    return ours_images.to(device), ours_targets, list(raw.to(device)), tv_targets


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ours, criterion, postprocessor, reference = build_models(device, args.height, args.width)
    num_ours = sum(p.numel() for p in ours.parameters())
    num_reference = sum(p.numel() for p in reference.parameters())
    print(f"parameters: ours {num_ours / 1e6:.3f} M, torchvision {num_reference / 1e6:.3f} M")
    images, targets, tv_images, tv_targets = make_inputs(
        args.batch_size, args.height, args.width, device, args.seed
    )
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=1e-4, momentum=0.9)

    def train_ours():
        ours.train()
        loss = sum(criterion(ours(images, targets), targets).values())
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def train_reference():
        reference.train()
        loss = sum(reference(tv_images, tv_targets).values())
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    @torch.no_grad()
    def infer_ours():
        ours.eval()
        postprocessor(ours(images), targets)

    @torch.no_grad()
    def infer_reference():
        reference.eval()
        reference(tv_images)

    jobs = {
        "train": (train_ours, train_reference),
        "infer": (infer_ours, infer_reference),
    }
    result = {
        "bench": "two_stage",
        "date": date.today().isoformat(),
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "input": f"{args.batch_size}x3x{args.height}x{args.width}",
        "runs": args.runs,
    }
    for mode, (ours_fn, reference_fn) in jobs.items():
        timed(ours_fn, device)  # warm-up: allocator, kernels, MultiScaleRoIAlign's scale set-up
        timed(reference_fn, device)
        samples = {"ours": [], "torchvision": []}
        for _ in range(args.runs):  # alternate, so drifting load on a shared machine hits both alike
            samples["ours"].append(timed(ours_fn, device))
            samples["torchvision"].append(timed(reference_fn, device))
        for name, values in samples.items():
            result[f"{name}_{mode}_s"] = round(statistics.median(v[0] for v in values), 4)
            result[f"{name}_{mode}_cpu_s"] = round(statistics.median(v[1] for v in values), 4)
            print(f"{mode:5s} {name:12s} wall {[round(v[0], 3) for v in values]}")
        result[f"{mode}_ratio"] = round(result[f"ours_{mode}_s"] / result[f"torchvision_{mode}_s"], 3)
        result[f"{mode}_cpu_ratio"] = round(
            result[f"ours_{mode}_cpu_s"] / result[f"torchvision_{mode}_cpu_s"], 3
        )
        ours_s, reference_s = result[f"ours_{mode}_s"], result[f"torchvision_{mode}_s"]
        print(
            f"{mode}: ours {ours_s:.3f} s, torchvision {reference_s:.3f} s "
            f"(ratio {result[f'{mode}_ratio']:.3f}; CPU-time ratio {result[f'{mode}_cpu_ratio']:.3f})"
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser(add_help=True).parse_args())
