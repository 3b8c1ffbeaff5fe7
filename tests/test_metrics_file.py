import json
import math

import numpy as np

from metrics.metrics_file import dumps_two_levels, json_safe, metrics_record, write_metrics_file


def test_json_safe_writes_nan_and_inf_as_null_and_numpy_as_python():
    out = json_safe({"a": float("nan"), "b": [np.float32(0.5), np.int64(3), float("inf")], "c": np.arange(2)})
    assert out == {"a": None, "b": [0.5, 3, None], "c": [0, 1]}
    assert isinstance(out["b"][1], int)


def test_record_keeps_headline_and_every_metric_but_the_tables(tmp_path):
    metrics = {
        "voc": {"map_area": 0.5, "ap_area": {"cat": 0.5, "dog": float("nan")}, "table": "..."},
        "coco": {"AP": 0.25, "precision": [[[0.5, -1.0]]], "summary": "text"},
    }
    headline = {"voc_map_area": 0.5, "voc_map_07_11pt": 0.45, "coco_AP": 0.25}
    path = str(tmp_path / "metrics_x.json")
    write_metrics_file(path, headline, metrics, inference={"images_per_s": 12.5})
    with open(path) as f:
        text = f.read()
    back = json.loads(text)  # strict JSON: no NaN literal
    assert "NaN" not in text
    assert {k: back[k] for k in headline} == headline  # the Makefile's `make demo` reads these two
    assert back["voc"] == {"map_area": 0.5, "ap_area": {"cat": 0.5, "dog": None}}
    assert back["coco"]["precision"] == [[[0.5, -1.0]]] and back["coco"]["summary"] == "text"
    assert back["inference"] == {"images_per_s": 12.5}
    # One line per top-level key and per key of a metric: the headline reads at a glance.
    assert text.splitlines()[1] == '  "voc_map_area": 0.5,'
    assert '    "precision": [[[0.5, -1.0]]],' in text.splitlines()
    assert metrics["voc"]["table"] == "..."  # the caller's dict is untouched


def test_dumps_two_levels_round_trips():
    record = json_safe({"x": 1, "d": {"a": [1, 2], "b": {"c": math.pi}}, "e": {}, "s": "t"})
    assert json.loads(dumps_two_levels(record)) == record
    assert metrics_record({"h": 1}, {}) == {"h": 1}
