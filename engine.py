"""The one training/inference engine, shared by train.py, evaluate.py, demo.py and extract_features.py.

Here: one training step (``train_one_iter``), inference (``predict``), scoring (``evaluate``,
``compute_metrics``) and the headline numbers of a score (``metric_summary``). train.py's loop, with
its logging, checkpointing and validation hooks, is in training.py.

Every architecture plugs in through the same three objects returned by ``models.build_model``:
``outputs = model(images, targets)``, ``loss_dict = criterion(outputs, targets)`` and
``detections = postprocessor(outputs, targets)``, so nothing here knows which detector it runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import Tensor

from metrics.coco import detections_to_coco_results, evaluate_coco
from metrics.voc import evaluate_voc, format_voc_table
from models.predictor import Detector  # noqa: F401 (the Python inference API: from engine import Detector)
from utils import distributed as dist_utils

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term is NaN or infinite; the message names the iteration and the terms."""


def targets_to_device(targets: List[Dict[str, Any]], device: torch.device) -> List[Dict[str, Any]]:
    """Move the tensors of each target dict to ``device`` (strings and ints stay as they are)."""
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast for ``amp_dtype`` on ``device``, or a no-op when AMP is off."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_iter(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    images: Tensor,
    targets: List[Dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    iteration: int,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad: float = 0.0,
) -> Dict[str, float]:
    """One forward/backward/step. Returns the loss terms (and ``loss``, their sum) as floats.

    images (Tensor[N, 3, H, W]) and targets must already be on the model's device. ``iteration`` counts
    from 0 (the message names it from 1, as the logs and checkpoints do). Raises NonFiniteLossError
    before the backward pass when any term is not finite, on every process of a distributed run when
    any one of them sees it, so the weights (and the last checkpoint) are left as they were.
    """
    model.train()
    with autocast_context(images.device, amp_dtype):
        outputs = model(images, targets)
        loss_dict = criterion(outputs, targets)
    loss = sum(loss_dict.values())
    # note: .item() is a host-device sync; we need it anyway for the finite check and the log line.
    terms = {name: value.detach().float().item() for name, value in loss_dict.items()}
    finite = all(math.isfinite(v) for v in terms.values())
    where = ""
    if dist_utils.is_distributed():
        # Every process must stop together: one that raised alone would leave the others waiting
        # forever in DDP's gradient all-reduce.
        finite = dist_utils.all_true(finite, loss.device)
        where = " (on this process or another)"
    if not finite:
        raise NonFiniteLossError(
            f"non-finite loss at iteration {iteration + 1}{where}: "
            + ", ".join(f"{k}={v}" for k, v in terms.items())
            + ". Stopping; the last saved checkpoint is untouched. "
            "Try a lower --lr, --clip_grad or --warmup_iters."
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
    terms["loss"] = sum(terms.values())
    return terms


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    postprocessor: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    return_features: bool = False,
    progress: bool = False,
    skipped: List[str] | None = None,
) -> Iterable[Tuple[List[Dict[str, Any]], List[Dict[str, Tensor]], Dict[str, Any]]]:
    """Batched inference. Yields ``(targets, detections, outputs)`` per batch.

    detections are the postprocessor's per-image dicts (boxes in original image pixels) moved to
    the CPU. ``outputs`` is the raw model output (kept on device) for feature extraction.
    skipped: when given, the file names of the images the loader skipped (--skip_bad_images) are
    appended to it.
    """
    model.eval()
    iterator = data_loader
    if progress:  # images/s and ETA: a bar on a terminal, a log line every 30 s otherwise
        from utils.logger import iterate_with_progress

        iterator = iterate_with_progress(data_loader)
    for images, targets, skipped_in_batch in iterator:
        if skipped is not None:
            skipped.extend(skipped_in_batch)
        if len(targets) == 0:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets_to_device(targets, device)
        with autocast_context(device, amp_dtype):
            outputs = (
                model(images, None, return_features=return_features) if return_features else model(images)
            )
        detections = postprocessor(outputs, targets)
        detections = [
            {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()}
            for d in detections
        ]
        yield targets, detections, outputs


