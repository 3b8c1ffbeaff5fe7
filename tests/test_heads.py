import math

import pytest
import torch
from torch import nn

from models.heads import DetectionHead, _flatten_level


def _conv3x3_params(c_in, c_out):
    return 9 * c_in * c_out + c_out


@pytest.mark.parametrize("shared", [0, 2, 4])
def test_parameter_counts_for_shared_layers(shared):
    channels, anchors, classes, layers = 32, 9, 5, 4
    head = DetectionHead(channels, anchors, classes, num_layers=layers, shared_layers=shared)
    tower_convs = shared + 2 * (layers - shared)
    expected = (
        tower_convs * _conv3x3_params(channels, channels)
        + _conv3x3_params(channels, anchors * classes)
        + _conv3x3_params(channels, anchors * 4)
    )
    # 0 shared: 8 tower convs; 2 shared: 6; 4 shared: 4 (one tower, the "SH" variant).
    assert tower_convs == {0: 8, 2: 6, 4: 4}[shared]
    assert sum(p.numel() for p in head.parameters()) == expected


def test_flatten_order_is_cell_row_major_then_anchor():
    n, a, c, h, w = 2, 3, 4, 2, 5
    # Encode (image, anchor, class, y, x) in the value: the [N, A*C, H, W] conv layout has channel a*C + c.
    i, ai, ci, yi, xi = torch.meshgrid(*[torch.arange(s) for s in (n, a, c, h, w)], indexing="ij")
    code = (((i * 10 + ai) * 10 + ci) * 10 + yi) * 10 + xi
    pred = code.reshape(n, a * c, h, w).float()
    flat = _flatten_level(pred, c)
    assert flat.shape == (n, h * w * a, c)
    for img, y, x, anchor, cls in [(0, 0, 0, 0, 0), (1, 1, 3, 2, 1), (0, 1, 4, 1, 3), (1, 0, 2, 2, 0)]:
        row = (y * w + x) * a + anchor
        assert flat[img, row, cls] == (((img * 10 + anchor) * 10 + cls) * 10 + y) * 10 + x


def test_outputs_concatenate_levels_and_expose_tower_features():
    torch.manual_seed(0)
    head = DetectionHead(16, num_anchors=2, num_classes=3, num_layers=2, shared_layers=1)
    sizes = [(6, 10), (3, 5), (2, 3)]
    features = [torch.randn(2, 16, h, w) for h, w in sizes]
    out = head(features)
    total = sum(h * w * 2 for h, w in sizes)
    assert out["pred_logits"].shape == (2, total, 3)
    assert out["pred_box_deltas"].shape == (2, total, 4)
    assert [tuple(f.shape) for f in out["head_features"]] == [(2, 16, h, w) for h, w in sizes]
    assert all((f >= 0).all() for f in out["head_features"])  # after the ReLU
    # The last level's slice comes from the classifier applied to its tower feature.
    last = _flatten_level(head.cls_pred(out["head_features"][2]), 3)
    torch.testing.assert_close(out["pred_logits"][:, -2 * 3 * 2 :], last)


def test_fully_shared_tower_feeds_both_predictors():
    head = DetectionHead(8, num_anchors=1, num_classes=2, num_layers=3, shared_layers=3)
    assert len(head.cls_tower) == 0 and len(head.box_tower) == 0
    out = head([torch.randn(1, 8, 4, 4)])
    shared = out["head_features"][0]
    torch.testing.assert_close(out["pred_box_deltas"], _flatten_level(head.box_pred(shared), 4))


def test_focal_bias_is_the_prior_probability():
    head = DetectionHead(8, num_anchors=9, num_classes=80, score_type="sigmoid", prior_prob=0.01)
    assert torch.equal(head.cls_pred.bias, torch.full((9 * 80,), -math.log(99.0)))
    assert torch.sigmoid(head.cls_pred.bias).sub(0.01).abs().max() < 1e-7
    assert torch.count_nonzero(head.box_pred.bias) == 0
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.std().item() - 0.01) < 1e-3 and abs(weights.mean().item()) < 1e-3


