"""--config FILE: a run's args.json (or any JSON of options) as the command line's defaults."""

import json

import pytest
from option_helpers import parser_of

from utils.checkpoint import args_from_checkpoint, args_to_dict
from utils.options import resolve_defaults

# ---------------------------------------------------------------- --config


def _write(tmp_path, values, name="args.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def test_config_from_a_runs_args_json_round_trips(tmp_path):
    """train.py writes args_to_dict(args) (with num_classes) to args.json: --config args.json gives the
    same options back, and the file's options count as given."""
    trained = parser_of("train").parse_args(
        ["--dataset", "voc", "--lr", "0.01", "--step_values", "10,20", "--aspect_ratios", "0.5,1", "--amp"]
    )
    resolve_defaults(trained)
    trained.num_classes = 20
    path = _write(tmp_path, args_to_dict(trained))
    again = parser_of("train").parse_args(["--config", path])
    skip = {"explicit_options", "config", "num_classes"}
    assert {k: v for k, v in vars(again).items() if k not in skip} == {
        k: v for k, v in vars(trained).items() if k not in skip
    }
    assert again.config == path
    assert set(again.explicit_options) == set(args_to_dict(trained)) - {"num_classes", "config"}


def test_config_is_overridden_by_the_command_line(tmp_path):
    path = _write(
        tmp_path, {"nms_thresh": 0.3, "conf_thresh": 0.2, "step_values": "5,6", "checkpoint": "c.pth"}
    )
    args = parser_of("demo").parse_args(["--config", path, "--nms_thresh", "0.4"])
    assert (args.nms_thresh, args.conf_thresh, args.checkpoint) == (0.4, 0.2, "c.pth")  # --checkpoint from it
    assert args.step_values == [5, 6]  # a typed string in the file is parsed as on the command line
    assert {"nms_thresh", "conf_thresh", "step_values", "checkpoint"} <= set(args.explicit_options)
    assert "input_dim" not in args.explicit_options
    # Given options (typed or from the file) override a checkpoint's; the others keep its values.
    checkpoint = {"args": {"nms_thresh": 0.6, "conf_thresh": 0.05, "input_dim": 300, "basenet": "resnet18"}}
    merged = args_from_checkpoint(checkpoint, args, parser_of("demo"))
    assert (merged.nms_thresh, merged.conf_thresh, merged.input_dim) == (0.4, 0.2, 300)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nms_tresh": 0.3}, "'nms_tresh' is no option of"),
        ({"basenet": "resnet77"}, "basenet: 'resnet77' is not one of"),
        ({"input_dim": "big"}, "input_dim: invalid literal"),
        ({"input_dim": 1.5}, "input_dim: expected an integer"),
        ({"amp": "perhaps"}, "amp: expected a boolean"),
        ({"aspect_ratios": "a,b"}, "aspect_ratios: expected comma-separated numbers"),
        ({"conf_thresh": None}, "conf_thresh: null is not a value"),
    ],
)
def test_bad_config_values_are_errors_naming_key_and_file(tmp_path, capsys, values, message):
    path = _write(tmp_path, values, "my_config.json")
    with pytest.raises(SystemExit) as e:
        parser_of("evaluate").parse_args(["--config", path])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "my_config.json" in err


def test_config_file_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parser_of("evaluate").parse_args(["--config", str(tmp_path / "none.json")])
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        parser_of("evaluate").parse_args(["--config", str(bad)])
    assert "is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser_of("evaluate").parse_args([f"--config={_write(tmp_path, [1, 2], 'list.json')}"])
    assert "must hold a JSON object" in capsys.readouterr().err


def test_config_run_only_and_renamed_keys(tmp_path, caplog):
    path = _write(tmp_path, {"num_classes": 20, "explicit_options": ["lr"], "val_metric": "coco", "lr": 0.1})
    with caplog.at_level("WARNING"):
        args = parser_of("train").parse_args(["--config", path])
    assert args.metric == "coco" and args.lr == 0.1 and not hasattr(args, "num_classes")
    assert "ignored num_classes" in caplog.text and "explicit_options" not in caplog.text
