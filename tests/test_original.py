"""models/original.py: the original codebase's bare checkpoints, detected by their keys and loaded by
evaluate.py, demo.py and extract_features.py. (Parity with the original's own models, imported from a
checkout of it, is tests/test_original_parity.py.)"""

import glob
import os
import re

import pytest
import torch
from tiny_shapes import make_tiny_shapes

import demo
import evaluate
import extract_features
from models import build_model
from models.original import (
    describe_original_state_dict,
    is_original_state_dict,
    map_original_state_dict,
    original_args,
)
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint
from utils.errors import CheckpointError, UserError
from utils.options import resolve_defaults

CHANNELS = 16
# 9 anchors per location as the checkpoints' heads. Untyped, an original checkpoint with 9 takes
# --anchor_type pdf9 (test_untyped_options_follow_the_keys); the anchors do not enter deltas and scores.
ANCHORS = ["--anchor_type", "predefined"]


def _to_original_keys(state_dict, shared):
    """Our state dict under the original's names, by the table of its models/resnet.py, fpn.py and
    fpn_shared_heads.py (written out here independently of models/original.py)."""
    fixed = {
        "backbone.stem.0.": "base_net.conv1.",
        "backbone.stem.1.": "base_net.bn1.",
        "fpn.lateral_convs.2.": "base_net.lateral_layer1.",
        "fpn.lateral_convs.1.": "base_net.lateral_layer2.",
        "fpn.lateral_convs.0.": "base_net.lateral_layer3.",
        "fpn.output_convs.1.": "base_net.corr_layer1.",
        "fpn.output_convs.0.": "base_net.corr_layer2.",
        "fpn.p6.": "base_net.conv6.",
        "fpn.p7.": "base_net.conv7.",
        "head.shared_tower.": "features_layers.",
    }
    loc, conf, pred = ("loc_heads.", "conf_heads.", "2.") if shared else ("loc.", "conf.", "8.")
    fixed.update({"head.box_tower.": loc, "head.cls_tower.": conf, "head.box_pred.": loc + pred})
    fixed["head.cls_pred."] = conf + pred
    out = {}
    for key, value in state_dict.items():
        if key.startswith("anchor_generator."):
            continue
        for ours, theirs in fixed.items():
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
                break
        else:
            key = re.sub(r"^backbone\.(layer\d)", r"base_net.\1", key)
        out[key] = value
    return out


def _our_original_model(shared, bias_heads=0, num_classes=3):
    parser = evaluate.get_args_parser()
    argv = ["--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", str(CHANNELS)]
    argv += ["--fpn_variant", "original", "--shared_heads", str(shared), "--bias_heads", str(bias_heads)]
    args = resolve_defaults(parser.parse_args(argv))
    args.num_classes = num_classes
    torch.manual_seed(shared)
    model, _, _ = build_model(args)
    with torch.no_grad():  # make the outputs O(1) and every bias and BN statistic count
        for p in model.parameters():
            p.copy_(
                torch.randn_like(p) * (2.0 / max(p[0].numel(), 1)) ** 0.5
                if p.dim() > 1
                else torch.randn_like(p)
            )
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("shared", [0, 1])
def test_detect_describe_and_load_through_the_checkpoint_path(tmp_path, data_root, shared):
    model = _our_original_model(shared)
    state = {f"module.{k}": v for k, v in _to_original_keys(model.state_dict(), shared).items()}
    assert is_original_state_dict(state)
    assert not is_original_state_dict({"model": {}, "args": {}})
    assert not is_original_state_dict({"base_net.conv1.weight": torch.ones(1)})  # no heads
    info = describe_original_state_dict(state)
    assert info == {
        "basenet": "resnet18",
        "shared_heads": shared,
        "bias_heads": 0,
        "head_size": CHANNELS,
        "num_tower_layers": 1 if shared else 4,
        "num_shared_layers": 3 if shared else 0,
        "num_anchors": 9,
        "num_columns": 4,
    }
    path = str(tmp_path / "model_001000.pth")
    torch.save(state, path)
    parser = evaluate.get_args_parser()
    cli = resolve_defaults(
        parser.parse_args(["--checkpoint", path, "--data_root", data_root, "--input_dim", "64", *ANCHORS])
    )
    loaded, _, args, checkpoint = build_model_from_checkpoint(path, cli, parser, torch.device("cpu"))
    assert args.shared_heads == shared and args.fpn_variant == "original" and args.basenet == "resnet18"
    assert args.class_names == ["circle", "square", "triangle"] and args.category_ids == [1, 2, 3]
    assert checkpoint["iteration"] == 1000 and checkpoint["format"] == "original"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = loaded(images), model(images)
    assert theirs["pred_box_deltas"].std() > 0.1
    torch.testing.assert_close(ours["pred_box_deltas"], theirs["pred_box_deltas"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], rtol=0, atol=1e-6)


