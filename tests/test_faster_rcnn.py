"""Faster R-CNN FPN (models/faster_rcnn.py): strides, anchors, RoI levels, losses, evaluation outputs, and
a train -> resume -> evaluate -> demo -> extract_features run with --arch faster_rcnn_fpn. The target
conversion and the post-processor are tested in tests/test_faster_rcnn_layers.py."""

import copy
import glob
import math
import os

import pytest
import torch
import torchvision
from faster_rcnn_helpers import target
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

import demo
import evaluate
import extract_features
import train
from layers.faster_rcnn_losses import FasterRCNNCriterion
from models import build_model
from models.faster_rcnn import PYRAMID_STRIDES, RPN_ANCHOR_SIZES, build_faster_rcnn
from prep import shapes
from utils.checkpoint import load_checkpoint
from utils.options import get_common_parser, resolve_defaults


def make_args(*argv):
    args = get_common_parser().parse_args(
        ["--arch", "faster_rcnn_fpn", "--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", "16"]
        + list(argv)
    )
    args.num_classes = 3
    return resolve_defaults(args)


@pytest.fixture(scope="module")
def pyramid_600x1000():
    """A resnet18 model, a 600x1000 input and its P2..P6 maps (the original's test scale)."""
    torch.manual_seed(0)
    model, _, _ = build_faster_rcnn(make_args())
    model.eval()
    images = torch.randn(1, 3, 600, 1000)
    with torch.no_grad():
        features = model.fpn(model.backbone(images))
    return model, images, features


def test_pyramid_strides_are_4_to_64_and_anchor_centres_inside_the_image(pyramid_600x1000):
    model, images, features = pyramid_600x1000
    grid_sizes = [tuple(f.shape[-2:]) for f in features]
    # Stride s gives ceil(H / s) cells: 600x1000 -> 150x250, 75x125, 38x63, 19x32, 10x16.
    assert grid_sizes == [(150, 250), (75, 125), (38, 63), (19, 32), (10, 16)]
    assert grid_sizes == [(math.ceil(600 / s), math.ceil(1000 / s)) for s in (4, 8, 16, 32, 64)]

    anchors = model.rpn.anchor_generator(ImageList(images, [(600, 1000)]), features)[0]
    assert len(anchors) == sum(h * w * 3 for h, w in grid_sizes)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert (centres[:, 0] >= 0).all() and (centres[:, 0] <= 1000).all()
    assert (centres[:, 1] >= 0).all() and (centres[:, 1] <= 600).all()
    # Per level: centres on the stride grid, 3 ratios of the level's one size (area kept up to rounding).
    start = 0
    for (h, w), stride, size in zip(grid_sizes, PYRAMID_STRIDES, RPN_ANCHOR_SIZES):
        level, level_centres = anchors[start : start + h * w * 3], centres[start : start + h * w * 3]
        start += h * w * 3
        torch.testing.assert_close(torch.unique(level_centres[:, 0]), torch.arange(w) * float(stride))
        torch.testing.assert_close(torch.unique(level_centres[:, 1]), torch.arange(h) * float(stride))
        areas = (level[:3, 2] - level[:3, 0]) * (level[:3, 3] - level[:3, 1])
        assert torch.allclose(areas.sqrt(), torch.full((3,), float(size)), rtol=0.02)

    # Why torchvision's own generator is not used: it takes the stride as image_size // grid_size.
    plain = AnchorGenerator(tuple((s,) for s in RPN_ANCHOR_SIZES), ((0.5, 1.0, 2.0),) * 5)
    plain_anchors = plain(ImageList(images, [(600, 1000)]), features)[0]
    p4_start = sum(h * w * 3 for h, w in grid_sizes[:2])
    p4_ys = torch.unique(((plain_anchors[:, 1] + plain_anchors[:, 3]) / 2)[p4_start : p4_start + 38 * 63 * 3])
    assert float(p4_ys[1] - p4_ys[0]) == 15.0  # 600 // 38, not 16


def test_a_stride_1_last_stage_is_refused(pyramid_600x1000):
    """The original's bug: layer4 with stride 1 doubles the P5/P6 grids; anchors laid out for strides 32/64
    on those grids put about 3/4 of their centres outside the image. The anchor generator refuses it."""
    model, images, _ = pyramid_600x1000
    wrong = copy.deepcopy(model)
    wrong.backbone.layer4[0].conv1.stride = (1, 1)
    wrong.backbone.layer4[0].downsample[0].stride = (1, 1)
    small = images[:, :, :128, :192]
    with torch.no_grad():
        features = wrong.fpn(wrong.backbone(small))
    assert [tuple(f.shape[-2:]) for f in features][3:] == [(8, 12), (4, 6)]  # P5, P6 at stride 16, 32
    with pytest.raises(ValueError, match="do not match the anchor strides"):
        wrong.rpn.anchor_generator(ImageList(small, [(128, 192)]), features)
    # At 600x1000 the stride-1 P5 grid is 38x63; with stride-32 anchors only 19x32 centres fall inside.
    inside = math.ceil(600 / 32) * math.ceil(1000 / 32) / (38 * 63)
    assert 1 - inside == pytest.approx(0.746, abs=1e-3)


