"""Cluster a dataset's training boxes into anchor shapes (IoU k-means) and report anchor quality.

Run-book:
    python prep/shapes.py --data_root datasets
    python kmeans_for_anchors.py --dataset shapes --train_sets train --val_sets val --input_dim 256 \
        --out anchors/shapes.json
    python train.py ... --input_dim 256 --anchor_type kmeans --anchor_file anchors/shapes.json
    # the original codebase's clustering, on VOC07+12 as it ran it (its result: anchors/original_voc.json)
    python kmeans_for_anchors.py --dataset voc --train_sets train2007,val2007,train2012,val2012 \
        --val_sets test2007 --method original --out anchors/voc_original_method.json

Boxes come from ``<data_root>/<dataset>/annotations/<split>.json`` and are rescaled exactly as training
resizes their image (``data.transforms.compute_resize``: square ``--input_dim``, or keep-aspect
``--min_size/--max_size``), so train with the same input options as the anchor file (it records them).
Difficult and crowd boxes are left out of the clustering and of the report, and counted. Every split file
is read and checked before any clustering starts.

Two clusterings (``--method``):
- ``per_level`` (ours, the default; ``layers/kmeans.py``): each box goes to the pyramid level whose
  predefined one-scale anchors give it the highest centred IoU, then per level ``--k`` clusters (default
  3, so 15 anchors for P3..P7) of (w, h) with the distance 1 - IoU at a common centre, starting from the
  predefined anchors (k ratios log-uniform in [0.5, 2]), median update, until the assignments stop
  changing (at most ``--max_iter`` steps, default 300). The file is for our stride centre layout.
- ``original`` (the original codebase's; ``layers/kmeans_original.py``): one joint k-means over 15
  centres seeded with its ``default`` set's 15 shapes, highest-IoU assignment at a common origin, mean
  update, ``--max_iter`` steps (default 10, as it ran). The file is for the original's centre layout.

The report, on the train splits and on the val splits when given, has one row per anchor set: the
original's sets (``original``: 9 = pdf9, 6 = pdf9's ratios with scales 1 and 1.5, 3 = default), RetinaNet's
predefined 9 / 6 / 3 (``predefined``) and this run's clustered set (``clustered``), each measured twice:

    | Type | Set | SR | AR | #Anchors/level | Total | Grid IoU | Grid recall % | Shape IoU | Shape recall % |

- Grid (ours): per gt box the best IoU with any anchor of the real anchor grid of its image's input
  size, positions included (in the set's own centre layout; keep-aspect: the resized size padded to a
  multiple of 32, as the batch collation does); recall = share of boxes with a best IoU >= 0.5, the
  matcher's positive threshold. This is what training sees.
- Shape (the original's, the measure of its README table): boxes and anchors moved to a common origin,
  per box the best IoU with any shape of the set; recall = share of boxes with a best IoU > 0.5.

SR / AR = scales / aspect ratios per location, #Anchors/level = anchors per location on each level,
Total = anchors per image at the training input size (keep-aspect: the mean over the images).
``--json`` prints the report as one JSON object on the last line; every row of ``splits.<split>.rows``
has ``type``, ``name``, ``num_anchors_per_location``, ``average_iou``, ``recall_pct`` (grid) and
``average_iou_shape``, ``recall_pct_shape`` (shape).
"""

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

from data.annotations import load_annotations
from data.transforms import compute_resize
from layers.anchor_sets import SHIPPED_KMEANS_FILES, original_anchor_whs
from layers.anchors import DEFAULT_STRIDES, load_anchor_file, predefined_anchor_whs, save_anchor_file
from layers.kmeans import INIT_MODES, anchor_quality, cluster_anchor_whs, kmeans_aspect_ratios
from layers.kmeans_original import cluster_anchor_whs_original, shape_quality
from utils.cli import HelpFormatter
from utils.errors import UserError, run_cli
from utils.options import split_names

logger = logging.getLogger("kmeans_for_anchors")

