"""The Open Images challenge's submission CSV: read, write, convert to COCO results, merge.

Format: a header ``ImageId,PredictionString``, then one row per image whose prediction string repeats
``LabelMID score xmin ymin xmax ymax`` with coordinates normalised to the image size.
"""

import csv
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from metrics.arrays import detections_to_arrays, gt_to_arrays, map_detections
from utils.errors import UserError

logger = logging.getLogger(__name__)

SUBMISSION_HEADER = ["ImageId", "PredictionString"]


def oid_image_key(image: dict) -> str:
    """The Open Images ImageId of a common-format image record (``oid_image_id``, else the file stem)."""
    return str(image.get("oid_image_id") or os.path.splitext(os.path.basename(image["file_name"]))[0])


def _allow_long_csv_fields() -> None:
    # One row holds all predictions of an image (and more after a merge); the csv module's default field
    # limit of 128 KiB is too small for that. The limit is module-global, so only ever raise it.
    limit = min(sys.maxsize, 2**31 - 1)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def write_oid_submission(detections: list[dict], gt_or_image_meta: dict, path: str) -> int:
    """Write detections as an Open Images challenge submission CSV.

    Args:
        detections (list[dict]): COCO results (abs px xywh, original category ids).
        gt_or_image_meta (dict): the ground truth, or any dict with its ``images`` (id, width, height,
            ``oid_image_id`` or ``file_name``) and ``categories`` (id, mid).
        path (str): output CSV, written atomically.

    Returns:
        int: number of image rows. Every image of ``gt_or_image_meta`` gets a row (an empty prediction
        string when it has no detections), in its order; predictions within a row by descending score.
        Coordinates are divided by the image size and clipped to [0, 1] (clipped boxes are counted in a
        warning).
    """
    images = gt_or_image_meta["images"]
    no_mid = [c["id"] for c in gt_or_image_meta["categories"] if not c.get("mid")]
    if no_mid:
        raise UserError(f"write_oid_submission: categories {no_mid[:10]} have no 'mid'")
    meta = {"images": images, "categories": gt_or_image_meta["categories"], "annotations": []}
    gta = gt_to_arrays(meta)
    det = detections_to_arrays(detections)
    det_img, det_cls = map_detections(gta, det, "write_oid_submission")

    sizes = np.array([[img["width"], img["height"]] for img in images], dtype=np.float64).reshape(-1, 2)
    norm = det["boxes"] / np.tile(sizes[det_img], 2)
    outside = ((norm < 0) | (norm > 1)).any(axis=1)
    if outside.any():
        logger.warning("write_oid_submission: %d boxes reach outside the image; clipped", int(outside.sum()))
    norm = np.clip(norm, 0.0, 1.0)
    mids = [c["mid"] for c in gt_or_image_meta["categories"]]

    order = np.argsort(-det["scores"], kind="mergesort")
    order = order[np.argsort(det_img[order], kind="mergesort")]
    bounds = np.searchsorted(det_img[order], np.arange(len(images) + 1))
    tmp_path = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SUBMISSION_HEADER)
        for i, img in enumerate(images):
            rows = order[bounds[i] : bounds[i + 1]]
            preds = " ".join(
                f"{mids[c]} {s:.6g} {b[0]:.6f} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f}"
                for c, s, b in zip(det_cls[rows].tolist(), det["scores"][rows].tolist(), norm[rows].tolist())
            )
            writer.writerow([oid_image_key(img), preds])
    os.replace(tmp_path, path)
    return len(images)


def iter_oid_submission(path: str) -> Iterator[tuple[str, str]]:
    """Stream (ImageId, PredictionString) rows of a submission CSV, checking the header and token counts."""
    _allow_long_csv_fields()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != SUBMISSION_HEADER:
            raise UserError(f"{path}: header must be {','.join(SUBMISSION_HEADER)}, got {header}")
        for row in reader:
            if not row:
                continue
            if len(row) != 2:
                raise UserError(f"{path}:{reader.line_num}: expected 2 fields, got {len(row)}")
            image_id, preds = row[0].strip(), row[1].strip()
            if len(preds.split()) % 6:
                raise UserError(
                    f"{path}:{reader.line_num}: prediction string of {image_id} is not a multiple of "
                    "'LabelMID score xmin ymin xmax ymax'"
                )
            yield image_id, preds


