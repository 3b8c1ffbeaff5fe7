import argparse
import importlib

import pytest
import torch

import train
from utils.options import (
    amp_dtype_of,
    check_common_args,
    float_list,
    int_list,
    resolve_defaults,
    run_folder,
    run_name,
)
from utils.options.resolve import RESOLVED_OPTIONS


def parse(*argv):
    return train.get_args_parser().parse_args(list(argv))


def test_list_parsers():
    assert float_list("0.5,1,2") == [0.5, 1.0, 2.0]
    assert int_list("30000, 40000") == [30000, 40000]
    assert int_list("") == []


def test_loss_dependent_defaults():
    mbox = resolve_defaults(parse("--loss_type", "mbox"))
    focal = resolve_defaults(parse("--loss_type", "focal"))
    assert (mbox.negative_threshold, mbox.smooth_l1_beta) == (0.5, 1.0)
    assert focal.negative_threshold == 0.4
    assert focal.smooth_l1_beta == pytest.approx(1 / 9)


def test_unknown_backbone_fails_at_parse(capsys):
    with pytest.raises(SystemExit):
        parse("--basenet", "resnet77")
    assert "resnet77" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--anchor_type", "kmeans"], "--anchor_type kmeans needs --anchor_file"),
        (["--anchor_type", "kmeans", "--anchor_file", "nope.json"], "'nope.json' does not exist"),
        (
            ["--anchor_file", "nope.json"],
            r"'nope.json' is not used with --anchor_type predefined \(and the file does not exist\)",
        ),
        (["--num_shared_layers", "5"], "--num_shared_layers must be in 0..--num_head_layers"),
        (["--shared_heads", "-1"], "--shared_heads must be 0"),
        (["--shared_heads", "1", "--num_shared_layers", "2"], "is the SH head .3 shared layers.; for 2"),
        (["--fpn_variant", "original", "--p6_from", "p5"], "--fpn_variant original is the single-stage"),
        (["--bn_mode", "eval", "--arch", "faster_rcnn_fpn"], "--bn_mode eval applies to --arch fpn_ohem"),
        (["--pretrained", "missing.pth"], "neither 'imagenet', 'none' nor an existing file"),
        (["--positive_threshold", "0.4", "--negative_threshold", "0.5"], "must not exceed"),
        (["--head_norm", "gn", "--fpn_channels", "48"], "divisible by 32, got 48"),
        (["--head_norm", "gn", "--arch", "faster_rcnn_fpn"], "--head_norm gn applies to --arch fpn_ohem"),
        (["--conf_thresh", "1.5"], r"--conf_thresh must be in \[0, 1\), got 1.5"),
        (["--topk", "-1"], r"--topk and --max_per_class must be >= 0 \(0: no cap\), got -1"),
        (["--pre_nms_topk", "0"], "--pre_nms_topk and --eval_batch_size must be >= 1, got 0"),
        (["--arch", "faster_rcnn_fpn", "--protocol", "original"], "--arch fpn_ohem only"),
        (["-j", "-1"], "-j/--num_workers must be >= 0, got -1"),
        (["--matcher", "atss", "--atss_topk", "0"], "--atss_topk must be >= 1, got 0"),
    ],
)
def test_bad_common_options_fail_at_start(argv, message):
    args = resolve_defaults(parse(*argv))
    with pytest.raises(SystemExit, match=message):
        check_common_args(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_iter", "100", "--step_values", "50,200"], "within 1..--max_iter"),
        (["--max_iter", "100", "--step_values", "80,50"], "must be increasing"),
        (["--resume", "no_such.pth"], "does not exist"),
    ],
)
def test_bad_train_options_fail_at_start(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.check_train_args(parse(*argv))


def test_lr_schedule_warmup_and_steps():
    f = lambda it: train.lr_factor(it, warmup_iters=10, warmup_factor=0.1, step_values=[20, 30], gamma=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 * 0.5 + 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1)
    assert f(35) == pytest.approx(0.01)


def test_run_name_is_derived_from_options():
    args = resolve_defaults(
        parse(
            "--dataset",
            "voc",
            "--basenet",
            "resnet50",
            "--num_scales",
            "1",
            "--batch_size",
            "24",
            "--lr",
            "0.0005",
        )
    )
    assert run_name(args) == "voc_fpn_ohem_resnet50_pre1x3_mbox_sh0_sq600_bs24_lr0.0005"
    assert run_name(args, world_size=4) == "voc_fpn_ohem_resnet50_pre1x3_mbox_sh0_sq600_bs96_lr0.0005"
    assert run_folder(args) == "runs/voc_fpn_ohem_resnet50_pre1x3_mbox_sh0_sq600_bs24_lr0.0005"
    args.head_norm = "gn"
    assert run_name(args) == "voc_fpn_ohem_resnet50_pre1x3_mbox_sh0gn_sq600_bs24_lr0.0005"
    args.run_name = "mine"
    assert run_folder(args) == "runs/mine"


def test_every_script_accepts_a_training_command_line():
    """One parent parser: a train.py command line parses unchanged in the other scripts, to the same
    values (kmeans_for_anchors.py has its own parser: its --max_iter counts k-means iterations)."""
    argv = ["--basenet", "resnet18", "--batch_size", "8", "--lr", "0.001", "--max_iter", "100"]
    argv += ["--sampler", "class_balanced", "--num_bins", "2", "--val_metric", "coco"]
    argv += [
        "--step_values",
        "60,80",
        "--save_root",
        "elsewhere/",
        "--amp",
        "--tensorboard",
        "--gamma",
        "0.5",
    ]
    expected = vars(parse(*argv))
    for script in ("evaluate", "demo", "extract_features"):
        parser = importlib.import_module(script).get_args_parser()
        parsed = vars(parser.parse_args(argv + ["--checkpoint", "c.pth"]))
        # extract_features keeps 10 detections per image by default (the original's --num_nodes)
        shared = [k for k in expected if k in parsed and k not in ("explicit_options", "topk")]
        assert {k: parsed[k] for k in shared} == {k: expected[k] for k in shared}
        assert set(expected) <= set(parsed), f"{script} lacks {sorted(set(expected) - set(parsed))}"


def test_amp_dtype():
    assert amp_dtype_of(parse(), "cpu") is None
    assert amp_dtype_of(parse("--amp"), "cpu") is torch.bfloat16
    assert amp_dtype_of(parse("--amp", "--amp_dtype", "fp16"), "cuda") is torch.float16
    with pytest.raises(SystemExit, match="--amp_dtype fp16 needs CUDA"):
        amp_dtype_of(parse("--amp", "--amp_dtype", "fp16"), "cpu")


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("evaluate", ["--checkpoint", "c.pth", "--eval_iters", "10,20"], "not both"),
        ("evaluate", ["--save_root", "no_such_root/", "--eval_iters", "10,20"], "derived from the options"),
        ("evaluate", ["--checkpoint", "c.pth", "--iou_thresh", "0"], r"--iou_thresh must be in \(0, 1\]"),
        ("demo", ["--checkpoint", "c.pth", "--score_thresh", "2"], r"--score_thresh must be in \[0, 1\]"),
        ("demo", ["--checkpoint", "c.pth", "--nms_thresh", "0"], "--nms_thresh must be in"),
        ("extract_features", ["--checkpoint", "c.pth", "--num_nodes", "0"], "--num_nodes must be >= 1"),
        ("extract_features", ["--checkpoint", "c.pth", "--conf_thresh", "-1"], "--conf_thresh must be in"),
    ],
)
def test_bad_script_options_fail_before_loading_anything(script, argv, message):
    """Each script rejects its bad options at start (c.pth does not exist: nothing is loaded first)."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match=message):
        module.main(module.get_args_parser().parse_args(argv))


# ---------------------------------------------------------------- one resolution, one description per arch


def test_every_arch_has_a_builder_and_a_description():
    from models import ARCH_BUILDERS
    from models.archs import ARCH_SPECS

    assert set(ARCH_SPECS) == set(ARCH_BUILDERS) == {"fpn_ohem", "faster_rcnn_fpn"}
    arch_action = next(a for a in train.get_args_parser()._actions if a.dest == "arch")
    assert tuple(arch_action.choices) == tuple(ARCH_SPECS)
    assert all(name == spec.name for name, spec in ARCH_SPECS.items())
    single, two_stage = ARCH_SPECS["fpn_ohem"], ARCH_SPECS["faster_rcnn_fpn"]
    assert (single.score_type("mbox"), single.score_type("focal")) == ("softmax", "sigmoid")
    assert two_stage.score_type("mbox") == "softmax" and two_stage.loss_types == ("mbox",)
    assert (single.feature_rows, two_stage.feature_rows) == ("anchor_cell", "roi")
    assert (single.first_fpn_level, two_stage.first_fpn_level) == (3, 2)  # C3..C5 vs C2..C5 laterals


def test_run_name_parts_come_from_the_arch_description():
    args = resolve_defaults(parse("--arch", "faster_rcnn_fpn"))
    # Its RPN anchors, one loss and its own heads: no anchor options, loss or head part in the name.
    assert run_name(args) == "shapes_faster_rcnn_fpn_resnet50_rpn_sq600_bs24_lr0.0005"
    args = resolve_defaults(parse("--loss_type", "focal", "--num_shared_layers", "2"))
    assert run_name(args) == "shapes_fpn_ohem_resnet50_pre3x3_focal_sh0k2_sq600_bs24_lr0.0005"


@pytest.mark.parametrize(
    "script, argv",
    [
        ("train", []),
        ("train", ["--dataset", "voc", "--loss_type", "focal", "--fpn_variant", "original"]),
        ("train", ["--shared_heads", "1", "--train_bn"]),
        ("evaluate", ["--protocol", "original", "--dataset", "coco"]),
        ("extract_features", ["--checkpoint", "c.pth", "--protocol", "original"]),
    ],
)
def test_resolution_is_idempotent(script, argv):
    args = importlib.import_module(script).get_args_parser().parse_args(argv)
    once = dict(vars(resolve_defaults(args)))
    assert vars(resolve_defaults(args)) == once
    assert all(once[k] is not None for k in RESOLVED_OPTIONS)


def test_builders_refuse_options_that_are_not_resolved():
    from models import build_model
    from utils.errors import UserError

    unresolved = parse("--basenet", "resnet18", "--pretrained", "none")
    unresolved.num_classes = 3
    with pytest.raises(
        UserError, match=r"not resolved: negative_threshold, smooth_l1_beta, num_shared_layers"
    ):
        build_model(unresolved)
    hand_made = argparse.Namespace(
        **{k: v for k, v in vars(resolve_defaults(unresolved)).items() if k != "matcher"}
    )
    with pytest.raises(UserError, match="resolve_defaults; got missing matcher"):
        build_model(hand_made)


def test_protocol_cap_per_class_is_decided_by_the_final_dataset():
    from utils.options import max_per_class_of

    args = resolve_defaults(parse("--protocol", "original"))
    assert max_per_class_of(args) == 50
    args.dataset = "coco_subset"  # e.g. the dataset of the checkpoint being evaluated
    assert max_per_class_of(args) == 20
    assert max_per_class_of(resolve_defaults(parse("--protocol", "original", "--max_per_class", "7"))) == 7
    assert max_per_class_of(resolve_defaults(parse())) == 0
