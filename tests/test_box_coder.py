import math

import torch

from layers.box_coder import BoxCoder


def _random_boxes(n, generator, low=1.0, high=300.0):
    xy = torch.rand(n, 2, generator=generator) * 500
    wh = low + torch.rand(n, 2, generator=generator) * (high - low)
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_hand_computed():
    coder = BoxCoder((0.1, 0.2))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    gt = torch.tensor([[2.0, 4.0, 22.0, 14.0]])  # centre (12, 9), w 20, h 10
    deltas = coder.encode(gt, anchor)
    expected = torch.tensor(
        [[(12 - 5) / 10 / 0.1, (9 - 10) / 20 / 0.1, math.log(20 / 10) / 0.2, math.log(10 / 20) / 0.2]]
    )
    assert torch.allclose(deltas, expected)
    assert torch.allclose(deltas, torch.tensor([[7.0, -0.5, 3.4657359, -3.4657359]]))


def test_round_trip_random():
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder()
    gt = _random_boxes(1000, g)
    anchors = _random_boxes(1000, g, low=8, high=500)
    decoded = coder.decode(coder.encode(gt, anchors), anchors)
    assert torch.allclose(decoded, gt, atol=1e-3)
    # Broadcasting: [N, A, 4] deltas against [A, 4] anchors.
    deltas = torch.randn(2, 1000, 4, generator=g)
    boxes = coder.decode(deltas, anchors)
    assert boxes.shape == (2, 1000, 4)
    assert torch.allclose(coder.encode(boxes, anchors), deltas, atol=1e-4)


def test_decode_clamps_size():
    coder = BoxCoder((0.1, 0.2))
    anchors = torch.tensor([[0.0, 0.0, 16.0, 32.0]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e30]])
    boxes = coder.decode(deltas, anchors)
    assert torch.isfinite(boxes).all()
    w, h = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert torch.allclose(w, torch.tensor(16.0 * 1000 / 16), rtol=1e-6)
    assert torch.allclose(h, torch.tensor(32.0 * 1000 / 16), rtol=1e-6)
    # Centre unchanged.
    assert torch.allclose((boxes[0, :2] + boxes[0, 2:]) / 2, torch.tensor([8.0, 16.0]))


def test_low_precision_inputs_compute_in_fp32():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    for dtype in (torch.float16, torch.bfloat16):
        deltas = torch.tensor([[0.5, -0.5, 30.0, 30.0]], dtype=dtype)  # exp(6) * 64: fine in fp32
        boxes = coder.decode(deltas, anchors.to(dtype))
        assert boxes.dtype == torch.float32
        assert torch.isfinite(boxes).all()
        enc = coder.encode(anchors.to(dtype) * 2, anchors.to(dtype))
        assert enc.dtype == torch.float32
