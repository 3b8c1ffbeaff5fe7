"""The metrics JSON that evaluate.py writes next to each checkpoint: headline numbers and everything else.

Layout (``metrics_<checkpoint>_<dataset>_<splits>.json``)::

    {"voc_map_07_11pt": ..., "voc_map_area": ..., "coco_AP": ..., ...,   # headline numbers (top level)
     "inference": {"num_images", "seconds", "images_per_s"},             # when a model was run
     "voc": {<evaluate_voc's dict>}, "coco": {<evaluate_coco's>}, "oid": {<evaluate_oid's>}}

Each metric's dict is stored whole (per-class AP, counts, precision/recall curves, COCO's 12 numbers and
its precision [T][R][K] / recall [T][K] arrays) except the printed "table", which ``format_*_table``
rebuilds from it. NaN (a class without ground truth) and infinities are written as null, so the file
is strict JSON that any reader accepts.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict

import numpy as np

# Keys that are only a rendering of the rest.
_DERIVED_KEYS = ("table",)


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` with numpy scalars/arrays as Python values and non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def metrics_record(headline: Dict[str, Any], metrics: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """The metrics file's content: ``headline`` at the top level, each metric's dict under its name."""
    record: Dict[str, Any] = dict(headline)
    record.update(extra)
    for name, values in metrics.items():
        record[name] = {k: v for k, v in values.items() if k not in _DERIVED_KEYS}
    return json_safe(record)


def write_metrics_file(
    path: str, headline: Dict[str, Any], metrics: Dict[str, Any], **extra: Any
) -> Dict[str, Any]:
    """Write ``metrics_record(...)`` to ``path`` atomically (a partial file never replaces a good one)."""
    record = metrics_record(headline, metrics, **extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w") as f:
        f.write(dumps_two_levels(record))
    os.replace(tmp_path, path)
    return record


def dumps_two_levels(record: Dict[str, Any]) -> str:
    """JSON with one line per top-level key and per key of a nested dict (long arrays stay on one line,
    so the headline numbers read at a glance and a 80-class COCO precision array is not 80,000 lines)."""

    def dumps(value: Any) -> str:
        return json.dumps(value, allow_nan=False)

    lines = []
    for key, value in record.items():
        if isinstance(value, dict) and value:
            inner = ",\n".join(f"    {dumps(k)}: {dumps(v)}" for k, v in value.items())
            lines.append(f"  {dumps(key)}: {{\n{inner}\n  }}")
        else:
            lines.append(f"  {dumps(key)}: {dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
