import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_small_bench_prints_one_json_line_with_times_and_ratios():
    out = subprocess.run(
        [sys.executable, "bench/bench_eval.py", "--small"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["small"] is True
    for key in ("voc_s", "coco_pycocotools_s", "coco_faster_s", "voc_on_coco_s", "oid_s"):
        assert result[key] > 0, key
    assert result["ratio_coco_fast_vs_pycocotools"] == result["coco_faster_s"] / result["coco_pycocotools_s"]
    assert result["ratio_voc_vs_pycocotools"] == result["voc_on_coco_s"] / result["coco_pycocotools_s"]
    # The synthetic detections are informative (copies of the ground truth rank high), and both COCO
    # backends agree on the 12 numbers.
    assert 0.3 < result["voc_map_area"] < 0.95 and 0.2 < result["oid_map"] < 0.95
    assert 0.1 < result["coco_AP_pycocotools"] < 0.9 and result["coco_12_max_abs_diff"] < 1e-12
    assert result["voc_num_detections"] == 200 * 30 and result["oid_num_detections"] == 300 * 20


def test_unknown_case_is_a_clean_error():
    out = subprocess.run(
        [sys.executable, "bench/bench_eval.py", "--small", "--cases", "lvis"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode != 0 and "unknown ['lvis']" in out.stderr
