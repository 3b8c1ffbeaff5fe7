"""Training-data throughput: our SSD pipeline per worker against torchvision.transforms.v2's, and the
end-to-end training DataLoader.

    python bench/bench_data.py                                  # per worker: ours vs v2, 600 px
    python bench/bench_data.py --loader --workers 16 --batch_size 24 --input_dim 600 --num_batches 50
    python bench/bench_data.py --tiny && python bench/bench_data.py --loader --tiny   # seconds, a smoke run

Both modes first write ``--num_images`` synthetic JPEGs of VOC's sizes (alternately 500 x 375 and
640 x 480, quality 90, smooth colours plus noise so that they compress like photos: about 80 KB each)
with 1-5 boxes each (a filled rectangle under every box), in the common annotation format
(``<tmp>/bench_jpeg/annotations/train.json``, see data/annotations.py), into a temporary folder that is
removed at the end. The files are in the page cache when timed, as they are after a first epoch.

Per worker (the default mode): one process, one thread (torch.set_num_threads(1), cv2.setNumThreads(0)),
what one DataLoader worker does. Over the same images, in the same order, batch by batch in turns
(the order swapped every batch), it times:
- ours: the training dataset of ``data.dataset.build_dataset`` (--augment ssd: read_image's decode,
  PhotometricDistort, Expand (zoom out), RandomSampleCrop, RandomHorizontalFlip, Resize to
  --input_dim square, ToTensorNormalize), each sample seeded as SeededDataset does, then the
  training collate (data.collate.Collate);
- v2: torchvision's equivalent as in its references/detection "ssd" recipe: decode_jpeg(read_file),
  v2.RandomPhotometricDistort, v2.RandomZoomOut (mean-pixel fill), v2.RandomIoUCrop,
  v2.SanitizeBoundingBoxes, v2.RandomHorizontalFlip, v2.Resize to --input_dim square (bilinear,
  antialias=False as our cv2.INTER_LINEAR),
  v2.ToDtype(float32, scale=True), v2.Normalize, on tv_tensors.Image / BoundingBoxes, each sample
  seeded through torch.manual_seed, then the same collate.
Rates are samples per CPU-second of this process (time.process_time), which a machine shared with
other jobs disturbs less than the wall clock; wall-clock rates are printed and saved beside them.
``ratio_ours_vs_v2`` is our seconds per sample over v2's (< 1: ours is faster).

--loader: the real training loader, ``data.loaders.build_train_loader`` (ResumableBatchSampler,
SeededDataset, collate) with --workers processes, persistent workers, --prefetch_factor and pinned
memory when CUDA is available (there the batch is also copied to the GPU, as training does), iterated
with ``iterate_batches`` for --warmup_batches and then --num_batches timed batches (wall clock: the
throughput a training step sees). ``--num_images`` defaults to one epoch that holds them all, so no
epoch boundary falls inside the run.

The last line printed is one JSON object (also written to --json_out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.annotations import save_annotations  # noqa: E402
from data.collate import Collate  # noqa: E402
from data.dataset import DetectionDataset, build_dataset  # noqa: E402
from data.loaders import SeededDataset, build_train_loader, iterate_batches, sample_seed  # noqa: E402
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL  # noqa: E402
from utils.options import get_common_parser  # noqa: E402

IMAGE_SIZES = ((500, 375), (640, 480))  # (w, h): VOC's most common photo sizes
DATASET = "bench_jpeg"
SEED = 0


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument(
        "--loader", action="store_true", help="time the end-to-end training DataLoader instead"
    )
    parser.add_argument("--input_dim", type=int, default=600, help="square training input size")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="images per batch (default: 8 per worker, 24 --loader)"
    )
    parser.add_argument(
        "--num_batches", type=int, default=None, help="timed batches (default: 20 per pipeline, 50 --loader)"
    )
    parser.add_argument(
        "--num_images",
        type=int,
        default=None,
        help="JPEGs written (default: 160 per worker; --loader: one epoch for every batch of the run)",
    )
    parser.add_argument("--workers", type=int, default=16, help="--loader: DataLoader worker processes")
    parser.add_argument("--prefetch_factor", type=int, default=4, help="--loader: batches per worker ahead")
    parser.add_argument(
        "--warmup_batches",
        type=int,
        default=None,
        help="--loader: untimed batches first (default: 2 per worker, at least 5), so that every worker "
        "runs when the clock starts",
    )
    parser.add_argument("--tiny", action="store_true", help="a few images and batches: a smoke run")
    parser.add_argument("--json_out", default=None, help="also write the JSON line to this file")
    return parser


def resolve_counts(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the mode-dependent defaults (and --tiny's small counts); check the counts."""
    if args.tiny:
        args.num_batches, args.num_images, args.warmup_batches = 2, 6, 1
        args.batch_size = 2
        args.workers = min(args.workers, 2)
    if args.batch_size is None:
        args.batch_size = 24 if args.loader else 8
    if args.num_batches is None:
        args.num_batches = 50 if args.loader else 20
    if args.warmup_batches is None:
        args.warmup_batches = max(5, 2 * args.workers) if args.loader else 1
    if args.num_images is None:
        total = args.warmup_batches + args.num_batches
        args.num_images = args.batch_size * total if args.loader else min(160, args.batch_size * total)
    problems = [
        f"--{k} must be >= {low}, got {getattr(args, k)}"
        for k, low in (
            ("batch_size", 1),
            ("num_batches", 1),
            ("num_images", 1),
            ("workers", 0),
            ("prefetch_factor", 1),
            ("warmup_batches", 0),
            ("input_dim", 32),
        )
        if getattr(args, k) < low
    ]
    if args.loader and args.num_images < args.batch_size:
        problems.append(f"--loader: --num_images ({args.num_images}) holds no batch of {args.batch_size}")
    if problems:
        raise SystemExit("bench_data.py: " + "; ".join(problems))
    return args


