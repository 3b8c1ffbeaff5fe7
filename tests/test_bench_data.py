"""bench/bench_data.py: both modes run (--tiny) and report consistent figures; the v2 peer is a working
pipeline over the same files and boxes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_shapes import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_data  # noqa: E402


def run_bench(tmp_path, *extra):
    json_out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_data.py"), "--tiny", "--json_out", str(json_out)]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])  # the JSON line is the last one
    assert json.loads(json_out.read_text()) == record
    return record


def test_per_worker_mode_reports_both_rates_and_their_ratio(tmp_path):
    record = run_bench(tmp_path)
    assert record["mode"] == "per_worker" and record["input_dim"] == 600
    for key in ("ours_samples_per_s", "v2_samples_per_s", "ours_wall_samples_per_s", "v2_wall_samples_per_s"):
        assert record[key] > 0
    # our seconds per sample over v2's
    expected = (1 / record["ours_samples_per_s"]) / (1 / record["v2_samples_per_s"])
    assert record["ratio_ours_vs_v2"] == pytest.approx(expected, rel=1e-9)
    assert record["num_samples"] == 2 * record["batch_size"]  # --tiny: 2 timed batches of 2


def test_loader_mode_reports_images_per_second(tmp_path):
    record = run_bench(tmp_path, "--loader", "--input_dim", "128")
    assert record["mode"] == "loader" and record["input_dim"] == 128
    assert (record["workers"], record["batch_size"], record["num_batches"]) == (2, 2, 2)
    assert record["persistent_workers"] is True and record["prefetch_factor"] == 4
    assert record["loader_images_per_s"] > 0
    assert record["loader_images_per_s"] == pytest.approx(record["loader_batches_per_s"] * 2, rel=1e-9)
    assert record["images_per_s_per_worker"] == pytest.approx(record["loader_images_per_s"] / 2, rel=1e-9)


def test_synthetic_set_and_both_pipelines(tmp_path):
    """The files load in our dataset with the boxes written; both pipelines give --input_dim samples whose
    boxes lie inside the input."""
    stats = bench_data.write_jpeg_dataset(str(tmp_path), 4)
    dataset = bench_data.training_dataset(str(tmp_path), 96)
    assert len(dataset) == 4 and stats["mean_file_kb"] > 10
    assert [tuple(s) for s in dataset.image_sizes] == [(375, 500), (480, 640), (375, 500), (480, 640)]
    assert sum(len(dataset.raw_target(i)["boxes"]) for i in range(4)) == round(4 * stats["boxes_per_image"])
    v2 = bench_data.V2Pipeline(dataset, 96)
    for seed in range(6):
        # ours clips to the input exactly; v2's resize lands a float rounding past it (96.0000076)
        for (image, target), slack in ((dataset[seed % 4], 0), (v2[(seed % 4, seed)], 1e-4)):
            assert image.shape == (3, 96, 96) and image.dtype == torch.float32
            boxes = target["boxes"]
            assert ((boxes >= -slack) & (boxes <= 96 + slack)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            assert len(target["labels"]) == len(boxes)


def test_counts_are_checked():
    parser = bench_data.get_args_parser()
    with pytest.raises(SystemExit, match="--num_batches must be >= 1, got 0"):
        bench_data.resolve_counts(parser.parse_args(["--num_batches", "0"]))
    loader = bench_data.resolve_counts(parser.parse_args(["--loader", "--workers", "4"]))
    # one epoch holds the warm-up (2 per worker) and the timed batches
    assert (loader.batch_size, loader.num_batches, loader.warmup_batches) == (24, 50, 8)
    assert loader.num_images == 24 * 58
