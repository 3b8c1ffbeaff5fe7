"""The original codebase's command lines, its option names and ours: parsing and help.

--config is tested in test_config_file.py, --ngpu in test_ngpu.py.

The README commands are copied from the original's README (checked against it when the original is checked
out: FPN_ORIGINAL_REPO or /work/original), and every option of the original's four argparse parsers,
with its default value, must parse in the matching script here.
"""

import argparse
import importlib
import os
import re
import shlex
import sys

import pytest
from option_helpers import parser_of

from utils import launch
from utils.checkpoint import args_from_checkpoint
from utils.errors import UserError
from utils.options import resolve_defaults, resume_checkpoint_path

ORIGINAL = os.environ.get("FPN_ORIGINAL_REPO", "/work/original")

README_COMMANDS = {
    "train": "python train.py --dataset=coco --basenet=resnet50 --batch_size=24 --lr=0.0005 -j=4  --ngpu=2 "
    "--step_values=120000 --max_iter=150000 --visdom=True --tensorboard=True --val_step=15000 "
    "--anchor_type=kmeans --shared_heads=1",
    "evaluate": "python evaluate.py --dataset=coco --basenet=resnet50 --batch_size=24 --lr=0.0005 -j=2  "
    "--ngpu=2 --eval_iters=150000 --anchor_type=kmeans --shared_heads=1",
    "demo": "python demo.py --model_path=<path to the pretrained model>",
    "extract_features": "python extract_features.py --model_path=<path to the pretraeind model>",
}

README_VALUES = {
    "train": dict(
        dataset="coco",
        basenet="resnet50",
        batch_size=24,
        lr=0.0005,
        num_workers=4,
        ngpu=2,
        step_values=[120000],
        max_iter=150000,
        visdom=True,
        tensorboard=True,
        val_step=15000,
        anchor_type="kmeans",
        shared_heads=1,
    ),
    "evaluate": dict(
        dataset="coco",
        basenet="resnet50",
        batch_size=24,
        lr=0.0005,
        num_workers=2,
        ngpu=2,
        eval_iters=[150000],
        anchor_type="kmeans",
        shared_heads=1,
    ),
    "demo": dict(checkpoint="runs/x/model_150000.pth", images=["demo_data/samples"]),
    "extract_features": dict(checkpoint="runs/x/model_150000.pth", topk=10),
}


def argv_of(command):
    command = re.sub(r"<path to the [a-z]+ model>", "runs/x/model_150000.pth", command)
    return shlex.split(command)[2:]  # drop "python script.py"


@pytest.mark.parametrize("script", sorted(README_COMMANDS))
def test_the_original_readme_commands_parse_to_their_values(script):
    readme = os.path.join(ORIGINAL, "README.md")
    if os.path.isfile(readme):  # copied verbatim
        with open(readme) as f:
            assert README_COMMANDS[script] in f.read()
    args = parser_of(script).parse_args(argv_of(README_COMMANDS[script]))
    assert {k: getattr(args, k) for k in README_VALUES[script]} == README_VALUES[script]


def test_the_original_readme_training_splits_and_batch():
    """--dataset coco with no splits trains on train2017 and validates on val2017 (the original's);
    --ngpu 2 with --batch_size 24 runs 2 processes of 12, so the run folder says bs24 as evaluate.py's
    command (one process, --batch_size 24) derives it."""
    args = resolve_defaults(parser_of("train").parse_args(argv_of(README_COMMANDS["train"])))
    assert (args.train_sets, args.val_sets) == ("train2017", "val2017")
    voc = resolve_defaults(parser_of("train").parse_args(["--dataset", "voc", "--val_sets", "mine"]))
    assert (voc.train_sets, voc.val_sets) == ("trainval2007,trainval2012", "mine")
    command = launch.torchrun_command("train.py", argv_of(README_COMMANDS["train"]), 2, 24)
    child = parser_of("train").parse_args(command[command.index("train.py") + 1 :])
    assert (child.ngpu, child.batch_size) == (1, 12)
    from utils.options import run_name

    evaluate_args = parser_of("evaluate").parse_args(argv_of(README_COMMANDS["evaluate"]))
    assert run_name(child, world_size=2).split("_bs")[1] == run_name(evaluate_args).split("_bs")[1]


