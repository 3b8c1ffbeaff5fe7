"""Pictures of metrics: precision/recall curves per class, and a run's loss / lr / mAP curves.

Both read what evaluate.py and train.py already write (the metrics JSON of ``metrics.metrics_file`` and
the run folder's ``metrics.jsonl``), so any past run can be drawn again without evaluating. matplotlib
runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List

import numpy as np

from utils.errors import UserError

logger = logging.getLogger(__name__)

# At most this many class panels in one PR figure; beyond it, the classes with the most ground truth.
MAX_CLASS_PANELS = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def pr_curve_series(metrics: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Curves per class from a metrics dict (evaluate.py's ``metrics`` or its metrics file).

    Returns:
        {class name: {"num_gt": int, "curves": [(label, recall [R], precision [R], AP or None)]}}, classes
        in the order of the first metric that lists them. VOC and Open Images curves are the stored
        envelopes; COCO's are its precision at IoU 0.5 and 0.75 (area all, 100 detections).
    """
    out: Dict[str, Dict[str, Any]] = {}

    def entry(name: str) -> Dict[str, Any]:
        return out.setdefault(name, {"num_gt": 0, "curves": []})

    voc = metrics.get("voc")
    if voc and voc.get("pr_curves") is not None:
        recall = voc["recall_thresholds"]
        for name in voc["class_names"]:
            e = entry(name)
            e["num_gt"] = max(e["num_gt"], int(voc["num_gt"].get(name, 0)))
            if name in voc["pr_curves"]:
                label = f"VOC IoU {voc['iou_thresh']:g}"
                e["curves"].append((label, recall, voc["pr_curves"][name], _finite(voc["ap_area"][name])))
    coco = metrics.get("coco")
    if coco and coco.get("precision") is not None:
        precision = np.asarray(coco["precision"], dtype=np.float64)  # [T, R, K]
        iou = np.asarray(coco["iou_thresholds"])
        recall = coco["recall_thresholds"]
        for k, name in enumerate(coco["class_names"]):
            e = entry(name)
            for thr, key in ((0.5, "ap50_per_class"), (0.75, "ap75_per_class")):
                t = int(np.argmin(np.abs(iou - thr)))
                if (precision[t, :, k] > -1).any():
                    ap = _finite(coco[key].get(name))
                    e["curves"].append((f"COCO IoU {thr:g}", recall, precision[t, :, k].tolist(), ap))
    oid = metrics.get("oid")
    if oid and oid.get("pr_curves") is not None:
        recall = oid["recall_thresholds"]
        for name in oid["class_names"]:
            e = entry(name)
            e["num_gt"] = max(e["num_gt"], int(oid["num_gt"].get(name, 0)))
            if name in oid["pr_curves"]:
                e["curves"].append(("Open Images", recall, oid["pr_curves"][name], _finite(oid["ap"][name])))
    return out


