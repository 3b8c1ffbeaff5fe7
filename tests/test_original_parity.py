"""Parity with the original codebase (gurkirt/FPN.pytorch1.0): its checkpoints, loaded through our path,
give its per-anchor box deltas and class scores.

Runs when the environment variable FPN_ORIGINAL_REPO names a checkout of the original, e.g.

    FPN_ORIGINAL_REPO=/work/original .venv/bin/python -m pytest -q tests/test_original_parity.py

and is skipped otherwise. The original's models are imported from that checkout and built with random
weights (its ImageNet weights cannot be downloaded here); every batch-norm statistic and bias is
randomised too, so that a wrongly mapped key cannot go unnoticed.
"""

import importlib
import os
import sys

import pytest
import torch
from torch import nn

import evaluate
from layers.box_coder import BoxCoder
from models.original import describe_original_state_dict, is_original_state_dict
from utils.checkpoint import build_model_from_checkpoint

REPO = os.environ.get("FPN_ORIGINAL_REPO")
pytestmark = pytest.mark.skipif(
    not REPO or not os.path.isdir(os.path.join(REPO or "", "models")),
    reason="set FPN_ORIGINAL_REPO to a checkout of gurkirt/FPN.pytorch1.0",
)
INPUT = 136  # odd level sizes (17, 9, 5, 3, 2): the bilinear top-down path is not a plain 2x
TOLERANCE = 1e-4


def _import_original(*names):
    """Import modules of the original's ``models``/``modules`` packages without clobbering ours."""
    ours = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("models", "modules")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, REPO)
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(REPO)
        for k in [k for k in sys.modules if k.split(".")[0] in ("models", "modules")]:
            del sys.modules[k]
        sys.modules.update(ours)


def _randomise_(net: nn.Module, seed: int) -> None:
    """Random BN statistics and affine parameters, random biases, and head weights large enough that the
    outputs are O(1) (the original's N(0, 0.01) heads would give outputs below the tolerance)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d):
                if not name.startswith("base_net"):
                    m.weight.copy_(
                        torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
                    )
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def original_models():
    fpn, fpn_sh = _import_original("models.fpn", "models.fpn_shared_heads")
    return {0: fpn.build_fpn_unshared, 1: fpn_sh.build_fpn_shared_heads}


@pytest.mark.parametrize("shared_heads, bias_heads", [(0, False), (1, False), (1, True)])
def test_original_checkpoint_gives_the_original_deltas_and_scores(
    original_models, tmp_path, shared_heads, bias_heads
):
    torch.manual_seed(0)
    net = original_models[shared_heads](
        "resnet50", "", ar=9, head_size=256, num_classes=21, bias_heads=bias_heads
    )
    _randomise_(net, seed=shared_heads * 10 + int(bias_heads))
    net.eval()
    images = torch.randn(2, 3, INPUT, INPUT)
    with torch.no_grad():
        loc, conf = net(images)
    scores = torch.softmax(conf, dim=2)  # the original's evaluation: softmax over K + 1, column 0 background

    # DataParallel prefixes (the original trains with --ngpu > 1 under nn.DataParallel).
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    assert is_original_state_dict(state)
    info = describe_original_state_dict(state)
    assert (info["basenet"], info["shared_heads"], info["bias_heads"]) == (
        "resnet50",
        shared_heads,
        int(bias_heads),
    )
    path = str(tmp_path / "model_050000.pth")
    torch.save(state, path)

    parser = evaluate.get_args_parser()
    argv = ["--checkpoint", path, "--dataset", "voc", "--data_root", str(tmp_path), "--basenet", "resnet50"]
    argv += ["--shared_heads", str(shared_heads), "--input_dim", str(INPUT), "--anchor_type", "predefined"]
    model, _post, args, checkpoint = build_model_from_checkpoint(
        path, parser.parse_args(argv), parser, torch.device("cpu")
    )
    assert args.fpn_variant == "original" and args.num_classes == 20 and len(args.class_names) == 20
    assert checkpoint["iteration"] == 50000
    with torch.no_grad():
        out = model(images)
    ours_scores = torch.softmax(out["pred_logits"], dim=2)
    assert out["pred_box_deltas"].shape == loc.shape == (2, 9 * (17**2 + 9**2 + 5**2 + 3**2 + 2**2), 4)
    assert loc.std() > 0.1 and scores.std() > 0.01  # far above the tolerance: the check can fail
    delta_diff = (out["pred_box_deltas"] - loc).abs().max().item()
    score_diff = (ours_scores - scores).abs().max().item()
    print(
        f"shared_heads={shared_heads} bias={bias_heads}: max |delta diff| {delta_diff:.2e}, "
        f"max |score diff| {score_diff:.2e}"
    )
    assert delta_diff <= TOLERANCE and score_diff <= TOLERANCE


def test_original_box_decoding_equals_our_box_coder():
    """The original decodes (dx, dy, dw, dh) with variances (0.1, 0.2) against (cx, cy, w, h) anchors in
    fractions of the input; ours against xyxy anchors in pixels. Same boxes, on its own pdf9 anchors."""
    (box_utils,) = _import_original("modules.box_utils")
    (anchor_box,) = _import_original("modules.anchor_box_base")
    anchors_cxcywh = anchor_box.anchorBox("pdf9", input_dim=600).forward()
    assert anchors_cxcywh.shape == (67995, 4)
    torch.manual_seed(0)
    loc = torch.randn(len(anchors_cxcywh), 4)
    theirs = box_utils.decode(loc, anchors_cxcywh, [0.1, 0.2]) * 600
    half = anchors_cxcywh[:, 2:] / 2
    anchors_xyxy = torch.cat([anchors_cxcywh[:, :2] - half, anchors_cxcywh[:, :2] + half], 1) * 600
    ours = BoxCoder(variances=(0.1, 0.2)).decode(loc, anchors_xyxy)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-5)  # pixels: 1e-3 px
    boxes = box_utils.decode(loc, anchors_cxcywh, [0.1, 0.2])
    encoded = box_utils.encode(boxes, anchors_cxcywh, [0.1, 0.2])
    torch.testing.assert_close(
        BoxCoder((0.1, 0.2)).encode(boxes * 600, anchors_xyxy), encoded, atol=1e-3, rtol=1e-4
    )
