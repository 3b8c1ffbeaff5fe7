"""bench/bench_quality.py: the torchvision side is fed and scored correctly; a tiny full run (slow)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_shapes import MODEL_OPTS, ROOT, make_tiny_shapes

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_quality  # noqa: E402

from data.dataset import build_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def test_torchvision_targets_keep_usable_boxes_only():
    t = {
        "boxes": torch.arange(16.0).reshape(4, 4),
        "labels": torch.tensor([0, -1, 2, 1]),
        "difficult": torch.tensor([False, False, True, False]),
        "iscrowd": torch.tensor([False, False, False, False]),
    }
    (out,) = bench_quality._torchvision_targets([t])
    assert out["labels"].tolist() == [0, 1]
    assert out["boxes"].tolist() == [[0.0, 1, 2, 3], [12, 13, 14, 15]]


class _Oracle(torch.nn.Module):
    """Returns each val image's ground truth (input pixels) as torchvision-style detections."""

    def __init__(self, val_set):
        super().__init__()
        self.val_set = val_set
        self.calls = 0

    def forward(self, images):
        outs = []
        for _ in images:
            _, t = self.val_set[self.calls]
            self.calls += 1
            outs.append({"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]})
        return outs


def test_torchvision_detections_are_mapped_to_original_pixels(data_root):
    """Perfect detections in input pixels at --input_dim 48 (images are 64 px) score AP 1: the boxes are
    scaled back to the original image and the labels map to the right categories."""
    args = bench_quality.get_args_parser().parse_args(
        MODEL_OPTS + ["--data_root", data_root, "--input_dim", "48", "--eval_batch_size", "2"]
    )
    val_set = build_dataset(args, args.val_sets, train=False)
    metrics = bench_quality.evaluate_torchvision(_Oracle(val_set), val_set, args, torch.device("cpu"))
    assert metrics["voc"]["map_area"] == pytest.approx(1.0)
    assert metrics["coco"]["AP"] > 0.99


@pytest.mark.slow
def test_bench_quality_tiny_run_prints_its_json_line(data_root, tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "bench_quality.py"),
        *MODEL_OPTS,
        "--data_root",
        data_root,
    ]
    cmd += ["--batch_size", "4", "--max_iter", "3", "--step_values", "2", "--warmup_iters", "1"]
    cmd += ["--bench_root", str(tmp_path), "--conf_thresh", "0.001", "--log_step", "1", "--tta", "flip"]
    cmd += ["--fpn_channels", "32"]  # the default torchvision v2 peer has GroupNorm(32) heads
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "ours_map50",
        "ours_focal_map50",
        "torchvision_map50",
        "ratio_map50",
        "ours_coco_ap",
        "torchvision_coco_ap",
        "ours_train_s",
        "torchvision_train_s",
        "ours_plain_map50",  # --tta flip: also the trained weights without TTA
        "ours_focal_plain_map50",
        "ratio_plain_map50",
    ):
        assert key in summary
    for ratio, ours in (("ratio_map50", "ours_map50"), ("ratio_plain_map50", "ours_plain_map50")):
        if summary["torchvision_map50"] > 0:
            assert summary[ratio] == pytest.approx(summary[ours] / summary["torchvision_map50"], rel=1e-2)
        else:  # no ratio against a peer that scored 0
            assert summary[ratio] is None


def test_torchvision_anchors_default_and_scaled():
    """``default`` is retinanet_resnet50_fpn's own anchor table; ``scaled`` is it times input_dim / 800."""
    from torchvision.models.detection.retinanet import _default_anchorgen

    default = bench_quality.torchvision_anchor_generator(256, "default")
    assert default.sizes == _default_anchorgen().sizes
    assert default.aspect_ratios == _default_anchorgen().aspect_ratios
    scaled = bench_quality.torchvision_anchor_generator(256, "scaled")
    assert scaled.sizes[0] == pytest.approx((32 * 0.32, 40 * 0.32, 50 * 0.32))
    assert scaled.sizes[4] == pytest.approx((512 * 0.32, 645 * 0.32, 812 * 0.32))
    args = bench_quality.get_args_parser().parse_args(
        MODEL_OPTS + ["--input_dim", "256", "--fpn_channels", "32"]
    )
    assert args.torchvision_anchors == "scaled"
    model = bench_quality._torchvision_retinanet(args, 3)
    assert model.anchor_generator.sizes == scaled.sizes


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_torchvision_variant_is_torchvisions_own_design(variant):
    """At ResNet-50 and 256 FPN channels, each variant has exactly the parameters (names and shapes) and
    box loss of torchvision's own builder: retinanet_resnet50_fpn (v1) or retinanet_resnet50_fpn_v2 (v2),
    whose heads differ by GroupNorm and whose P6 comes from P5 (v1) or C5 (v2)."""
    from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

    builder = retinanet_resnet50_fpn_v2 if variant == "v2" else retinanet_resnet50_fpn
    reference = builder(weights=None, weights_backbone=None, num_classes=5)
    args = bench_quality.get_args_parser().parse_args(
        MODEL_OPTS
        + ["--basenet", "resnet50", "--fpn_channels", "256", "--input_dim", "800"]
        + ["--torchvision_anchors", "default", "--torchvision_variant", variant]
    )
    ours = bench_quality._torchvision_retinanet(args, 5)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours.head.regression_head._loss_type == reference.head.regression_head._loss_type
    assert ours.anchor_generator.sizes == reference.anchor_generator.sizes
    norms = [m for m in ours.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == (8 if variant == "v2" else 0)


def test_torchvision_variant_v2_checks_fpn_channels():
    args = bench_quality.get_args_parser().parse_args(MODEL_OPTS + ["--fpn_channels", "48"])
    with pytest.raises(SystemExit, match="multiple of 32"):
        bench_quality._torchvision_retinanet(args, 3)
