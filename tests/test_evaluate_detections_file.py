"""evaluate.py --detections: a file that is not a COCO results list is named in one message."""

import json

import pytest
from tiny_shapes import make_tiny_shapes

import evaluate
from utils.errors import UserError, run_cli


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def _evaluate(data_root, detections):
    argv = [
        "--detections",
        str(detections),
        "--data_root",
        data_root,
        "--dataset",
        "shapes",
        "--val_sets",
        "val",
    ]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--device", "cpu", "--metric", "voc"]))


def test_invalid_json_names_the_file(data_root, tmp_path, capsys):
    broken = tmp_path / "results.json"
    broken.write_text('[{"image_id": 1, ')
    with pytest.raises(UserError, match=r"--detections .*results.json: not a valid JSON file: Expecting"):
        _evaluate(data_root, broken)
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text(json.dumps({"annotations": []}))
    with pytest.raises(UserError, match=r"dict.json: expected a COCO results list .* got a JSON dict"):
        _evaluate(data_root, not_a_list)
    # From the command line: one line, no traceback, exit status 2.
    with pytest.raises(SystemExit) as e:
        argv = [
            "--detections",
            str(broken),
            "--data_root",
            data_root,
            "--dataset",
            "shapes",
            "--val_sets",
            "val",
        ]
        run_cli(evaluate.main, evaluate.get_args_parser(), argv + ["--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "results.json: not a valid JSON file" in err and "Traceback" not in err


def test_valid_results_are_scored(data_root, tmp_path):
    gt = json.load(open(f"{data_root}/shapes/annotations/val.json"))
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(perfect))
    assert _evaluate(data_root, path)["detections"]["voc_map_area"] == pytest.approx(1.0)