# Keep-aspect batches are padded to a multiple of this (data.collate.Collate); square inputs are not.
KEEP_ASPECT_SIZE_DIVISIBILITY = 32
REPORT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
METHODS = ("per_level", "original")
DEFAULT_MAX_ITER = {"per_level": 300, "original": 10}


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="IoU k-means anchors and anchor-quality report",
        add_help=add_help,
        formatter_class=HelpFormatter,
    )
    # * Data (same names and defaults as the shared parser)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", help="dataset folder name under --data_root")
    g.add_argument("--data_root", default="datasets/", help="root holding <dataset>/annotations/<split>.json")
    g.add_argument("--train_sets", default="train", help="comma-separated splits to cluster and report on")
    g.add_argument("--val_sets", default="val", help="comma-separated splits to report on ('' for none)")
    # * Input: boxes are rescaled as training resizes the images
    g = parser.add_argument_group("input")
    g.add_argument(
        "--resize_mode", default="square", choices=("square", "keep_aspect"), help="as in train.py"
    )
    g.add_argument("--input_dim", type=int, default=600, help="square input size")
    g.add_argument("--min_size", type=int, default=600, help="keep_aspect: short side")
    g.add_argument("--max_size", type=int, default=1000, help="keep_aspect: long side at most")
    # * Clustering
    g = parser.add_argument_group("clustering")
    g.add_argument(
        "--method",
        default="per_level",
        choices=METHODS,
        help="per_level: ours (levels first, then median k-means per level); original: the original "
        "codebase's joint k-means of 15 centres seeded with its default set, mean update",
    )
    g.add_argument(
        "--k", type=int, default=3, help="anchors per location (clusters per level; 3 for original)"
    )
    g.add_argument(
        "--max_iter",
        type=int,
        default=None,
        help="k-means iterations at most (default: 300 per_level, 10 original)",
    )
    g.add_argument(
        "--init",
        default="predefined",
        choices=INIT_MODES,
        help="initial centres: predefined one-scale anchors, or k random boxes (uses --seed)",
    )
    g.add_argument("--man_seed", "--seed", dest="seed", type=int, default=0, help="seed of --init random")
    # * Output
    g = parser.add_argument_group("output")
    g.add_argument(
        "--save_path",
        "--out",
        "--output",
        dest="out",
        default=None,
        help="anchor file to write (default anchors/<dataset>.json)",
    )
    g.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    return parser


def load_boxes(
    annotation_files: Sequence[str],
    resize_mode: str,
    input_dim: int,
    min_size: int,
    max_size: int,
) -> Dict:
    """Boxes of the given split files in network-input pixels, grouped by input size.

    Returns a dict:
        gt_boxes (ndarray[G, 4] float64, xyxy input px), difficult / crowd / degenerate (ndarray[G] bool;
        degenerate = zero width or height), gt_input_size_idxs (ndarray[G] int64 into input_sizes),
        input_sizes (ndarray[S, 2] int64 (h, w) of the padded network input), num_images_per_size
        (ndarray[S]), num_images, annotation_files.
    """
    heights, widths, boxes, image_idxs, difficult, crowd = [], [], [], [], [], []
    num_images = 0  # images of the previous files: offsets this file's image rows
    for path in annotation_files:
        coco = load_annotations(path)
        ids = np.array([im["id"] for im in coco["images"]], dtype=np.int64)
        heights.append(np.array([im["height"] for im in coco["images"]], dtype=np.float64))
        widths.append(np.array([im["width"] for im in coco["images"]], dtype=np.float64))
        anns = coco["annotations"]
        ann_image_ids = np.array([a["image_id"] for a in anns], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids[order], ann_image_ids).clip(max=max(len(ids) - 1, 0))
        if len(anns) and (len(ids) == 0 or np.any(ids[order][pos] != ann_image_ids)):
            bad = ann_image_ids[ids[order][pos] != ann_image_ids] if len(ids) else ann_image_ids
            raise UserError(f"{path}: annotations refer to unknown image ids, e.g. {bad[:5].tolist()}")
        image_idxs.append(num_images + order[pos])
        boxes.append(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4))
        difficult.append(np.array([bool(a.get("difficult", 0)) for a in anns], dtype=bool))
        crowd.append(np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool))
        num_images += len(ids)
    return resize_boxes(
        np.concatenate(heights),
        np.concatenate(widths),
        np.concatenate(boxes),
        np.concatenate(image_idxs).astype(np.int64),
        np.concatenate(difficult),
        np.concatenate(crowd),
        resize_mode,
        input_dim,
        min_size,
        max_size,
        annotation_files=annotation_files,
    )


