"""--init_from (utils/init_from.py): our checkpoints and torchvision RetinaNet / Faster R-CNN state dicts."""

import os

import pytest
import torch
import torchvision
from inference_helpers import train_tiny
from tiny_shapes import MODEL_OPTS, make_tiny_shapes
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

import train
from models import build_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, UserError
from utils.init_from import init_model_from
from utils.options import check_common_args, resolve_defaults


def our_model(*opts, num_classes=3):
    args = resolve_defaults(train.get_args_parser().parse_args(MODEL_OPTS + list(opts)))
    args.num_classes = num_classes
    model, _, _ = build_model(args, load_pretrained=False)
    return model.eval()


def torchvision_backbone(returned, extra, out_channels):
    """A torchvision ResNet-18 FPN with random weights and random batch-norm statistics."""
    body = torchvision.models.resnet18(weights=None)
    for m in body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    layers = {f"layer{k - 1}": str(i) for i, k in enumerate(returned)}
    in_channels = [{2: 64, 3: 128, 4: 256, 5: 512}[k] for k in returned]
    return BackboneWithFPN(body, layers, in_channels, out_channels, extra_blocks=extra)


def test_a_torchvision_retinanet_gives_its_backbone_and_fpn(tmp_path):
    retina = RetinaNet(torchvision_backbone([3, 4, 5], LastLevelP6P7(512, 32), 32), num_classes=5).eval()
    torch.save(retina.state_dict(), tmp_path / "retinanet.pth")
    model = our_model("--fpn_channels", "32")
    report = init_model_from(model, str(tmp_path / "retinanet.pth"))
    assert report["source"] == "torchvision detection state dict"
    assert all(k.startswith(("backbone.", "fpn.")) for k in report["loaded"])
    assert {k.split(".")[0] for k in report["left_out"]} == {"head"}  # torchvision's heads are not ours
    assert not any(k.startswith(("backbone.", "fpn.")) and "num_batches" not in k for k in report["kept"])
    # The same pyramid, computed by torchvision and by our modules with the mapped weights.
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = list(retina.backbone(images).values())  # P3, P4, P5, P6, P7
        got = model.fpn(model.backbone(images))
    assert len(got) == len(expected) == 5
    for level, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"P{level + 3}")


def test_a_torchvision_faster_rcnn_loads_into_both_architectures(tmp_path):
    faster = FasterRCNN(torchvision_backbone([2, 3, 4, 5], LastLevelMaxPool(), 256), num_classes=3).eval()
    path = str(tmp_path / "faster.pth")
    torch.save({"model": faster.state_dict(), "epoch": 3}, path)  # as torchvision's references save it
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = list(faster.backbone(images).values())  # P2..P5, pool (P6)

    two_stage = our_model("--arch", "faster_rcnn_fpn", "--fpn_channels", "256", num_classes=4)
    report = init_model_from(two_stage, path)
    loaded = set(report["loaded"])
    assert {
        "rpn.head.conv.0.0.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.box_head.fc7.bias",
    } <= loaded
    # 3 classes with background there, 4 + 1 here: the box predictor starts afresh.
    assert sorted(r.split(" ")[0] for r in report["reinitialised"]) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    assert "roi_heads.box_predictor.cls_score.weight [3, 1024] -> [5, 1024]" in report["reinitialised"]
    with torch.no_grad():
        got = two_stage.fpn(two_stage.backbone(images))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # Into the single-stage model: the C3..C5 laterals (torchvision's inner_blocks 1..3) by level.
    single = our_model("--fpn_channels", "256")
    report = init_model_from(single, path)
    torch.testing.assert_close(
        single.fpn.lateral_convs[0].weight, faster.backbone.fpn.inner_blocks[1][0].weight
    )
    torch.testing.assert_close(single.fpn.output_convs[2].bias, faster.backbone.fpn.layer_blocks[3][0].bias)
    assert "(level C2) fpn.lateral_convs.-1.weight" not in report["loaded"]
    assert any(k.startswith("(level C2)") for k in report["left_out"])
    assert {"fpn.p6.weight", "fpn.p7.weight", "head.cls_pred.weight"} <= set(report["kept"])


