"""COCO detection metrics through pycocotools (the reference) or faster-coco-eval, from in-memory dicts.

The ground truth is a common-format dict (or the path of one). pycocotools reads image ids, category ids,
bbox, area and iscrowd; it ignores our extra fields, so a VOC ``difficult`` box counts as an ordinary box
under the COCO metrics (only ``iscrowd`` boxes are ignore regions). Detections are COCO results:
{"image_id", "category_id" (original id), "bbox" [x, y, w, h] abs px, "score"}.
"""

import contextlib
import io
import json
import logging
import os
from typing import Any

import numpy as np

from utils.errors import UserError

logger = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize() for bbox / segm, in its order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Rounding of written results: 0.01 px moves an IoU by at most ~1e-4 on a 10 px box and keeps result
# files about half the size; 5 decimals of score keep the ranking except between scores closer than 1e-5.
BOX_DECIMALS = 2
SCORE_DECIMALS = 5


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco_results(
    per_image_outputs: list[dict], image_ids: list[int], category_ids: list[int]
) -> list[dict]:
    """Convert per-image detector outputs to COCO results.

    Args:
        per_image_outputs (list[dict]): one dict per image with boxes (Tensor/ndarray[D, 4], xyxy, original
            image pixels), scores (Tensor/ndarray[D]) and labels (Tensor/ndarray[D] int, training labels
            0..K-1), as returned by the postprocessor.
        image_ids (list[int]): image id of each entry of per_image_outputs.
        category_ids (list[int]): original category id of each training label (the dataset's
            ``category_ids``).

    Returns:
        list[dict]: {"image_id": int, "category_id": int, "bbox": [x, y, w, h] (floats rounded to
        BOX_DECIMALS), "score": float (rounded to SCORE_DECIMALS)}, images in input order, detections in
        the order of each image's output.

    Raises:
        ValueError: lengths differ, or a label is outside 0..K-1 (the image id is named).
    """
    if len(per_image_outputs) != len(image_ids):
        raise UserError(
            f"detections_to_coco_results: {len(per_image_outputs)} outputs but {len(image_ids)} image ids"
        )
    cat_lookup = np.asarray(category_ids, dtype=np.int64)
    results: list[dict] = []
    for output, image_id in zip(per_image_outputs, image_ids):
        boxes = _to_numpy(output["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _to_numpy(output["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(output["labels"]).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise UserError(
                f"detections_to_coco_results: image {image_id} has {len(boxes)} boxes, {len(scores)} scores, "
                f"{len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_lookup)):
            raise UserError(
                f"detections_to_coco_results: image {image_id} has labels outside 0..{len(cat_lookup) - 1}: "
                f"{sorted(set(labels[(labels < 0) | (labels >= len(cat_lookup))].tolist()))}"
            )
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(BOX_DECIMALS)
        image_id = int(image_id)
        results.extend(
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(
                cat_lookup[labels].tolist(), xywh.tolist(), scores.round(SCORE_DECIMALS).tolist()
            )
        )
    return results


def write_coco_results(detections: list[dict], path: str) -> None:
    """Write COCO results JSON (atomically: a partial file never replaces a good one)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w") as f:
        json.dump(detections, f)
    os.replace(tmp_path, path)


def _load_json(obj: dict | list | str, what: str) -> Any:
    if isinstance(obj, str):
        try:
            with open(obj) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"evaluate_coco: cannot read {what} file {obj}: {err}") from err
    return obj


def _check_inputs(gt: dict, detections: list[dict], source: str) -> None:
    missing = [a.get("id") for a in gt["annotations"] if not {"iscrowd", "area", "bbox"} <= a.keys()]
    if missing:
        raise UserError(f"{source}: ground-truth annotations {missing[:10]} lack iscrowd, area or bbox")
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {c["id"] for c in gt["categories"]}
    det_images = {d["image_id"] for d in detections}
    det_categories = {d["category_id"] for d in detections}
    if det_categories - category_ids:
        # pycocotools would silently skip these.
        raise UserError(
            f"{source}: detections have unknown category ids {sorted(det_categories - category_ids)[:20]}"
        )
    if det_images - image_ids:
        unknown = sorted(det_images - image_ids)
        raise UserError(
            f"{source}: detections for {len(unknown)} image ids not in the ground truth, e.g. {unknown[:10]}"
        )


COCO_BACKENDS = ("pycocotools", "faster")


def _coco_classes(backend: str) -> tuple[Any, Any]:
    """(COCO, COCOeval) of a backend; imported here so that the VOC/OID paths need neither."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as err:
            raise UserError(
                "--coco_backend faster needs the faster-coco-eval package (pip install faster-coco-eval)"
            ) from err

        def make_eval(coco_gt: Any, coco_dt: Any, iou_type: str) -> Any:
            return COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=logger.debug)

        return COCO, make_eval
    raise UserError(f"coco backend must be one of {COCO_BACKENDS}, got {backend!r}")


def _rounded(array: np.ndarray, digits: int = 6) -> list:
    """Nested lists of floats with ``digits`` decimals (keeps the metrics JSON small; -1 stays -1)."""
    return np.round(np.asarray(array, dtype=np.float64), digits).tolist()


def evaluate_coco(
    gt: dict | str, detections: list[dict] | str, iou_type: str = "bbox", backend: str = "pycocotools"
) -> dict:
    """COCO AP/AR with COCOeval (default parameters) of pycocotools or faster-coco-eval.

    Args:
        gt (dict | str): common-format ground truth, or the path of its JSON.
        detections (list[dict] | str): COCO results, or the path of a results JSON.
        iou_type (str): "bbox" or "segm".
        backend (str): "pycocotools" (the reference) or "faster" (faster-coco-eval's C++ COCOeval_faster,
            same 12 numbers and precision/recall arrays; tests/test_coco_eval.py checks it on the same data).

    Returns:
        dict with the 12 numbers of COCO_STAT_NAMES (float; -1 where there is no ground truth for that area
        range), "summary" (the text summarize() prints), "backend", "num_detections", and, per class
        (``class_names``, in category order; NaN for classes without ground truth): "ap_per_class" (AP at
        IoU 0.50:0.95, area all, 100 detections), "ap50_per_class", "ap75_per_class", "ar100_per_class";
        and the curves: "iou_thresholds" [T], "recall_thresholds" [R], "precision" [T][R][K] (area all,
        100 detections, -1 where a class has no ground truth) and "recall" [T][K] (the same selection).

    With no detections pycocotools' loadRes fails (it indexes the first result); the evaluation is then run
    against an empty result set instead, which gives AP = AR = 0 wherever there is ground truth, and a
    warning is logged.
    """
    if iou_type not in ("bbox", "segm"):
        raise UserError(f"evaluate_coco: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    COCO, COCOeval = _coco_classes(backend)
    gt = _load_json(gt, "ground-truth")
    detections = _load_json(detections, "detections")
    if not isinstance(detections, list):
        raise UserError("evaluate_coco: detections must be a list of COCO result dicts")
    _check_inputs(gt, detections, "evaluate_coco")

    noise = io.StringIO()  # pycocotools prints progress; keep it out of our logs unless debugging
    with contextlib.redirect_stdout(noise):
        coco_gt = COCO()
        # Shallow copies: COCOeval writes an "ignore" key into the annotation dicts it is given and
        # loadRes adds fields to the result dicts.
        coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        else:
            logger.warning("evaluate_coco: no detections; every AP and AR with ground truth is 0")
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt["images"]),
                "categories": list(gt["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
    logger.debug("%s: %s", backend, noise.getvalue())
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()

    result: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, coco_eval.stats)}
    result["summary"] = summary.getvalue()
    result["backend"] = backend
    result["num_detections"] = len(detections)
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max-dets]; -1 = no gt.
    # recall: [T, K, A, M]. Area range 0 is "all", max-dets -1 is 100.
    precision = np.asarray(coco_eval.eval["precision"])[:, :, :, 0, -1]
    recall = np.asarray(coco_eval.eval["recall"])[:, :, 0, -1]
    iou_thrs = np.asarray(coco_eval.params.iouThrs)
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    class_names = [names[cat_id] for cat_id in coco_eval.params.catIds]

    def mean_valid(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else float("nan")

    t50, t75 = int(np.argmin(np.abs(iou_thrs - 0.5))), int(np.argmin(np.abs(iou_thrs - 0.75)))
    result["class_names"] = class_names
    result["ap_per_class"] = {n: mean_valid(precision[:, :, k]) for k, n in enumerate(class_names)}
    result["ap50_per_class"] = {n: mean_valid(precision[t50, :, k]) for k, n in enumerate(class_names)}
    result["ap75_per_class"] = {n: mean_valid(precision[t75, :, k]) for k, n in enumerate(class_names)}
    result["ar100_per_class"] = {n: mean_valid(recall[:, k]) for k, n in enumerate(class_names)}
    result["iou_thresholds"] = _rounded(iou_thrs)
    result["recall_thresholds"] = _rounded(coco_eval.params.recThrs)
    result["precision"] = _rounded(precision, 4)
    result["recall"] = _rounded(recall, 4)
    return result