def test_softmax_bias_gives_background_one_minus_pi():
    classes = 21  # background + 20
    head = DetectionHead(8, num_anchors=3, num_classes=classes, score_type="softmax", prior_prob=0.01)
    bias = head.cls_pred.bias.view(3, classes)
    assert torch.allclose(bias[:, 0], torch.full((3,), math.log(20 * 0.99 / 0.01)))
    assert torch.count_nonzero(bias[:, 1:]) == 0
    probs = bias.softmax(dim=1)
    torch.testing.assert_close(probs[:, 0], torch.full((3,), 0.99))
    torch.testing.assert_close(probs[:, 1:], torch.full((3, 20), 0.01 / 20))


def test_bad_options():
    with pytest.raises(ValueError, match="shared_layers"):
        DetectionHead(8, 1, 2, num_layers=2, shared_layers=3)
    with pytest.raises(ValueError, match="score_type"):
        DetectionHead(8, 1, 2, score_type="softmax2")


def test_group_norm_towers_normalise_each_image_and_level():
    torch.manual_seed(0)
    head = DetectionHead(64, 2, 3, num_layers=2, shared_layers=1, norm="gn")
    # shared: conv, gn, relu; cls and box: conv, gn, relu each
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == 32 and m.num_channels == 64 for m in norms)
    # Two levels of very different scale: after the first conv + GroupNorm, every (image, group) of
    # every level has mean 0 and variance 1 (affine weights start at 1, biases at 0). The small level
    # is kept well above GroupNorm's eps (1e-5) after the N(0, 0.01) conv, which would otherwise
    # shrink the normalised variance.
    features = [torch.randn(2, 64, 8, 8) * 50 + 3, torch.randn(2, 64, 4, 4) * 2 - 1]
    for x in features:
        pre_relu = head.shared_tower[1](head.shared_tower[0](x)).view(2, 32, -1)
        torch.testing.assert_close(pre_relu.mean(-1), torch.zeros(2, 32), atol=1e-4, rtol=0)
        torch.testing.assert_close(pre_relu.var(-1, unbiased=False), torch.ones(2, 32), atol=2e-3, rtol=0)
    out = head(features)
    assert out["pred_logits"].shape == (2, (64 + 16) * 2, 3)
    with pytest.raises(ValueError, match="divisible by 32"):
        DetectionHead(48, 1, 2, num_layers=1, norm="gn")
    with pytest.raises(ValueError, match="norm must be"):
        DetectionHead(64, 1, 2, norm="bn")


def test_sh_head_is_the_originals_three_shared_then_one_per_branch():
    """--shared_heads 1 at 4 layers: 3 shared 3x3 conv + ReLU, then per branch 1 conv + ReLU and the
    predictor (the original's fpn_shared_heads.py), without tower biases for --bias_heads 0."""
    head = DetectionHead(16, num_anchors=9, num_classes=21, num_layers=4, shared_layers=3, bias=False)
    kinds = lambda seq: [type(m).__name__ for m in seq]  # noqa: E731
    assert kinds(head.shared_tower) == ["Conv2d", "ReLU"] * 3
    assert kinds(head.cls_tower) == kinds(head.box_tower) == ["Conv2d", "ReLU"]
    towers = [
        m for t in (head.shared_tower, head.cls_tower, head.box_tower) for m in t if isinstance(m, nn.Conv2d)
    ]
    assert len(towers) == 5 and all(c.bias is None for c in towers)
    assert head.cls_pred.bias is not None and head.box_pred.bias is not None  # predictors keep theirs
    expected = 5 * 9 * 16 * 16 + _conv3x3_params(16, 9 * 21) + _conv3x3_params(16, 9 * 4)
    assert sum(p.numel() for p in head.parameters()) == expected


def test_original_init_leaves_the_biases_at_pytorch_default():
    torch.manual_seed(0)
    head = DetectionHead(64, num_anchors=9, num_classes=21, score_type="softmax", init="original")
    bound = 1 / math.sqrt(64 * 9)  # PyTorch's default conv bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for bias in (head.cls_pred.bias, head.box_pred.bias, head.cls_tower[0].bias):
        assert bias.abs().max() <= bound and bias.abs().max() > 0.8 * bound
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.01) < 1e-3
    retinanet = DetectionHead(64, num_anchors=9, num_classes=21, score_type="softmax")
    assert torch.count_nonzero(retinanet.box_pred.bias) == 0
    with pytest.raises(ValueError, match="init"):
        DetectionHead(8, 1, 2, init="xavier")