def _original_options(script):
    """(option, default) of every add_argument in the original's script, read from its source."""
    path = os.path.join(ORIGINAL, f"{script}.py")
    if not os.path.isfile(path):
        pytest.skip("the original codebase is not checked out (set FPN_ORIGINAL_REPO)")
    with open(path) as f:
        source = f.read()
    found = re.findall(r"add_argument\('(--[\w-]+)'(?:, '-?-?[\w-]+')?, default=('[^']*'|[\w.-]+)", source)
    assert len(found) >= 10, path
    return [(option, default.strip("'")) for option, default in found]


# Issue 13 section 3 (the heads branch) adds --bias_heads; until then it is the one option not accepted.
NOT_HERE_YET = {"--bias_heads"}


@pytest.mark.parametrize("script", ["train", "evaluate", "demo", "extract_features"])
def test_every_option_of_the_original_parses_with_its_default(script):
    options = [(o, d) for o, d in _original_options(script) if o not in NOT_HERE_YET]
    if script == "extract_features":
        # Its --topk (NMS candidates, 20) is our --num_nodes' alias: typed after --num_nodes it would win.
        options = [(o, d) for o, d in options if o != "--topk"]
    argv = [f"{option}={default}" for option, default in options]
    args = parser_of(script).parse_args(argv)
    assert args.ngpu == int(dict(options)["--ngpu"])
    if script == "train":
        assert args.resume is None  # its --resume 0: start afresh
        assert args.weight_decay == 5e-4 and args.positive_threshold == 0.5 and args.freeze_bn is True
        assert args.man_seed == 1 and args.vis_port == 8098 and args.tensorboard is False
    if script == "demo":
        assert args.score_thresh == 0.5 and args.save_path == "demo_data/outputs/"
        assert args.images == ["demo_data/samples/"] and args.checkpoint.endswith("model_150000.pth")
    if script == "extract_features":
        assert args.save_path == "demo_data/features/" and args.topk == 10  # its --num_nodes


def test_the_originals_other_spellings():
    args = parser_of("train").parse_args(
        ["--learning-rate", "0.01", "--jaccard_threshold", "0.6", "--bn", "1"]
    )
    assert (args.lr, args.positive_threshold, args.freeze_bn) == (0.01, 0.6, False)
    assert parser_of("train").parse_args(["--bn", "0"]).freeze_bn is True
    assert parser_of("train").parse_args(["--resume", "40000"]).resume == "40000"
    assert resume_checkpoint_path("40000", "runs/r") == os.path.join("runs/r", "model_040000.pth")
    assert resume_checkpoint_path(None, "runs/r") is None
    assert resume_checkpoint_path("x.pth", "runs/r") == "x.pth"


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--visdom"], True),
        (["--visdom=True"], True),
        (["--visdom=False"], False),
        (["--visdom=1"], True),
        (["--visdom=0"], False),
        (["--visdom", "yes"], True),
        (["--visdom", "off"], False),
        (["--visdom", "--tensorboard"], True),
    ],
)
def test_booleans_take_a_value_or_none(argv, expected):
    assert parser_of("train").parse_args(argv).visdom is expected


def test_a_bad_boolean_is_an_error_naming_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        parser_of("train").parse_args(["--visdom=Flase"])
    assert e.value.code == 2
    assert "--visdom" in capsys.readouterr().err
    args = parser_of("train").parse_args(["--train_bn=0", "--amp=1", "--class_agnostic_nms=true"])
    assert (args.freeze_bn, args.amp, args.class_agnostic_nms) == (True, True, True)
    assert parser_of("train").parse_args(["--train_bn"]).freeze_bn is False


# ---------------------------------------------------------------- one spelling per concept, with aliases