def write_jpeg_dataset(data_root: str, num_images: int, seed: int = SEED) -> Dict[str, float]:
    """Write ``num_images`` JPEGs and ``<data_root>/bench_jpeg/annotations/train.json``; returns the mean
    file size (KB) and boxes per image."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_root, DATASET)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, annotations, num_bytes = [], [], 0
    for i in range(num_images):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        # Smooth colours (an upsampled 1/16 grid) plus noise: compresses like a photo, not like flat paint.
        small = rng.uniform(0, 255, (height // 16, width // 16, 3)).astype(np.float32)
        pixels = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)
        for _ in range(int(rng.integers(1, 6))):
            w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            x1, y1, x2, y2 = int(x), int(y), int(x + w), int(y + h)
            pixels[y1:y2, x1:x2] = 0.5 * pixels[y1:y2, x1:x2] + 0.5 * rng.uniform(0, 255, 3)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        file_name = f"images/{i:06d}.jpg"
        path = os.path.join(folder, file_name)
        cv2.imwrite(path, np.clip(pixels, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        num_bytes += os.path.getsize(path)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": c, "name": name} for c, name in enumerate(("a", "b", "c"), start=1)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    save_annotations(coco, os.path.join(folder, "annotations", "train.json"))
    return {"mean_file_kb": num_bytes / num_images / 1024, "boxes_per_image": len(annotations) / num_images}


def training_dataset(data_root: str, input_dim: int) -> DetectionDataset:
    """Our training dataset exactly as train.py builds it (the options' defaults: --augment ssd)."""
    data_args = get_common_parser().parse_args(
        ["--data_root", data_root, "--dataset", DATASET, "--input_dim", str(input_dim)]
    )
    return build_dataset(data_args, "train", train=True)


class V2Pipeline:
    """torchvision.transforms.v2's SSD training pipeline over the files and boxes of ``dataset``."""

    def __init__(self, dataset: DetectionDataset, input_dim: int):
        from torchvision.transforms import v2

        self.dataset = dataset
        self.transforms = v2.Compose(
            [
                v2.RandomPhotometricDistort(p=0.5),
                v2.RandomZoomOut(fill=[round(m) for m in MEAN_PIXEL], side_range=(1.0, 4.0), p=0.5),
                v2.RandomIoUCrop(),
                v2.SanitizeBoundingBoxes(),
                v2.RandomHorizontalFlip(p=0.5),
                # bilinear, no antialiasing: as cv2.INTER_LINEAR in our Resize (v2 antialiases by default)
                v2.Resize((input_dim, input_dim), antialias=False),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
            ]
        )

    def __getitem__(self, item: Tuple[int, int]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        from torchvision import io, tv_tensors

        index, seed = item
        torch.manual_seed(seed)
        image = tv_tensors.Image(io.decode_jpeg(io.read_file(self.dataset.image_path(index))))
        raw = self.dataset.raw_target(index)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(raw["boxes"]), format="XYXY", canvas_size=tuple(image.shape[-2:])
            ),
            "labels": torch.from_numpy(raw["labels"]),
        }
        image, target = self.transforms(image, target)
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