def read_oid_submission(path: str) -> dict[str, list[tuple[str, float, float, float, float, float]]]:
    """Read a submission CSV.

    Returns:
        dict ImageId -> list of (LabelMID, score, xmin, ymin, xmax, ymax) with normalised coordinates, in
        file order (an image listed twice has its predictions concatenated).
    """
    out: dict[str, list[tuple[str, float, float, float, float, float]]] = {}
    for image_id, preds in iter_oid_submission(path):
        tokens = preds.split()
        try:
            parsed = [
                (tokens[j], *(float(v) for v in tokens[j + 1 : j + 6]))  # type: ignore[misc]
                for j in range(0, len(tokens), 6)
            ]
        except ValueError as err:
            raise UserError(f"{path}: bad number in the predictions of {image_id}: {err}") from err
        out.setdefault(image_id, []).extend(parsed)
    return out


def oid_submission_to_coco_results(
    predictions: dict[str, list[tuple[str, float, float, float, float, float]]], gt: dict
) -> list[dict]:
    """Convert ``read_oid_submission`` output back to COCO results (abs px xywh, category ids of ``gt``).

    Raises:
        ValueError: an ImageId or MID that ``gt`` does not have.
    """
    image_of_key = {oid_image_key(img): img for img in gt["images"]}
    cat_of_mid = {c.get("mid"): int(c["id"]) for c in gt["categories"]}
    unknown_images = [k for k in predictions if k not in image_of_key]
    if unknown_images:
        raise UserError(
            f"submission: {len(unknown_images)} ImageIds not in the ground truth, e.g. {unknown_images[:5]}"
        )
    results = []
    unknown_mids = set()
    for key, preds in predictions.items():
        img = image_of_key[key]
        w, h = float(img["width"]), float(img["height"])
        for mid, score, x1, y1, x2, y2 in preds:
            if mid not in cat_of_mid:
                unknown_mids.add(mid)
                continue
            results.append(
                {
                    "image_id": int(img["id"]),
                    "category_id": cat_of_mid[mid],
                    "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h],
                    "score": score,
                }
            )
    if unknown_mids:
        raise UserError(
            f"submission: MIDs not among the ground-truth categories: {sorted(unknown_mids)[:10]}"
        )
    return results


def merge_oid_submissions(paths: list[str], out_path: str) -> dict[str, Any]:
    """Merge submission CSVs, e.g. from models that cover different class subsets.

    Predictions of the same ImageId are concatenated (files in the given order); an image that appears in
    any file is kept, in order of first appearance. Rows are streamed and only prediction strings are held
    (not parsed), about the size of the input files in memory.

    Returns:
        dict with num_images, num_predictions, and per_file [{path, num_rows, num_predictions}].
    """
    merged: dict[str, list[str]] = {}
    per_file = []
    for p in paths:
        num_rows = num_preds = 0
        for image_id, preds in iter_oid_submission(p):
            parts = merged.setdefault(image_id, [])
            if preds:
                parts.append(preds)
                num_preds += len(preds.split()) // 6
            num_rows += 1
        per_file.append({"path": p, "num_rows": num_rows, "num_predictions": num_preds})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path = f"{out_path}.tmp{os.getpid()}"
    with open(tmp_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SUBMISSION_HEADER)
        for image_id, parts in merged.items():
            writer.writerow([image_id, " ".join(parts)])
    os.replace(tmp_path, out_path)
    stats = {
        "num_images": len(merged),
        "num_predictions": sum(f["num_predictions"] for f in per_file),
        "per_file": per_file,
    }
    logger.info(
        "merged %d submissions: %d images, %d predictions",
        len(paths),
        stats["num_images"],
        stats["num_predictions"],
    )
    return stats