def test_roi_level_mapping_is_the_log2_rule(pyramid_600x1000):
    model, _, features = pyramid_600x1000
    pooler = model.roi_heads.box_roi_pool
    named = dict(zip(("p2", "p3", "p4", "p5", "p6"), features))
    sides = torch.tensor([112.0, 224.0, 448.0, 896.0])
    centre = torch.tensor([500.0, 300.0, 500.0, 300.0])
    squares = centre + torch.stack([-sides, -sides, sides, sides], 1) / 2
    pooled = pooler(named, [squares], [(600, 1000)])  # also sets up the scales and the level mapper
    mapper = pooler.map_levels
    assert (mapper.k_min, mapper.k_max, mapper.s0, mapper.lvl0) == (2, 5, 224, 4)
    assert pooler.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]

    levels = mapper([squares]) + mapper.k_min
    assert levels.tolist() == [3, 4, 5, 5]  # 896 would be P6: clamped to P5
    # The pooled features really come from those levels: 112 from P3 (stride 8), 896 from P5 (stride 32).
    for i, level, stride in ((0, 1, 8), (3, 3, 32)):
        expected = roi_align(
            features[level], [squares[i : i + 1]], 7, spatial_scale=1 / stride, sampling_ratio=2
        )
        torch.testing.assert_close(pooled[i], expected[0])

    # Any size, square or not: floor(4 + log2(sqrt(w h) / 224)) clamped to [2, 5].
    generator = torch.Generator().manual_seed(1)
    wh = torch.exp(torch.empty(500, 2).uniform_(math.log(4), math.log(1500), generator=generator))
    wh = torch.cat([wh, torch.tensor([[56.0, 896.0], [16.0, 16.0], [2000.0, 2000.0]])])
    boxes = torch.cat([torch.zeros_like(wh), wh], 1)
    expected = torch.clamp(torch.floor(4 + torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / 224)), 2, 5)
    assert torch.equal(mapper([boxes]) + 2, expected.long())
    assert expected[-3:].tolist() == [4, 2, 5]


def test_training_losses_are_finite_and_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model, criterion, _ = build_faster_rcnn(make_args())
    model.train()
    images = torch.randn(2, 3, 64, 96)
    targets = [
        target([[10, 12, 50, 60], [60, 20, 90, 60], [0, 0, 30, 30]], [0, 2, -1], (64, 90)),
        target([[20, 30, 70, 58]], [1], (60, 96), difficult=[True]),  # nothing left: background image
    ]
    outputs = model(images, targets)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert outputs["num_dropped_boxes"] == 2
    assert model.dropped_box_counts == {"dropped": 2, "ignore_label": 1, "difficult": 1, "crowd": 0}
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # from scratch: nothing frozen
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    for part in (
        "backbone.stem",
        "backbone.layer4",
        "fpn",
        "rpn.head",
        "roi_heads.box_head",
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
    ):
        norm = sum(p.grad.abs().sum() for n, p in trainable if n.startswith(part))
        assert norm > 0, part

    weighted = FasterRCNNCriterion({"loss_box_reg": 2.0})(outputs, targets)
    torch.testing.assert_close(weighted["loss_box_reg"], 2 * losses["loss_box_reg"])
    with pytest.raises(ValueError, match="training mode"):
        criterion({"class_logits": torch.zeros(1, 4)}, targets)


def test_eval_outputs_and_build_model_dispatch(tmp_path):
    torch.manual_seed(0)
    args = make_args("--conf_thresh", "0.0", "--topk", "7")
    model, _, postprocessor = build_model(args)  # through the arch table
    model.eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outputs = model(images)
        with_features = model(images, None, return_features=True)
    assert "box_features" not in outputs and outputs["image_sizes"] == [(64, 96), (64, 96)]
    num_rois = sum(len(p) for p in outputs["proposals"])
    assert outputs["class_logits"].shape == (num_rois, 4) and outputs["box_regression"].shape == (
        num_rois,
        16,
    )
    assert with_features["box_features"].shape == (num_rois, 1024)
    targets = [target([], [], (64, 80), scale=(0.5, 0.5), orig_size=(128, 160)), target([], [], (60, 96))]
    detections = postprocessor(with_features, targets)
    for det, (h, w) in zip(detections, [(128, 160), (60, 96)]):
        assert len(det["boxes"]) == 7 and det["roi_features"].shape == (7, 1 + 4 + 4 + 1024)
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()

    # Under bf16 autocast the proposals and box outputs stay float32 (bf16 rounds 600 px coordinates to 4 px).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(images[:1])
    assert mixed["proposals"][0].dtype == torch.float32 and mixed["box_regression"].dtype == torch.float32

    # Loaded weights freeze the stem + layer1 and batch norm, as for the single-stage model.
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    frozen, _, _ = build_faster_rcnn(make_args("--pretrained", str(weights)))
    assert not any(p.requires_grad for p in frozen.backbone.stem.parameters())
    assert not any(p.requires_grad for p in frozen.backbone.layer1.parameters())
    assert frozen.backbone.layer2[0].conv1.weight.requires_grad
    assert not frozen.backbone.layer2[0].bn1.weight.requires_grad  # --freeze_bn by default
    resumed, _, _ = build_faster_rcnn(
        make_args("--pretrained", str(tmp_path / "gone.pth")), load_pretrained=False
    )
    assert not any(p.requires_grad for p in resumed.backbone.layer1.parameters())


