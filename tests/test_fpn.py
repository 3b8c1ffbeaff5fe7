import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.fpn import FPN


def _identity_(conv: nn.Conv2d) -> None:
    """Make a 1-channel conv the identity (1x1 weight 1, or a 3x3 kernel with a centred 1)."""
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.weight.shape[-1]
        conv.weight[0, 0, k // 2, k // 2] = 1.0
        conv.bias.zero_()


def test_top_down_path_by_hand_with_odd_sizes():
    fpn = FPN([1, 1, 1], out_channels=1, extra_levels=None)
    for conv in list(fpn.lateral_convs) + list(fpn.output_convs):
        _identity_(conv)
    c3 = torch.arange(25.0).view(1, 1, 5, 5)
    c4 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).view(1, 1, 3, 3) * 100
    c5 = torch.tensor([[1000.0, 2000.0], [3000.0, 4000.0]]).view(1, 1, 2, 2)
    p3, p4, p5 = fpn([c3, c4, c5])
    # Nearest upsampling 2 -> 3 reads source rows/cols floor(i * 2 / 3) = 0, 0, 1; 3 -> 5 reads 0, 0, 1, 1, 2.
    up_2_3 = [0, 0, 1]
    up_3_5 = [0, 0, 1, 1, 2]
    expected_p4 = c4[0, 0] + c5[0, 0][up_2_3][:, up_2_3]
    expected_p3 = c3[0, 0] + expected_p4[up_3_5][:, up_3_5]
    assert torch.equal(p5[0, 0], c5[0, 0])
    assert torch.equal(p4[0, 0], expected_p4)
    assert torch.equal(p3[0, 0], expected_p3)


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_p6_p7_sizes_and_inputs_at_600(p6_from):
    torch.manual_seed(0)
    fpn = FPN([16, 24, 32], out_channels=8, extra_levels="p6p7", p6_from=p6_from)
    c3, c4, c5 = torch.randn(1, 16, 75, 75), torch.randn(1, 24, 38, 38), torch.randn(1, 32, 19, 19)
    outputs = fpn([c3, c4, c5])
    assert fpn.num_outputs == 5
    assert [tuple(o.shape) for o in outputs] == [(1, 8, s, s) for s in (75, 38, 19, 10, 5)]
    assert fpn.p6.in_channels == (32 if p6_from == "c5" else 8)
    p6_input = c5 if p6_from == "c5" else outputs[2]
    p6 = F.conv2d(p6_input, fpn.p6.weight, fpn.p6.bias, stride=2, padding=1)
    p7 = F.conv2d(p6.relu(), fpn.p7.weight, fpn.p7.bias, stride=2, padding=1)
    torch.testing.assert_close(outputs[3], p6)
    torch.testing.assert_close(outputs[4], p7)


def test_maxpool_p6_on_c2_to_c5_for_a_two_stage_detector():
    fpn = FPN([8, 16, 24, 32], out_channels=8, extra_levels="maxpool_p6")
    features = [torch.randn(2, c, s, s + 3) for c, s in zip((8, 16, 24, 32), (40, 20, 10, 5))]
    outputs = fpn(features)
    assert fpn.num_outputs == 5 and fpn.p6 is None
    assert [tuple(o.shape[-2:]) for o in outputs] == [(40, 43), (20, 23), (10, 13), (5, 8), (3, 4)]
    assert torch.equal(outputs[4], outputs[3][:, :, ::2, ::2])
    with pytest.raises(ValueError, match="4 input maps"):
        fpn(features[1:])


def test_init_is_caffe2_xavier():
    fpn = FPN([512, 1024, 2048], out_channels=256)
    for conv in [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.95 * bound  # uniform over the whole range, not a narrower one
        assert torch.count_nonzero(conv.bias) == 0


def test_bad_options():
    with pytest.raises(ValueError, match="extra_levels"):
        FPN([8], 8, extra_levels="p6")
    with pytest.raises(ValueError, match="p6_from"):
        FPN([8], 8, p6_from="c4")


def test_original_variant_by_hand():
    """P5 = lateral(C5) (no 3x3); P4 = 3x3(up(P5) + lateral(C4)); P3 = 3x3(up(P4) + lateral(C3)), with
    bilinear align_corners=True upsampling of the smoothed maps; P6 on C5, P7 on ReLU(P6)."""
    fpn = FPN([1, 1, 1], out_channels=1, extra_levels="p6p7", variant="original")
    assert len(fpn.output_convs) == 2  # P3 and P4 only
    assert all(c.bias is None for c in [*fpn.output_convs, fpn.p6, fpn.p7])
    assert all(c.bias is not None for c in fpn.lateral_convs)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.fill_(1.0)
            conv.bias.fill_(0.5)
        for conv in fpn.output_convs:  # 3x3 identity times 2
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 2.0
    c5 = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).view(1, 1, 2, 2)
    c4 = torch.zeros(1, 1, 3, 3)
    c3 = torch.zeros(1, 1, 5, 5)
    p3, p4, p5, p6, p7 = fpn([c3, c4, c5])
    assert torch.equal(p5[0, 0], c5[0, 0] + 0.5)
    # align_corners=True, 2 -> 3 samples source positions 0, 0.5, 1: the corners stay, the middle averages.
    up5 = torch.tensor([[0.5, 2.5, 4.5], [4.5, 6.5, 8.5], [8.5, 10.5, 12.5]])
    torch.testing.assert_close(p4[0, 0], 2 * (up5 + 0.5))
    # 3 -> 5 samples positions 0, 0.5, 1, 1.5, 2 of the smoothed P4 (which is linear: a plane), so the
    # upsampled map is the plane 2 * (x + y * 4) + 2 on the finer grid, x, y in steps of 0.5.
    ys, xs = torch.meshgrid(torch.arange(5) / 2, torch.arange(5) / 2, indexing="ij")
    up4 = 2 * (2 * xs + 4 * ys + 0.5 + 0.5)
    torch.testing.assert_close(p3[0, 0], 2 * (up4 + 0.5))
    torch.testing.assert_close(p6, F.conv2d(c5, fpn.p6.weight, stride=2, padding=1))
    torch.testing.assert_close(p7, F.conv2d(p6.relu(), fpn.p7.weight, stride=2, padding=1))


def test_original_variant_init_and_its_constraints():
    torch.manual_seed(0)
    fpn = FPN([512, 1024, 2048], out_channels=256, variant="original")
    for conv in [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]:
        # N(0, sqrt(2 / n)), n = k * k * out_channels (He, fan-out), as the original's ResNetFPN
        expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        assert abs(conv.weight.std().item() / expected - 1) < 0.05
    with pytest.raises(ValueError, match="P6 and P7 from C5"):
        FPN([8, 8, 8], 8, p6_from="p5", variant="original")
    with pytest.raises(ValueError, match="variant"):
        FPN([8], 8, variant="detectron")