@pytest.mark.parametrize(
    "script, spellings, dest, value, typed",
    [
        ("train", ["--man_seed", "--seed"], "man_seed", 7, "7"),
        ("evaluate", ["--man_seed", "--seed"], "man_seed", 7, "7"),
        ("train", ["--metric", "--val_metric"], "metric", "coco", "coco"),
        ("evaluate", ["--metric", "--val_metric"], "metric", "coco", "coco"),
        ("evaluate", ["--topk", "--num_nodes"], "topk", 7, "7"),
        ("extract_features", ["--topk", "--num_nodes"], "topk", 7, "7"),
        ("evaluate", ["--save_path", "--out", "--output"], "save_path", "o/", "o/"),
        ("demo", ["--save_path", "--outputs_path", "--out", "--output"], "save_path", "o/", "o/"),
        ("extract_features", ["--save_path", "--out", "--output"], "save_path", "o/", "o/"),
        ("kmeans_for_anchors", ["--save_path", "--out", "--output"], "out", "a.json", "a.json"),
        ("kmeans_for_anchors", ["--man_seed", "--seed"], "seed", 7, "7"),
        ("merge_submissions", ["--save_path", "--output", "--out"], "output", "m.csv", "m.csv"),
        ("demo", ["--checkpoint", "--model_path"], "checkpoint", "c.pth", "c.pth"),
        ("evaluate", ["--checkpoint", "--model_path"], "checkpoint", "c.pth", "c.pth"),
        ("demo", ["--images", "--samples_path"], "images", ["s/"], "s/"),
        ("extract_features", ["--images", "--samples_path"], "images", ["s/"], "s/"),
        ("demo", ["--score_thresh", "--final_thresh"], "score_thresh", 0.3, "0.3"),
    ],
)
def test_one_spelling_per_concept_with_aliases(script, spellings, dest, value, typed):
    required = {
        "demo": ["--checkpoint", "c.pth"],
        "extract_features": ["--checkpoint", "c.pth"],
        "merge_submissions": ["--inputs", "a.csv", "--output", "m.csv"],
    }.get(script, [])
    parser = parser_of(script)
    action = next(a for a in parser._actions if a.dest == dest and a.option_strings)
    assert action.option_strings[: len(spellings)] == spellings  # the primary name first in --help
    for spelling in spellings:
        args = parser.parse_args(required + [spelling, typed])
        assert getattr(args, dest) == value, spelling


# ---------------------------------------------------------------- --help