def run_inference(
    model: torch.nn.Module,
    postprocessor: torch.nn.Module,
    data_loader: Iterable,
    category_ids: List[int],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    skipped: List[str] | None = None,
) -> Tuple[List[Dict[str, Any]], float]:
    """Detections for a whole loader as COCO results (original category ids). Returns (results, seconds).

    skipped: see ``predict``.
    """
    results: List[Dict[str, Any]] = []
    start = time.time()
    for targets, detections, _ in predict(
        model, postprocessor, data_loader, device, amp_dtype, progress=progress, skipped=skipped
    ):
        image_ids = [int(t["image_id"]) for t in targets]
        results.extend(detections_to_coco_results(detections, image_ids, category_ids))
    return results, time.time() - start


def compute_metrics(
    gt: Dict[str, Any],
    results: List[Dict[str, Any]],
    metric: str = "voc",
    iou_thresh: float = 0.5,
    hierarchy: Any = None,
    all_classes_gt: Dict[str, Any] | None = None,
    coco_backend: str = "pycocotools",
    group_of_weight: float = 1.0,
) -> Dict[str, Any]:
    """Score COCO-format results against a common-format ground truth dict.

    metric: "voc" (VOC07 11-point and area AP at ``iou_thresh``), "coco" (pycocotools' 12 numbers),
    "oid" (Open Images challenge metric; needs the class hierarchy) or "all" (voc + coco).
    all_classes_gt: for "oid" when ``gt`` holds a class subset, the ground truth of every class
    (``dataset.coco_gt(all_classes=True)``): the hierarchy is expanded over all classes and then
    ``gt``'s categories are kept, so a parent class in the subset also gets its children's boxes.
    coco_backend: "pycocotools" (the reference) or "faster" (faster-coco-eval, same numbers).
    group_of_weight: for "oid", what a group-of box counts as (see metrics.oid.metric.evaluate_oid).
    Returns {"voc": {...}, "coco": {...}, "oid": {...}} for the metrics run, each with a "table" string
    (the COCO one: "summary") and everything the evaluator computed (see metrics.metrics_file).
    """
    out: Dict[str, Any] = {}
    if metric in ("voc", "all"):
        voc = evaluate_voc(gt, results, iou_thresh=iou_thresh)
        voc["table"] = format_voc_table(voc)
        out["voc"] = voc
    if metric in ("coco", "all"):
        out["coco"] = evaluate_coco(gt, results, backend=coco_backend)
    if metric == "oid":
        from metrics.oid.metric import evaluate_oid, format_oid_table

        oid = evaluate_oid(
            gt if all_classes_gt is None else all_classes_gt,
            results,
            hierarchy=hierarchy,
            category_ids=[int(c["id"]) for c in gt["categories"]],
            group_of_weight=group_of_weight,
        )
        oid["table"] = format_oid_table(oid)
        out["oid"] = oid
    return out


