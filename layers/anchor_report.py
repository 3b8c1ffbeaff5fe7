"""Clustering a box set into anchor shapes, and the anchor-quality report (kmeans_for_anchors.py).

``cluster_and_report`` runs one of the two clusterings (``per_level``: layers/kmeans.py; ``original``:
layers/kmeans_original.py) on the kept boxes of a box set (data/box_sets.py), writes the anchor file,
and measures the report's anchor sets (``anchor_sets_for_report``) on the train and val box sets, each
row with the grid measure (layers/kmeans.py ``anchor_quality``) and the original's shape measure
(layers/kmeans_original.py ``shape_quality``). kmeans_for_anchors.py's docstring describes the table.
"""

import time
from typing import Dict, List, Sequence

import torch

from data.box_sets import box_counts, kept_boxes
from layers.anchor_sets import original_anchor_whs
from layers.anchors import DEFAULT_STRIDES, load_anchor_file, predefined_anchor_whs, save_anchor_file
from layers.kmeans import anchor_quality, cluster_anchor_whs, kmeans_aspect_ratios
from layers.kmeans_original import cluster_anchor_whs_original, shape_quality
from utils.errors import UserError

REPORT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
METHODS = ("per_level", "original")
DEFAULT_MAX_ITER = {"per_level": 300, "original": 10}


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