def test_bad_original_checkpoints_are_clear_errors(tmp_path, data_root):
    model = _our_original_model(1, bias_heads=1)
    state = _to_original_keys(model.state_dict(), shared=1)
    assert describe_original_state_dict(state)["bias_heads"] == 1
    path = str(tmp_path / "model_000500.pth")
    torch.save(state, path)
    parser = evaluate.get_args_parser()

    def load(*argv):
        cli = resolve_defaults(
            parser.parse_args(["--checkpoint", path, "--data_root", data_root, *ANCHORS, *argv])
        )
        return build_model_from_checkpoint(path, cli, parser, torch.device("cpu"))

    with pytest.raises(UserError, match="contradicts --basenet resnet50 .its base_net is a resnet18"):
        load("--basenet", "resnet50")
    with pytest.raises(UserError, match="--shared_heads 0 .its heads are SH"):
        load("--shared_heads", "0")
    with pytest.raises(
        UserError, match="gives 3 anchors per location, the original checkpoint .* predicts 9"
    ):
        load("--anchor_type", "predefined", "--num_scales", "1")
    with pytest.raises(UserError, match="predicts 3 classes; give the --dataset"):
        load("--dataset", "voc")  # no voc annotation file here, and voc has 20 classes
    # training reads only our checkpoints, and says where an original one loads
    with pytest.raises(CheckpointError, match="original FPN.pytorch1.0 checkpoint: evaluate.py, demo.py"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="keys of no original model part.*base_net.fc.weight"):
        map_original_state_dict({**state, "base_net.fc.weight": torch.ones(1)})
    del state["conf_heads.0.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit the model its keys describe: 1 missing"):
        load()


def test_original_checkpoint_runs_in_evaluate_demo_and_extract_features(tmp_path, data_root):
    model = _our_original_model(1)
    path = str(tmp_path / "model_002000.pth")
    torch.save(_to_original_keys(model.state_dict(), shared=1), path)
    common = [
        "--checkpoint",
        path,
        "--data_root",
        data_root,
        "--input_dim",
        "64",
        "--device",
        "cpu",
        "-j",
        "0",
    ]
    common += ["--basenet", "resnet18", "--shared_heads", "1", "--conf_thresh", "0.0", *ANCHORS]
    argv = common + ["--save_path", str(tmp_path), "--metric", "voc", "--topk", "20"]
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    headline = next(iter(summary.values()))
    assert 0 <= headline["voc_map_area"] <= 1
    assert glob.glob(str(tmp_path / "detections_model_002000_shapes_val.json"))

    images = sorted(glob.glob(os.path.join(data_root, "shapes", "images", "val", "*.png")))[:2]
    out = tmp_path / "demo"
    argv = common + ["--images", *images, "--save_path", str(out), "--score_thresh", "0.0", "--topk", "3"]
    records = demo.main(demo.get_args_parser().parse_args(argv))
    assert len(records) == 2 and all(len(r["detections"]) == 3 for r in records)
    assert {d["class"] for r in records for d in r["detections"]} <= {"circle", "square", "triangle"}

    feats = tmp_path / "feats"
    argv = common + ["--images", *images, "--save_path", str(feats), "--num_nodes", "4"]
    extract_features.main(extract_features.get_args_parser().parse_args(argv))
    table = torch.load(sorted(glob.glob(str(feats / "*.pth")))[0], weights_only=True)
    assert table.shape == (4, 1 + 4 + 4 + 9 * CHANNELS)


def test_untyped_options_follow_the_keys(data_root):
    model = _our_original_model(0, num_classes=20)
    state = _to_original_keys(model.state_dict(), shared=0)
    cli = resolve_defaults(evaluate.get_args_parser().parse_args(["--checkpoint", "x.pth"]))
    assert (cli.dataset, cli.anchor_type, cli.basenet) == ("shapes", "predefined", "resnet50")
    args = original_args(state, cli)
    assert (args.dataset, args.anchor_type, args.basenet, args.shared_heads) == ("voc", "pdf9", "resnet18", 0)
    assert args.class_names[0] == "aeroplane" and len(args.class_names) == 20 and args.category_ids is None
    assert (args.fpn_channels, args.num_head_layers, args.num_shared_layers, args.bias_heads) == (16, 4, 0, 0)
    assert (args.loss_type, args.box_variances, args.resize_mode) == ("mbox", [0.1, 0.2], "square")
    three = {k: v for k, v in state.items() if not k.startswith(("loc.8", "conf.8"))}
    three["loc.8.weight"], three["conf.8.weight"] = torch.zeros(12, 16, 3, 3), torch.zeros(3 * 21, 16, 3, 3)
    assert original_args(three, cli).anchor_type == "kmeans"  # the original's default with 3 per location