def metric_summary(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The headline numbers of ``compute_metrics`` (or ``evaluate``) output as one flat dict.

    The one naming of these numbers: evaluate.py returns and writes these keys (its metrics file's top
    level), and train.py's validation logs them prefixed ``val_`` (``val_ema_`` for the EMA weights) in
    metrics.jsonl. A key is ``<metric>_<key in that metric's dict>``, each present when its metric ran:
    ``voc_map_07_11pt`` and ``voc_map_area`` (VOC07 11-point and area-under-curve AP at the IoU
    threshold), ``coco_AP``, ``coco_AP50``, ``coco_AP75``, ``oid_map``; and ``num_images`` (scored) and
    ``skipped_images`` when ``metrics`` has ``evaluate``'s image counts.
    """
    summary: Dict[str, float] = {}
    if "images" in metrics:
        summary["num_images"] = metrics["images"]["evaluated"]
        summary["skipped_images"] = metrics["images"]["skipped"]
    if "voc" in metrics:
        summary.update({f"voc_{k}": metrics["voc"][k] for k in ("map_07_11pt", "map_area")})
    if "coco" in metrics:
        summary.update({f"coco_{k}": metrics["coco"][k] for k in ("AP", "AP50", "AP75")})
    if "oid" in metrics:
        summary["oid_map"] = metrics["oid"]["map"]
    return summary


def gt_without_images(gt: Dict[str, Any], image_ids: set) -> Dict[str, Any]:
    """``gt`` (common-format dict) without the images ``image_ids`` and their annotations (a new dict)."""
    if not image_ids:
        return gt
    return {
        **gt,
        "images": [im for im in gt["images"] if int(im["id"]) not in image_ids],
        "annotations": [a for a in gt["annotations"] if int(a["image_id"]) not in image_ids],
    }


def evaluate(
    model: torch.nn.Module,
    postprocessor: torch.nn.Module,
    data_loader: Iterable,
    dataset: Any,
    device: torch.device,
    metric: str = "voc",
    iou_thresh: float = 0.5,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    sharded: bool = False,
    metric_options: Dict[str, Any] | None = None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Inference over ``data_loader`` and the chosen metrics against ``dataset.coco_gt()``.

    Used for validation during training and by evaluate.py, so both report the same numbers.
    sharded: in a distributed run, every rank passes a loader over its own block of the dataset
    (``dist_utils.shard_range``, as ``indices`` of build_eval_loader); the detections are gathered on
    rank 0, which alone scores them: the other ranks return ``({}, [])``. A collective then.
    Images the loader skipped (unreadable, with --skip_bad_images) are left out of the ground truth too,
    so they count neither as misses nor as found; ``metrics["images"]`` says how many were scored and
    skipped (``{"evaluated": M, "skipped": N, "skipped_files": [...]}``), and a warning says so.
    metric_options: more keyword arguments of ``compute_metrics`` (coco_backend, group_of_weight).
    The metrics also get "inference": {num_images, seconds, images_per_s}.
    """
    skipped: List[str] = []
    results, seconds = run_inference(
        model, postprocessor, data_loader, dataset.category_ids, device, amp_dtype, progress, skipped
    )
    if sharded and dist_utils.is_distributed():
        gathered = dist_utils.gather_lists([(results, skipped)])
        if gathered is None:  # not rank 0: it scores
            return {}, []
        results = [r for part, _ in gathered for r in part]
        skipped = [f for _, part in gathered for f in part]
    num_images = len(dataset)
    logger.info(
        "inference on %d images took %.1f s (%.1f images/s)",
        num_images,
        seconds,
        num_images / max(seconds, 1e-9),
    )
    skipped_ids = skipped_image_ids(dataset, skipped)
    gt = gt_without_images(dataset.coco_gt(), skipped_ids)
    metrics = compute_metrics(
        gt,
        results,
        metric,
        iou_thresh,
        hierarchy=getattr(dataset, "hierarchy", None),
        all_classes_gt=(
            gt_without_images(dataset.coco_gt(all_classes=True), skipped_ids) if metric == "oid" else None
        ),
        **(metric_options or {}),
    )
    metrics["images"] = {
        "evaluated": len(gt["images"]),
        "skipped": len(skipped),
        "skipped_files": sorted(skipped),
    }
    if skipped:
        logger.warning(
            "%d images skipped; metrics over %d images (--skip_bad_images; e.g. %s)",
            len(skipped),
            len(gt["images"]),
            ", ".join(sorted(skipped)[:3]),
        )
    metrics["inference"] = {
        "num_images": num_images,
        "seconds": seconds,
        "images_per_s": num_images / max(seconds, 1e-9),
    }
    return metrics, results


def skipped_image_ids(dataset: Any, skipped_files: List[str]) -> set:
    """Image ids of the skipped files (paths as the dataset reports them: ``dataset.image_path(i)``)."""
    if not skipped_files:
        return set()
    wanted = set(skipped_files)
    ids = {int(dataset.image_ids[i]) for i in range(len(dataset)) if dataset.image_path(i) in wanted}
    if len(ids) < len(wanted):
        logger.warning("%d skipped files are not images of %r", len(wanted) - len(ids), dataset)
    return ids
