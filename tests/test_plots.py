import json
import subprocess
import sys

import numpy as np
import pytest

from engine import compute_metrics
from metrics.metrics_file import metrics_record
from metrics.voc import pr_envelope
from utils.errors import UserError
from utils.plots import plot_pr_curves, plot_run, pr_curve_series, read_metrics_jsonl

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
from bench_eval import synthetic_case  # noqa: E402


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


@pytest.fixture(scope="module")
def metrics():
    gt, dets = synthetic_case(np.random.default_rng(0), 60, 5, 2.4, 12, difficult_frac=0.1)
    gt["categories"].append({"id": 99, "name": "unicorn"})  # no ground truth
    return compute_metrics(gt, dets, "all")


def test_pr_envelope_hand_computed():
    # TP, FP, TP over 2 positives: recall 0.5, 0.5, 1; precision 1, 0.5, 2/3 -> envelope 1 up to
    # recall 0.5, then 2/3 up to 1.
    curve = np.array(pr_envelope(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])))
    t = np.linspace(0, 1, 101)
    np.testing.assert_allclose(curve, np.where(t <= 0.5, 1.0, 2 / 3), atol=1e-6)
    # Recall stops at 0.3: zero beyond.
    curve = np.array(pr_envelope(np.array([0.1, 0.3]), np.array([1.0, 0.5])))
    np.testing.assert_allclose(curve, np.where(t <= 0.1, 1.0, np.where(t <= 0.3, 0.5, 0.0)), atol=1e-6)
    assert pr_envelope(np.zeros(0), np.zeros(0)) == [0.0] * 101


def test_pr_series_from_metrics_and_from_the_metrics_file(metrics):
    series = pr_curve_series(metrics)
    assert list(series) == ["class_1", "class_2", "class_3", "class_4", "class_5", "unicorn"]
    labels = [c[0] for c in series["class_1"]["curves"]]
    assert labels == ["VOC IoU 0.5", "COCO IoU 0.5", "COCO IoU 0.75"]
    label, recall, precision, ap = series["class_1"]["curves"][0]
    assert ap == metrics["voc"]["ap_area"]["class_1"] and len(recall) == len(precision) == 101
    # COCO's curve is its own precision array at IoU 0.5.
    coco = np.array(metrics["coco"]["precision"])
    np.testing.assert_array_equal(series["class_2"]["curves"][1][2], coco[0, :, 1])
    assert series["unicorn"]["curves"] == [] and series["unicorn"]["num_gt"] == 0
    # The same from what the metrics file holds (NaN written as null).
    from_file = pr_curve_series(json.loads(json.dumps(metrics_record({}, metrics))))
    assert [c[3] for c in from_file["class_3"]["curves"]] == [c[3] for c in series["class_3"]["curves"]]


def test_plot_pr_curves_writes_a_png(metrics, tmp_path):
    path = plot_pr_curves(metrics, str(tmp_path / "pr.png"), title="test")
    image = read_png(path)
    # 7 panels (mean + 6 classes) in rows of 6: two rows, 6 columns of 2.6 in at 90 dpi.
    assert image.shape[1] == pytest.approx(6 * 2.6 * 90, abs=2) and image.shape[0] > 2 * 2.5 * 90
    assert image[..., :3].std() > 0.05  # something is drawn
    with pytest.raises(UserError, match="no precision/recall curves"):
        plot_pr_curves({"coco": {}}, str(tmp_path / "x.png"))


def test_many_classes_keep_those_with_most_ground_truth(monkeypatch, tmp_path):
    import utils.plots as plots

    gt, dets = synthetic_case(np.random.default_rng(1), 40, 8, 3.0, 10)
    metrics = compute_metrics(gt, dets, "voc")
    monkeypatch.setattr(plots, "MAX_CLASS_PANELS", 3)
    path = plots.plot_pr_curves(metrics, str(tmp_path / "pr.png"))
    assert read_png(path).shape[1] == pytest.approx(4 * 2.6 * 90, abs=2)  # mean + 3 panels in one row


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_read_metrics_jsonl_keeps_the_last_record_of_a_resumed_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(
        path,
        [
            {"iteration": 10, "loss": 3.0, "lr": 0.01},
            {"iteration": 20, "loss": 2.0, "lr": 0.01},
            {"iteration": 20, "val_map50_area": 0.1},
            {"iteration": 20, "loss": 2.5, "lr": 0.01},  # resumed from iteration 10: retrained
            {"iteration": 30, "loss": 1.0, "lr": 0.001},
        ],
    )
    records = read_metrics_jsonl(str(path))
    assert [(r["iteration"], r.get("loss")) for r in records] == [(10, 3.0), (20, 2.5), (20, None), (30, 1.0)]
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:6: not JSON"):
        read_metrics_jsonl(str(path))
    with pytest.raises(UserError, match="no such metrics file"):
        read_metrics_jsonl(str(tmp_path / "missing.jsonl"))


def test_old_validation_keys_are_read_under_todays_names(tmp_path):
    """metrics.jsonl of a run from before engine.metric_summary, resumed after it: one curve per number."""
    path = tmp_path / "metrics.jsonl"
    old = {"iteration": 10, "val_map50_07": 0.1, "val_map50_area": 0.2, "val_ema_map50_area": 0.3}
    old.update(val_coco_ap=0.05, val_images=5, val_skipped_images=1, val_oid_map=0.4)
    new = {"iteration": 20, "val_voc_map_07_11pt": 0.15, "val_voc_map_area": 0.25, "val_coco_AP": 0.06}
    write_jsonl(path, [{"iteration": 10, "loss": 1.0}, old, new])
    _, first, second = read_metrics_jsonl(str(path))
    assert first == {
        "iteration": 10,
        "val_voc_map_07_11pt": 0.1,
        "val_voc_map_area": 0.2,
        "val_ema_voc_map_area": 0.3,
        "val_coco_AP": 0.05,
        "val_num_images": 5,
        "val_skipped_images": 1,
        "val_oid_map": 0.4,
    }
    assert second == new


def test_plot_run_and_the_script(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = []
    for it in range(10, 101, 10):
        records.append(
            {
                "iteration": it,
                "lr": 0.01 * (0.1 if it > 70 else 1),
                "loss": 3 / it,
                "loss_c": 2 / it,
                "images_per_s": 10.0,
                "data_time": 0.1,
                "compute_time": 0.5,
            }
        )
        if it % 50 == 0:
            records.append({"iteration": it, "val_map50_area": it / 200})
    write_jsonl(run / "metrics.jsonl", records)
    path = plot_run(str(run))
    assert path == str(run / "curves.png") and read_png(path).shape[:2] == (675, 1080)
    out = subprocess.run(
        [sys.executable, "plot_run.py", str(run), "--out", str(tmp_path / "c.png")],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    )
    assert out.returncode == 0 and (tmp_path / "c.png").is_file(), out.stderr
    out = subprocess.run(
        [sys.executable, "plot_run.py", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    )
    assert out.returncode == 2 and "no such run folder" in out.stderr
