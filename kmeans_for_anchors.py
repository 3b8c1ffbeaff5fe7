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
from typing import Dict, Sequence

from data.box_sets import kept_boxes, load_boxes
from layers.anchor_report import METHODS, cluster_and_report, format_table
from layers.anchor_sets import SHIPPED_KMEANS_FILES
from layers.kmeans import INIT_MODES
from utils.cli import HelpFormatter
from utils.errors import UserError, run_cli
from utils.options import split_names

logger = logging.getLogger("kmeans_for_anchors")


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