def resize_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    gt_boxes_xywh: np.ndarray,
    gt_image_idxs: np.ndarray,
    difficult: np.ndarray,
    crowd: np.ndarray,
    resize_mode: str,
    input_dim: int,
    min_size: int,
    max_size: int,
    annotation_files: Sequence[str] = (),
) -> Dict:
    """The box set of :func:`load_boxes` from arrays (vectorised over all images and boxes).

    Args:
        heights, widths (ndarray[M]): original image sizes.
        gt_boxes_xywh (ndarray[G, 4]): [x, y, w, h] original pixels. gt_image_idxs (ndarray[G]): row of
            each box's image in heights / widths. difficult, crowd (ndarray[G] bool).
    """
    new_h, new_w, sx, sy = compute_resize(heights, widths, resize_mode, input_dim, min_size, max_size)
    divisibility = KEEP_ASPECT_SIZE_DIVISIBILITY if resize_mode == "keep_aspect" else 1
    padded = np.stack([np.broadcast_to(new_h, heights.shape), np.broadcast_to(new_w, widths.shape)], axis=1)
    padded = -(-padded.astype(np.int64) // divisibility) * divisibility  # round up
    input_sizes, image_size_idxs, num_images_per_size = np.unique(
        padded.reshape(-1, 2), axis=0, return_inverse=True, return_counts=True
    )
    scale = np.stack(np.broadcast_arrays(sx, sy, sx, sy), axis=1)[gt_image_idxs]  # [G, 4]
    xywh = np.asarray(gt_boxes_xywh, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * scale
    return {
        "gt_boxes": gt_boxes,
        "difficult": np.asarray(difficult, dtype=bool),
        "crowd": np.asarray(crowd, dtype=bool),
        "degenerate": (gt_boxes[:, 2] <= gt_boxes[:, 0]) | (gt_boxes[:, 3] <= gt_boxes[:, 1]),
        "gt_input_size_idxs": image_size_idxs.reshape(-1)[gt_image_idxs],
        "input_sizes": input_sizes,
        "num_images_per_size": num_images_per_size,
        "num_images": int(heights.shape[0]),
        "annotation_files": list(annotation_files),
    }


def kept_boxes(box_set: Dict) -> np.ndarray:
    """Mask of the boxes that count: not difficult, not crowd, positive width and height."""
    return ~(box_set["difficult"] | box_set["crowd"] | box_set["degenerate"])


def box_counts(box_set: Dict) -> Dict:
    keep = kept_boxes(box_set)
    return {
        "num_images": int(box_set["num_images"]),
        "num_input_sizes": int(len(box_set["input_sizes"])),
        "num_boxes": int(keep.sum()),
        "num_ignored_difficult": int(box_set["difficult"].sum()),
        "num_ignored_crowd": int(box_set["crowd"].sum()),
        "num_ignored_degenerate": int(box_set["degenerate"].sum()),
    }


def anchor_sets_for_report(
    clustered_whs: Sequence[torch.Tensor], clustered_layout: str, input_side: int, strides: Sequence[int]
) -> List[Dict]:
    """The report's anchor sets, in row order: original 9 / 6 / 3, predefined 9 / 6 / 3, clustered.

    Each: type, name, num_scales, num_aspect_ratios, layout, whs (list of Tensor[k, 2] input pixels).
    ``input_side`` is the square side the original's sets are computed for (--input_dim, or --min_size
    for keep-aspect).
    """
    sets = [
        dict(type="original", name=name, num_scales=n, num_aspect_ratios=3, layout="original",
             whs=original_anchor_whs(name, input_side, strides))
        for name, n in (("pdf9", 3), ("pdf6", 2), ("default", 1))
    ]  # fmt: skip
    sets += [
        dict(type="predefined", name=f"predefined{n * 3}", num_scales=n, num_aspect_ratios=3, layout="stride",
             whs=predefined_anchor_whs(n, REPORT_ASPECT_RATIOS))
        for n in (3, 2, 1)
    ]  # fmt: skip
    k = int(clustered_whs[0].shape[0])
    sets.append(dict(type="clustered", name="clustered", num_scales=1, num_aspect_ratios=k,
                     layout=clustered_layout, whs=list(clustered_whs)))  # fmt: skip
    return sets


def report_rows(box_set: Dict, anchor_sets: Sequence[Dict], strides: Sequence[int]) -> List[Dict]:
    """The table rows of ``anchor_sets`` measured on ``box_set``: grid and shape measures."""
    keep = kept_boxes(box_set)
    gt_boxes = torch.as_tensor(box_set["gt_boxes"][keep], dtype=torch.float32)
    gt_size_idxs = torch.as_tensor(box_set["gt_input_size_idxs"][keep], dtype=torch.int64)
    whs = box_set["gt_boxes"][keep, 2:] - box_set["gt_boxes"][keep, :2]  # [G, 2] float64
    sizes = [tuple(int(v) for v in s) for s in box_set["input_sizes"]]
    num_images = [int(n) for n in box_set["num_images_per_size"]]
    rows = []
    for entry in anchor_sets:
        grid = anchor_quality(
            gt_boxes, gt_size_idxs, sizes, num_images, entry["whs"], strides, layout=entry["layout"]
        )
        row = {k: v for k, v in entry.items() if k != "whs"}
        rows.append({**row, **grid, **shape_quality(whs, entry["whs"])})
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    lines = [
        "| Type | Set | SR | AR | #Anchors/level | Total "
        "| Grid IoU | Grid recall % | Shape IoU | Shape recall % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['type']} | {r['name']} | {r['num_scales']} | {r['num_aspect_ratios']} "
            f"| {r['num_anchors_per_location']} | {r['total_anchors']} | {fmt(r['average_iou'], '.4f')} "
            f"| {fmt(r['recall_pct'], '.2f')} | {fmt(r['average_iou_shape'], '.4f')} "
            f"| {fmt(r['recall_pct_shape'], '.2f')} |"
        )
    return "\n".join(lines)


def cluster_and_report(
    train_set: Dict,
    val_set: Dict | None,
    k: int = 3,
    max_iter: int | None = None,
    init: str = "predefined",
    seed: int = 0,
    out: str | None = None,
    anchor_file_meta: Dict | None = None,
    strides: Sequence[int] = DEFAULT_STRIDES,
    method: str = "per_level",
    input_side: int = 600,
) -> Dict:
    """Cluster the kept train boxes, write the anchor file (when ``out``) and measure the report rows.

    The clustered row uses the anchors as read back from the file (rounded as stored), i.e. exactly
    what ``train.py --anchor_type kmeans`` will use.
    """
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r} (expected one of {METHODS})")
    max_iter = DEFAULT_MAX_ITER[method] if max_iter is None else max_iter
    layout = "original" if method == "original" else "stride"
    keep = kept_boxes(train_set)
    whs = train_set["gt_boxes"][keep, 2:] - train_set["gt_boxes"][keep, :2]  # [N, 2]
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "original":
        if k != 3:
            raise UserError(
                f"--method original clusters 3 anchors per level (its default set's), got --k {k}"
            )
        gt_boxes = train_set["gt_boxes"][keep]
        clustered, level_summaries = cluster_anchor_whs_original(gt_boxes, input_side, max_iter, strides)
    else:
        init_whs = [w.double().numpy() for w in predefined_anchor_whs(1, kmeans_aspect_ratios(k))]
        clustered, level_summaries = cluster_anchor_whs(
            whs, init_whs, max_iter=max_iter, init=init, seed=seed
        )
    kmeans_seconds, kmeans_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    clustered_whs = [torch.as_tensor(c, dtype=torch.float32) for c in clustered]
    if out:
        meta = dict(anchor_file_meta or {}, method=method, layout=layout)
        save_anchor_file(out, clustered_whs, strides=list(strides), **meta)
        clustered_whs, _ = load_anchor_file(out, expected_strides=strides)
    for summary, stride, centres in zip(level_summaries, strides, clustered_whs):
        summary["stride"] = int(stride)
        summary["anchor_whs"] = [[round(w, 2), round(h, 2)] for w, h in centres.tolist()]
    anchor_sets = anchor_sets_for_report(clustered_whs, layout, input_side, strides)
    t0, c0 = time.perf_counter(), time.process_time()
    splits = {"train": {**box_counts(train_set), "rows": report_rows(train_set, anchor_sets, strides)}}
    if val_set is not None:
        splits["val"] = {**box_counts(val_set), "rows": report_rows(val_set, anchor_sets, strides)}
    report_seconds, report_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {
        "anchor_file": out,
        "method": method,
        "layout": layout,
        "k": k,
        "init": init,
        "seed": seed,
        "max_iter": max_iter,
        "clustering": {
            "num_boxes": int(whs.shape[0]),
            "seconds": kmeans_seconds,
            "cpu_seconds": kmeans_cpu_seconds,
            "levels": level_summaries,
        },
        "splits": splits,
        "report_seconds": report_seconds,
        "report_cpu_seconds": report_cpu_seconds,
    }


def print_report(report: Dict) -> None:
    c = report["clustering"]
    print(
        f"Clustered {c['num_boxes']} boxes of {report['dataset']}/{'+'.join(report['train_sets'])} "
        f"({report['method']} k-means) in {c['seconds']:.2f} s ({report['resize_mode']}, input_dim "
        f"{report['input_dim']}, min/max size {report['min_size']}/{report['max_size']})"
    )
    for s in c["levels"]:
        init_iou = "n/a" if s["mean_iou_init"] is None else f"{s['mean_iou_init']:.3f}"
        iou = "n/a" if s["mean_iou"] is None else f"{s['mean_iou']:.3f}"
        print(
            f"  P{s['level'] + 3} (stride {s['stride']}): {s['num_boxes']} boxes, {s['num_iters']} iters "
            f"{'converged' if s['converged'] else 'NOT converged'}, reseeded {s['num_reseeded']}, "
            f"centred IoU {init_iou} -> {iou}, anchors (w, h) {s['anchor_whs']}"
        )
    print(f"Wrote {report['anchor_file']} ({report['layout']} centre layout)")
    for name, split in report["splits"].items():
        sets = report["train_sets"] if name == "train" else report["val_sets"]
        print(
            f"\n{report['dataset']} {'+'.join(sets)} ({name}): {split['num_images']} images, "
            f"{split['num_boxes']} boxes (ignored: {split['num_ignored_difficult']} difficult, "
            f"{split['num_ignored_crowd']} crowd, {split['num_ignored_degenerate']} zero-size), "
            f"{split['num_input_sizes']} input size(s)"
        )
        print(format_table(split["rows"]))
    print(
        "\nGrid: best IoU on the real anchor grid, recall at IoU >= 0.5 (ours). Shape: best IoU of (w, h) "
        "at a common origin, recall at IoU > 0.5 (the original codebase's table)."
    )


def check_inputs(args: argparse.Namespace, paths: Sequence[str], out: str) -> None:
    """Every split file exists and the output can be written: one error naming all problems, at start."""
    problems = [f"{p}: annotation file not found" for p in paths if not os.path.isfile(p)]
    if os.path.abspath(out) in {os.path.abspath(p) for p in SHIPPED_KMEANS_FILES.values()}:
        problems.append(f"--out {out}: would overwrite the original codebase's shipped anchor set")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        problems.append(f"--out {out}: cannot create it under {parent}")
    if problems:
        raise UserError(
            "kmeans_for_anchors.py cannot start (convert the dataset with a script in prep/; "
            f"--data_root {args.data_root}, --dataset {args.dataset}):\n  " + "\n  ".join(problems)
        )


def main(args: argparse.Namespace) -> Dict:
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.max_iter is not None and args.max_iter < 1:
        raise UserError(f"--max_iter must be >= 1, got {args.max_iter}")
    if args.method == "original" and (args.k != 3 or args.init != "predefined"):
        raise UserError("--method original clusters 3 per level from its default set: leave --k 3, --init")
    train_sets, val_sets = split_names(args.train_sets), split_names(args.val_sets)
    if not train_sets:
        raise UserError("--train_sets names no split")
    ann_dir = os.path.join(args.data_root, args.dataset, "annotations")
    train_files = [os.path.join(ann_dir, f"{s}.json") for s in train_sets]
    val_files = [os.path.join(ann_dir, f"{s}.json") for s in val_sets]
    out = args.out or os.path.join("anchors", f"{args.dataset}.json")
    check_inputs(args, train_files + val_files, out)
    resize = dict(
        resize_mode=args.resize_mode, input_dim=args.input_dim, min_size=args.min_size, max_size=args.max_size
    )
    # Both box sets are read (and validated) before the clustering starts.
    train_set = load_boxes(train_files, **resize)
    val_set = load_boxes(val_files, **resize) if val_sets else None
    if not kept_boxes(train_set).any():
        raise UserError(
            f"--train_sets {args.train_sets}: no box to cluster in {train_set['annotation_files']}"
        )
    meta = dict(resize, dataset=args.dataset, train_sets=train_sets)
    report = cluster_and_report(
        train_set,
        val_set,
        k=args.k,
        max_iter=args.max_iter,
        init=args.init,
        seed=args.seed,
        out=out,
        anchor_file_meta=meta,
        method=args.method,
        input_side=args.min_size if args.resize_mode == "keep_aspect" else args.input_dim,
    )
    report = {**meta, "val_sets": val_sets, **report}

    print_report(report)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main, get_args_parser(add_help=True))