# ------------------------------------------------------------------------------------------------
# End to end with the scripts.

MODEL_OPTS = [
    "--arch",
    "faster_rcnn_fpn",
    "--dataset",
    "shapes",
    "--basenet",
    "resnet18",
    "--pretrained",
    "none",
    "--fpn_channels",
    "16",
    "--input_dim",
    "64",
    "--device",
    "cpu",
    "-j",
    "0",
    "--eval_batch_size",
    "4",
]
TRAIN_OPTS = [
    "--batch_size",
    "2",
    "--lr",
    "0.01",
    "--step_values",
    "2",
    "--warmup_iters",
    "1",
    "--save_step",
    "2",
    "--keep_checkpoints",
    "0",
    "--val_step",
    "0",
    "--log_step",
    "1",
    "--run_name",
    "r",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shapes.main(
        shapes.get_args_parser().parse_args(
            [
                "--data_root",
                str(root),
                "--num_train",
                "8",
                "--num_val",
                "4",
                "--image_size",
                "64",
                "--min_size",
                "16",
                "--num_workers",
                "0",
            ]
        )
    )
    return str(root)


def test_train_resume_evaluate_demo_extract_features(data_root, tmp_path):
    def run_train(max_iter, *extra):
        argv = (
            MODEL_OPTS
            + TRAIN_OPTS
            + ["--data_root", data_root, "--save_root", str(tmp_path), "--max_iter", str(max_iter), *extra]
        )
        return train.main(train.get_args_parser().parse_args(argv))

    assert run_train(2, "--no_val")["iteration"] == 2
    summary = run_train(4, "--resume", "auto")  # continues from model_000002.pth and validates at the end
    assert summary["iteration"] == 4 and 0.0 <= summary["val_voc_map_area"] <= 1.0
    run_dir = tmp_path / "r"
    checkpoint = str(run_dir / "model_000004.pth")
    state = load_checkpoint(checkpoint)
    assert state["args"]["arch"] == "faster_rcnn_fpn" and state["anchors"] is None
    # The RPN and RoI heads sample anchors and proposals at random: the checkpoint carries the random
    # generators' state, so the resumed run ends with the weights of an uninterrupted one.
    assert len(state["rng_states"]) == 1 and state["rng_states"][0]["cpu"].dtype == torch.uint8
    run_train(4, "--run_name", "uninterrupted")
    uninterrupted = load_checkpoint(str(tmp_path / "uninterrupted" / "model_000004.pth"))["model"]
    assert uninterrupted.keys() == state["model"].keys()
    for key in uninterrupted:
        torch.testing.assert_close(state["model"][key], uninterrupted[key], rtol=0, atol=0, msg=key)

    common = ["--checkpoint", checkpoint, "--data_root", data_root, "--conf_thresh", "0.0"]
    headline = evaluate.main(evaluate.get_args_parser().parse_args(common + ["--save_path", str(tmp_path)]))
    assert 0.0 <= headline[checkpoint]["voc_map_area"] <= 1.0

    images = sorted(glob.glob(os.path.join(data_root, "shapes", "images", "val", "*.png")))[:2]
    records = demo.main(
        demo.get_args_parser().parse_args(
            common
            + [
                "--images",
                *images,
                "--save_path",
                str(tmp_path / "demo"),
                "--score_thresh",
                "0.0",
                "--topk",
                "3",
            ]
        )
    )
    assert len(records) == 2 and all(1 <= len(r["detections"]) <= 3 for r in records)
    assert all(os.path.isfile(r["output"]) for r in records)

    features_dir = tmp_path / "features"
    summary = extract_features.main(
        extract_features.get_args_parser().parse_args(
            common + ["--save_path", str(features_dir), "--num_nodes", "5"]
        )
    )
    assert summary["num_images"] == 4 and summary["shape"] == (5, 1 + 4 + 4 + 1024)
    table = torch.load(sorted(glob.glob(str(features_dir / "*.pth")))[0], weights_only=True)
    live = table[table[:, 0] > 0]
    probs = live[:, 5:9]
    torch.testing.assert_close(probs.sum(1), torch.ones(len(live)))
    torch.testing.assert_close(live[:, 0], 1 - probs[:, 0])
    assert (live[:, 1:5] >= 0).all() and (live[:, 1:5] <= 1).all()


def test_build_rejects_missing_num_classes():
    args = make_args()
    args.num_classes = None
    with pytest.raises(ValueError, match="num_classes"):
        build_faster_rcnn(args)
