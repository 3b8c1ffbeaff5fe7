"""merge_submissions.py: hand-written submission CSVs merged per ImageId, in input order."""

import csv

import pytest

import merge_submissions
from metrics.oid.submission import read_oid_submission

BIN_0 = [
    ["ImageId", "PredictionString"],
    ["img1", "/m/a 0.9 0.1 0.2 0.3 0.4 /m/b 0.5 0 0 1 1"],
    ["img2", ""],
    ["img3", "/m/a 0.7 0.5 0.5 0.6 0.6"],
]
BIN_1 = [
    ["ImageId", "PredictionString"],
    ["img2", "/m/c 0.8 0.25 0.25 0.75 0.75"],
    ["img1", "/m/c 0.3 0 0 0.5 0.5"],
    ["img4", ""],
]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(path)


def run(*argv):
    return merge_submissions.main(merge_submissions.get_args_parser().parse_args(list(argv)))


def test_merge_concatenates_per_image_in_input_order(tmp_path, capsys):
    a, b = write_csv(tmp_path / "bin_0.csv", BIN_0), write_csv(tmp_path / "bin_1.csv", BIN_1)
    out = str(tmp_path / "out" / "merged.csv")
    stats = run("--inputs", a, b, "--output", out)
    assert stats["num_images"] == 4 and stats["num_predictions"] == 5
    assert [(f["num_rows"], f["num_predictions"]) for f in stats["per_file"]] == [(3, 3), (3, 2)]
    with open(out, newline="") as f:
        assert list(csv.reader(f)) == [
            ["ImageId", "PredictionString"],
            ["img1", "/m/a 0.9 0.1 0.2 0.3 0.4 /m/b 0.5 0 0 1 1 /m/c 0.3 0 0 0.5 0.5"],
            ["img2", "/m/c 0.8 0.25 0.25 0.75 0.75"],
            ["img3", "/m/a 0.7 0.5 0.5 0.6 0.6"],
            ["img4", ""],
        ]
    assert read_oid_submission(out)["img1"][2] == ("/m/c", 0.3, 0.0, 0.0, 0.5, 0.5)
    assert f"-> {out}: 4 images, 5 predictions" in capsys.readouterr().out


def test_bad_inputs_stop_with_the_option_named(tmp_path):
    a = write_csv(tmp_path / "bin_0.csv", BIN_0)
    with pytest.raises(SystemExit, match="--inputs: file"):
        run("--inputs", a, str(tmp_path / "missing.csv"), "--output", str(tmp_path / "m.csv"))
    with pytest.raises(SystemExit, match="--output"):
        run("--inputs", a, "--output", a)
    bad = write_csv(tmp_path / "bad.csv", [["ImageId", "PredictionString"], ["img1", "/m/a 0.9 0.1"]])
    with pytest.raises(ValueError, match="bad.csv:2: prediction string of img1"):
        run("--inputs", a, bad, "--output", str(tmp_path / "m.csv"))
    assert not (tmp_path / "m.csv").exists()