def interleaved_times(
    pipelines: Dict[str, Callable[[Sequence[Tuple[int, int]]], Any]],
    batches: List[List[Tuple[int, int]]],
    warmup: int,
) -> Dict[str, Dict[str, float]]:
    """CPU and wall seconds of each pipeline over ``batches`` (after ``warmup`` untimed ones), taking
    turns batch by batch and swapping the order every batch."""
    times = {name: {"cpu_s": 0.0, "wall_s": 0.0} for name in pipelines}
    names = list(pipelines)
    for b, batch in enumerate(batches):
        for name in names if b % 2 == 0 else names[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            pipelines[name](batch)
            if b >= warmup:
                times[name]["cpu_s"] += time.process_time() - cpu
                times[name]["wall_s"] += time.perf_counter() - wall
    return times


def per_worker(args: argparse.Namespace, data_root: str) -> Dict[str, Any]:
    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # OpenCV's parallel_for off: one thread, as the comparison with v2 needs
    dataset = training_dataset(data_root, args.input_dim)
    ours, v2 = SeededDataset(dataset), V2Pipeline(dataset, args.input_dim)
    collate = Collate(size_divisibility=1)
    total = args.warmup_batches + args.num_batches
    items = [((p % len(dataset)), sample_seed(SEED, 0, p)) for p in range(total * args.batch_size)]
    batches = [items[b * args.batch_size : (b + 1) * args.batch_size] for b in range(total)]
    times = interleaved_times(
        {
            "ours": lambda batch: collate([ours[item] for item in batch]),
            "v2": lambda batch: collate([v2[item] for item in batch]),
        },
        batches,
        args.warmup_batches,
    )
    num_samples = args.num_batches * args.batch_size
    rates = {name: num_samples / t["cpu_s"] for name, t in times.items()}
    print(f"{num_samples} samples per pipeline, {args.input_dim} px, batch {args.batch_size}, one thread")
    print(f"{'pipeline':>8} {'CPU s':>8} {'samples/CPU-s':>14} {'ms/sample':>10} {'wall samples/s':>15}")
    for name, t in times.items():
        print(
            f"{name:>8} {t['cpu_s']:8.2f} {rates[name]:14.1f} {1000 * t['cpu_s'] / num_samples:10.2f} "
            f"{num_samples / t['wall_s']:15.1f}"
        )
    ratio = rates["v2"] / rates["ours"]  # (1 / ours rate) / (1 / v2 rate): our seconds per sample over v2's
    print(f"ours / v2 seconds per sample: {ratio:.3f} ({'ours' if ratio < 1 else 'v2'} faster)")
    return {
        "mode": "per_worker",
        "num_samples": num_samples,
        "ours_samples_per_s": rates["ours"],
        "v2_samples_per_s": rates["v2"],
        "ratio_ours_vs_v2": ratio,
        "ours_wall_samples_per_s": num_samples / times["ours"]["wall_s"],
        "v2_wall_samples_per_s": num_samples / times["v2"]["wall_s"],
        "clock": "process_cpu",
    }


def loader(args: argparse.Namespace, data_root: str) -> Dict[str, Any]:
    dataset = training_dataset(data_root, args.input_dim)
    with_workers = args.workers > 0
    train_loader = build_train_loader(
        dataset,
        args.batch_size,
        args.workers,
        size_divisibility=1,
        seed=SEED,
        pin_memory=None,  # the builder's default: pinned when CUDA is available
        persistent_workers=with_workers,
        prefetch_factor=args.prefetch_factor if with_workers else None,
    )
    device = torch.device("cuda") if torch.cuda.is_available() else None
    start = time.perf_counter()
    batches = iterate_batches(train_loader, 0)
    first_batch_s, timed_from, num_images = None, None, 0
    for k in range(args.warmup_batches + args.num_batches):
        if k == args.warmup_batches:
            if device is not None:
                torch.cuda.synchronize(device)
            timed_from = time.perf_counter()
        _, (images, _targets, _) = next(batches)
        if device is not None:
            images = images.to(device, non_blocking=True)
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        if k >= args.warmup_batches:
            num_images += len(images)
    if device is not None:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - timed_from
    batches.close()  # ends the epoch's iterator: the workers shut down with the loader
    rate = num_images / elapsed
    print(
        f"build_train_loader: {args.workers} workers, batch {args.batch_size}, {args.input_dim} px, "
        f"prefetch {args.prefetch_factor}, pin_memory {train_loader.pin_memory}, persistent {with_workers}"
    )
    print(f"first batch after {first_batch_s:.2f} s; {args.warmup_batches} warm-up batches untimed")
    print(
        f"{args.num_batches} batches ({num_images} images) in {elapsed:.2f} s: {rate:.1f} images/s, "
        f"{rate / max(args.workers, 1):.1f} per worker"
    )
    return {
        "mode": "loader",
        "loader_images_per_s": rate,
        "loader_batches_per_s": args.num_batches / elapsed,
        "images_per_s_per_worker": rate / max(args.workers, 1),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "num_batches": args.num_batches,
        "warmup_batches": args.warmup_batches,
        "prefetch_factor": args.prefetch_factor if with_workers else None,
        "persistent_workers": with_workers,
        "pin_memory": bool(train_loader.pin_memory and torch.cuda.is_available()),
        "copy_to": "cuda" if device is not None else "none",
        "first_batch_s": first_batch_s,
    }


def main(args: argparse.Namespace) -> Dict[str, Any]:
    resolve_counts(args)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as data_root:
        files = write_jpeg_dataset(data_root, args.num_images)
        print(
            f"{args.num_images} JPEGs ({' and '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)}), "
            f"{files['mean_file_kb']:.0f} KB and {files['boxes_per_image']:.1f} boxes each"
        )
        result = loader(args, data_root) if args.loader else per_worker(args, data_root)
    record = {
        "bench": "data",
        "date": datetime.date.today().isoformat(),
        **result,
        "input_dim": args.input_dim,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "image_sizes": [list(s) for s in IMAGE_SIZES],
        "mean_file_kb": round(files["mean_file_kb"], 1),
        "boxes_per_image": round(files["boxes_per_image"], 2),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "opencv": cv2.__version__,
    }
    line = json.dumps(record)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return record


if __name__ == "__main__":
    main(get_args_parser().parse_args())