def plot_pr_curves(metrics: Dict[str, Any], path: str, title: str = "") -> str:
    """One PNG with a precision/recall panel per class (and a first panel with the class mean).

    Args:
        metrics (dict): evaluate.py's metrics (``{"voc": ..., "coco": ..., "oid": ...}``) or a metrics file.
        path (str): the PNG to write.
        title (str): figure title (e.g. the checkpoint).

    Returns:
        str: ``path``. Classes without ground truth get an empty panel saying so. With more than
        MAX_CLASS_PANELS classes, the ones with the most ground-truth boxes are drawn and the title says
        how many are left out (all curves stay in the metrics file).
    """
    series = pr_curve_series(metrics)
    if not series:
        raise UserError("plot_pr_curves: the metrics have no precision/recall curves (voc, coco or oid)")
    names = list(series)
    note = ""
    if len(names) > MAX_CLASS_PANELS:
        keep = set(sorted(names, key=lambda n: -series[n]["num_gt"])[:MAX_CLASS_PANELS])
        note = f" ({MAX_CLASS_PANELS} of {len(names)} classes, those with the most ground truth)"
        names = [n for n in names if n in keep]
    labels = list(dict.fromkeys(c[0] for s in series.values() for c in s["curves"]))  # first-seen order
    plt = _pyplot()
    colors = {label: plt.get_cmap("tab10")(i) for i, label in enumerate(labels)}

    num_panels = len(names) + 1
    cols = min(num_panels, 6)
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows + 0.5), squeeze=False)
    axes = axes.ravel()

    def setup(ax, heading: str) -> None:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(heading, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)

    # Panel 0: the mean curve over classes with ground truth, per label.
    ax = axes[0]
    setup(ax, "mean over classes")
    for label in labels:
        curves = [c for s in series.values() for c in s["curves"] if c[0] == label]
        if curves:
            mean = np.mean([np.asarray(c[2], dtype=np.float64).clip(0, None) for c in curves], axis=0)
            ax.plot(curves[0][1], mean, color=colors[label], lw=1.5)
    ax.set_xlabel("recall", fontsize=8)
    ax.set_ylabel("precision", fontsize=8)
    for ax, name in zip(axes[1:], names):
        s = series[name]
        aps = [f"{c[3]:.3f}" for c in s["curves"] if c[3] is not None]
        setup(ax, f"{name[:24]}  (n={s['num_gt']})" + (f"\nAP {' / '.join(aps)}" if aps else ""))
        if not s["curves"]:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=8, color="gray")
        for label, recall, precision, _ap in s["curves"]:
            ax.plot(
                recall, np.asarray(precision, dtype=np.float64).clip(0, None), color=colors[label], lw=1.2
            )
    for ax in axes[num_panels:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[label], lw=2) for label in labels]
    fig.legend(handles, labels, loc="upper right", fontsize=9, ncol=len(labels))
    heading = f"{title}  precision / recall per class{note}; n = ground-truth boxes, AP in legend order"
    fig.suptitle(heading.strip(), fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# train.py's validation keys before they took evaluate.py's names (engine.metric_summary), read under
# today's names, so an old run draws the same curves and one resumed across the change draws one curve.
OLD_VAL_KEYS = {
    "map50_07": "voc_map_07_11pt",
    "map50_area": "voc_map_area",
    "coco_ap": "coco_AP",
    "images": "num_images",
}


def current_key(key: str) -> str:
    """Today's name of a metrics.jsonl key: ``val_map50_area`` -> ``val_voc_map_area`` (OLD_VAL_KEYS, also
    after ``val_ema_``); any other key unchanged."""
    for prefix in ("val_ema_", "val_"):
        if key.startswith(prefix) and key[len(prefix) :] in OLD_VAL_KEYS:
            return prefix + OLD_VAL_KEYS[key[len(prefix) :]]
    return key


def read_metrics_jsonl(path: str) -> List[Dict[str, Any]]:
    """Records of a run's ``metrics.jsonl``, sorted by iteration; for an iteration logged more than once
    (a run resumed from an earlier checkpoint retrains it) the last record of each kind wins. Keys
    written by older versions are read under today's names (``current_key``).

    Raises:
        UserError: the file does not exist, or a line is not a JSON object with an "iteration" (the line
            number is named).
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such metrics file (train.py writes metrics.jsonl in the run folder)")
    by_key: Dict[tuple, Dict[str, Any]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), (int, float)):
                raise UserError(f"{path}:{number}: a record needs a numeric 'iteration'")
            record = {current_key(k): v for k, v in record.items()}
            kind = "val" if any(k.startswith("val_") for k in record) else "train"
            by_key[(int(record["iteration"]), kind)] = record
    return [by_key[k] for k in sorted(by_key)]


def plot_run(run_dir: str, path: str | None = None) -> str:
    """Draw a run folder's ``metrics.jsonl``: losses, learning rate, validation metrics, images/s.

    Args:
        run_dir (str): a run folder written by train.py.
        path (str | None): the PNG to write (default ``<run_dir>/curves.png``).

    Returns:
        str: the path written.
    """
    records = read_metrics_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    path = path or os.path.join(run_dir, "curves.png")
    train = [r for r in records if not any(k.startswith("val_") for k in r)]
    val = [r for r in records if any(k.startswith("val_") for k in r)]

    def series(rows: List[Dict[str, Any]], key: str) -> tuple[list, list]:
        pts = [(r["iteration"], r[key]) for r in rows if _finite(r.get(key)) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    val_keys = sorted({k for r in val for k in r if k.startswith("val_")})
    time_keys = [k for k in ("data_time", "compute_time") if any(k in r for r in train)]

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (ax_loss, ax_lr), (ax_val, ax_speed) = axes
    for key in loss_keys:
        x, y = series(train, key)
        ax_loss.plot(x, y, lw=2.0 if key == "loss" else 1.2, label=key)
    ax_loss.set_title("training loss (averaged over each log step)")
    if loss_keys and all(v > 0 for k in loss_keys for v in series(train, k)[1]):
        ax_loss.set_yscale("log")
    x, y = series(train, "lr")
    ax_lr.plot(x, y, color="tab:purple")
    ax_lr.set_title("learning rate")
    if y and min(y) > 0 and max(y) / min(y) > 20:
        ax_lr.set_yscale("log")
    for key in val_keys:
        x, y = series(val, key)
        ax_val.plot(x, y, marker="o", ms=4, label=key[len("val_") :])
        if y:
            ax_val.annotate(
                f"{y[-1]:.4g}", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    ax_val.set_title("validation")
    ax_val.margins(x=0.1)
    if not val_keys:
        ax_val.text(
            0.5,
            0.5,
            "no validation records",
            ha="center",
            va="center",
            transform=ax_val.transAxes,
            color="gray",
        )
    x, y = series(train, "images_per_s")
    ax_speed.plot(x, y, color="tab:green", label="images/s")
    ax_speed.set_title("throughput")
    if time_keys:
        twin = ax_speed.twinx()
        for key, color in zip(time_keys, ("tab:orange", "tab:red")):
            tx, ty = series(train, key)
            twin.plot(tx, ty, color=color, lw=1, label=f"{key} (s, right)")
        twin.set_ylabel("seconds per iteration")
        twin.set_ylim(bottom=0)
        twin.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_lr, ax_val, ax_speed):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right" if ax is not ax_val else "lower right")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_run_curves(run_dir: str) -> str | None:
    """``plot_run`` at the end of training: a failure to draw is logged as a warning, not raised, so a
    finished run is never reported as failed because of its picture. Returns the PNG path or None."""
    try:
        path = plot_run(run_dir)
    except Exception as err:  # noqa: BLE001 - the checkpoints and logs are written; the picture is extra
        logger.warning(
            "could not draw %s/curves.png (%s: %s); try plot_run.py %s",
            run_dir,
            type(err).__name__,
            err,
            run_dir,
        )
        return None
    logger.info("loss / lr / validation curves: %s", path)
    return path