SCRIPTS = ["train", "evaluate", "demo", "extract_features", "kmeans_for_anchors", "merge_submissions"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_usage_names_the_program_and_every_option_has_help(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    if script == "kmeans_for_anchors":
        parser = importlib.import_module(script).get_args_parser(add_help=True)
    text = parser.format_help()
    assert text.startswith(f"usage: {script}.py ")
    assert parser.description and parser.description.split("\n")[0][:20] in text.split("\n\n")[1]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{script}: {action.option_strings} has no help"


def test_help_shows_defaults_as_typed(monkeypatch):
    text = " ".join(parser_of("train", monkeypatch).format_help().split())
    assert "square input size (default: 600)" in text
    assert "(default: 30000,40000)" in text  # --step_values, as it is typed
    assert "(default: None)" not in text


@pytest.mark.parametrize("script", ["demo", "extract_features"])
def test_demo_and_extract_features_do_not_list_training_options_but_accept_them(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    text = parser.format_help()
    for option in ("--max_iter", "--lr", "--sampler", "--weight_decay", "--neg_pos_ratio", "--save_step"):
        assert f"{option} " not in text and f"{option}," not in text, option
    for option in ("--checkpoint", "--conf_thresh", "--input_dim", "--basenet", "--config"):
        assert option in text
    assert "Also accepted but not listed here" in text
    train_help = parser_of("train", monkeypatch).format_help()
    assert len(text.splitlines()) < len(train_help.splitlines()) - 60
    args = parser.parse_args(
        ["--checkpoint", "c.pth", "--max_iter", "5", "--lr", "0.1", "--sampler", "repeat_factor"]
    )
    assert (args.max_iter, args.lr, args.sampler) == (5, 0.1, "repeat_factor")


def test_run_cli_error_names_the_program(monkeypatch, capsys, tmp_path):
    import demo
    from utils.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["demo.py"])

    def fail(args):
        raise UserError("something named")

    with pytest.raises(SystemExit):
        run_cli(fail, demo.get_args_parser(), ["--checkpoint", "c.pth"])
    assert capsys.readouterr().err.strip() == "demo.py: error: something named"


# ---------------------------------------------------------------- --protocol original


def test_protocol_original_values_and_overrides():
    args = resolve_defaults(parser_of("evaluate").parse_args(["--protocol", "original"]))
    assert (args.conf_thresh, args.pre_nms_topk, args.nms_thresh, args.topk) == (0.001, 200, 0.45, 0)
    typed = resolve_defaults(
        parser_of("evaluate").parse_args(["--protocol", "original", "--nms_thresh", "0.5"])
    )
    assert typed.nms_thresh == 0.5 and typed.conf_thresh == 0.001
    # extract_features.py keeps its 10 detections per image (the original's --num_nodes).
    extract = parser_of("extract_features").parse_args(["--checkpoint", "c.pth", "--protocol", "original"])
    assert (resolve_defaults(extract).topk, extract.nms_thresh) == (10, 0.45)
    # They win over the values of a checkpoint trained with ours.
    checkpoint = {"args": {"conf_thresh": 0.05, "pre_nms_topk": 1000, "nms_thresh": 0.5, "topk": 100}}
    merged = args_from_checkpoint(checkpoint, args, parser_of("evaluate"))
    assert (merged.conf_thresh, merged.pre_nms_topk, merged.nms_thresh, merged.topk) == (0.001, 200, 0.45, 0)
    # --protocol ours given explicitly brings ours back for a checkpoint evaluated with the original's.
    ours = resolve_defaults(parser_of("evaluate").parse_args(["--protocol", "ours"]))
    checkpoint = {"args": {"protocol": "original", "conf_thresh": 0.001, "topk": 0}}
    merged = args_from_checkpoint(checkpoint, ours, parser_of("evaluate"))
    assert (merged.protocol, merged.conf_thresh, merged.topk) == ("ours", 0.05, 100)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dataset", "voc"], (True, 50, 0, False, 200, 0.45, 0.001)),
        (["--dataset", "coco"], (True, 20, 0, False, 200, 0.45, 0.001)),
        (
            ["--dataset", "coco", "--max_per_class", "7", "--topk", "100"],
            (True, 7, 100, False, 200, 0.45, 0.001),
        ),
    ],
)
def test_protocol_original_builds_the_originals_postprocessor(argv, expected):
    from models import build_model

    args = resolve_defaults(
        parser_of("evaluate").parse_args(
            argv + ["--protocol", "original", "--basenet", "resnet18", "--pretrained", "none"]
        )
    )
    args.num_classes = 3
    _, _, post = build_model(args, load_pretrained=False)
    got = (
        post.per_class_topk,
        post.max_per_class,
        post.max_detections,
        post.clip_before_nms,
        post.pre_nms_topk,
        post.nms_thresh,
        post.conf_thresh,
    )
    assert got == expected
    ours = resolve_defaults(
        parser_of("evaluate").parse_args(["--basenet", "resnet18", "--pretrained", "none"])
    )
    ours.num_classes = 3
    post = build_model(ours, load_pretrained=False)[2]
    assert (post.per_class_topk, post.max_per_class, post.max_detections, post.clip_before_nms) == (
        False,
        0,
        100,
        True,
    )


def test_namespace_without_record_still_resolves():
    """resolve_defaults on a namespace not made by OptionParser (no explicit_options) applies the protocol."""
    args = argparse.Namespace(
        **vars(parser_of("evaluate").parse_args(["--protocol", "original"])) | {"explicit_options": None}
    )
    resolve_defaults(args)
    assert args.conf_thresh == 0.001 and args.explicit_options is None