def test_mismatches_outside_the_predictors_and_foreign_files_are_errors(tmp_path):
    torch.save(our_model("--fpn_channels", "16").state_dict(), tmp_path / "ours16.pth")
    with pytest.raises(CheckpointError, match="without 'backbone.body"):
        init_model_from(our_model("--fpn_channels", "32"), str(tmp_path / "ours16.pth"))
    torch.save(
        {"model": our_model("--fpn_channels", "16").state_dict(), "args": {"arch": "fpn_ohem"}},
        tmp_path / "c.pth",
    )
    with pytest.raises(UserError, match=r"does not fit this model in \d+ layers.*--fpn_channels"):
        init_model_from(our_model("--fpn_channels", "32"), str(tmp_path / "c.pth"))
    torch.save({"model": {}, "args": {"arch": "yolo"}}, tmp_path / "yolo.pth")
    with pytest.raises(CheckpointError, match="its arch 'yolo' is none of this codebase's"):
        init_model_from(our_model(), str(tmp_path / "yolo.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="neither a checkpoint of this project nor a state dict"):
        init_model_from(our_model(), str(tmp_path / "list.pth"))
    args = resolve_defaults(train.get_args_parser().parse_args(MODEL_OPTS + ["--init_from", "nowhere.pth"]))
    with pytest.raises(SystemExit, match="--init_from 'nowhere.pth' does not exist"):
        check_common_args(args)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def test_train_py_fine_tunes_a_three_class_detector_on_two_classes(data_root, tmp_path):
    # A 3-class detector of this project (circle, square, triangle), written as train.py does.
    source = str(tmp_path / "source.pth")
    args = {"arch": "fpn_ohem", "basenet": "resnet18", "fpn_channels": 16}
    names = ["circle", "square", "triangle"]
    save_checkpoint(
        {"model": our_model(num_classes=3).state_dict(), "args": args, "class_names": names}, source
    )
    # lr 1e-12: one step leaves the weights as they were loaded, so they can be compared.
    path = train_tiny(
        data_root, tmp_path / "new", "--init_from", source, "--classes", "circle,square", "--lr", "1e-12"
    )
    before, after = load_checkpoint(source), load_checkpoint(path)
    assert after["class_names"] == ["circle", "square"] and after["args"]["init_from"] == source
    k = 3  # anchors per location: 1 scale x 3 ratios
    assert before["model"]["head.cls_pred.weight"].shape[0] == k * (3 + 1)
    assert after["model"]["head.cls_pred.weight"].shape[0] == k * (2 + 1)
    model = our_model(num_classes=2)
    params = {name for name, _ in model.named_parameters()}
    compared = 0
    for key, value in after["model"].items():
        if key in params and not key.startswith("head.cls_pred."):
            torch.testing.assert_close(value, before["model"][key], rtol=0, atol=1e-6, msg=key)
            compared += 1
    assert compared == len(params) - 2
    with open(os.path.join(os.path.dirname(path), "train.log")) as f:
        log = f.read()
    assert f"--init_from {source} (fpn_ohem resnet18 checkpoint, 3 classes): loaded" in log
    assert (
        "re-initialised (class count or anchors differ): head.cls_pred.weight [12, 16, 3, 3] -> [9, 16, 3, 3]"
        in log
    )


def test_a_weights_only_file_cannot_resume_but_can_start_a_run(data_root, tmp_path):
    weights = str(tmp_path / "w.pth")
    save_checkpoint(
        {"model": our_model().state_dict(), "args": {"arch": "fpn_ohem"}, "format": "weights"}, weights
    )
    with pytest.raises(
        CheckpointError, match=r"has no optimizer, lr_scheduler, scaler, iteration.*use --init_from"
    ):
        train_tiny(data_root, tmp_path / "runs", "--resume", weights)
