"""Detector (models/predictor.py): the same detections as evaluate.py's path, for every kind of input."""

import argparse

import cv2
import numpy as np
import pytest
import torch
from inference_helpers import FASTER_RCNN_OPTS, train_tiny, val_images
from tiny_shapes import make_tiny_shapes

import engine
from data.image_list import ImageListDataset
from data.loaders import build_eval_loader
from data.transforms import build_transforms
from engine import Detector, predict
from layers.tta import FlipTTA
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.options import OptionParser, get_common_parser


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    return train_tiny(data_root, tmp_path_factory.mktemp("runs"))


def reference_detections(path, files, tta="none", **overrides):
    """What evaluate.py / the old demo computed: build_model_from_checkpoint + eval loader + predict
    (through FlipTTA with ``tta="flip"``, as evaluate.py --tta flip)."""
    parser = OptionParser(add_help=False, parents=[get_common_parser()])
    cli = parser.parse_args([])
    for key, value in overrides.items():
        setattr(cli, key, value)
    cli.explicit_options = sorted(overrides)
    model, postprocessor, args, _ = build_model_from_checkpoint(path, cli, parser, torch.device("cpu"))
    transforms = build_transforms(False, args.resize_mode, args.input_dim, args.min_size, args.max_size)
    loader = build_eval_loader(
        ImageListDataset(files, transforms),
        args.eval_batch_size,
        0,
        size_divisibility=32 if args.resize_mode == "keep_aspect" else 1,
    )
    model = FlipTTA(model) if tta == "flip" else model
    return [d for _, dets, _ in predict(model, postprocessor, loader, torch.device("cpu")) for d in dets]


def assert_same(results, reference, class_names, exact=True):
    assert len(results) == len(reference)
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-3}
    for got, ref in zip(results, reference):
        assert len(ref["scores"]) > 0
        torch.testing.assert_close(got["boxes"], ref["boxes"], **tol)
        torch.testing.assert_close(got["scores"], ref["scores"], **tol)
        assert torch.equal(got["labels"], ref["labels"])
        assert got["label_names"] == [class_names[int(k)] for k in ref["labels"]]


def test_detector_equals_the_evaluate_path_and_batched_equals_single(checkpoint, data_root):
    files = val_images(data_root)
    reference = reference_detections(checkpoint, files, conf_thresh=0.0)
    detector = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)
    assert detector.batch_size == 4 and detector.class_names == ["circle", "square", "triangle"]
    assert_same(detector(files), reference, detector.class_names)
    detector.batch_size = 1  # one image per forward pass: same numbers up to conv summation order
    assert_same(detector(files), reference, detector.class_names, exact=False)


def test_paths_bgr_arrays_and_tensors_give_the_same_detections(checkpoint, data_root):
    files = val_images(data_root)[:3]
    detector = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)
    bgr = cv2.imread(files[1])
    rgb_uint8 = torch.from_numpy(cv2.imread(files[2])[:, :, ::-1].copy()).permute(2, 0, 1)
    rgb_float = rgb_uint8.float() / 255
    by_path = detector(files)
    mixed = detector([files[0], bgr, rgb_uint8])
    assert_same(mixed, by_path, detector.class_names)
    # A single input gives a single dict; a float tensor in 0..1 the same as its uint8 original.
    single = detector(rgb_float)
    assert isinstance(single, dict)
    assert_same([single], by_path[2:], detector.class_names, exact=False)


def test_score_thresh_keeps_the_scores_at_or_above_it(checkpoint, data_root):
    files = val_images(data_root)[:2]
    detector = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)
    everything = detector(files)
    thresh = float(everything[0]["scores"].median())
    kept = detector(files, score_thresh=thresh)
    for all_dets, some in zip(everything, kept):
        mask = all_dets["scores"] >= thresh
        assert torch.equal(some["scores"], all_dets["scores"][mask])
        assert torch.equal(some["boxes"], all_dets["boxes"][mask])
    assert 0 < len(kept[0]["scores"]) < len(everything[0]["scores"])
    assert not torch.is_inference(kept[0]["boxes"])  # usable outside inference mode (in-place ops too)
    with pytest.raises(UserError, match="score_thresh"):
        detector(files, score_thresh=1.5)


def test_keep_aspect_boxes_are_in_original_pixels(checkpoint, data_root, tmp_path):
    """A 48 x 100 image through keep_aspect resizing and padding: boxes come back in its own pixels,
    as evaluate.py's path gives them, batched with a 64 x 64 image (padding) or alone."""
    image = cv2.imread(val_images(data_root)[0])
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), cv2.resize(image, (100, 48)))
    files = [str(wide), val_images(data_root)[1]]
    opts = {"resize_mode": "keep_aspect", "min_size": 96, "max_size": 160, "conf_thresh": 0.0}
    reference = reference_detections(checkpoint, files, **opts)
    detector = Detector.from_checkpoint(checkpoint, device="cpu", **opts)
    results = detector(files)
    assert_same(results, reference, detector.class_names)
    assert (results[0]["boxes"][:, [0, 2]] <= 100).all() and (results[0]["boxes"][:, [1, 3]] <= 48).all()
    assert results[0]["boxes"][:, 2].max() > 64  # not clipped to the other image's size


def test_amp_follows_the_checkpoint(checkpoint, data_root, tmp_path, monkeypatch):
    state = load_checkpoint(checkpoint)
    state["args"]["amp"], state["args"]["amp_dtype"] = True, "bf16"
    amp_path = str(tmp_path / "amp.pth")
    save_checkpoint(state, amp_path)
    entered = []
    original = engine.autocast_context
    monkeypatch.setattr(engine, "autocast_context", lambda d, t: entered.append(t) or original(d, t))
    files = val_images(data_root)[:2]
    fp32 = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)
    bf16 = Detector.from_checkpoint(amp_path, device="cpu", conf_thresh=0.0)
    assert fp32.amp_dtype is None and bf16.amp_dtype == torch.bfloat16
    assert Detector.from_checkpoint(amp_path, device="cpu", amp=False).amp_dtype is None
    a, b = fp32(files), bf16(files)
    assert entered == [None, torch.bfloat16]
    assert float(b[0]["scores"][0]) == pytest.approx(float(a[0]["scores"][0]), abs=0.02)


def test_flip_tta_equals_evaluate_path_with_flip(checkpoint, data_root):
    """tta="flip" (or the checkpoint's --tta) runs what evaluate.py --tta flip runs, and differs from
    the plain pass."""
    files = val_images(data_root)
    reference = reference_detections(checkpoint, files, tta="flip", conf_thresh=0.0)
    detector = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0, tta="flip")
    assert detector.tta == "flip" and "tta=flip" in repr(detector)
    assert_same(detector(files), reference, detector.class_names)
    plain = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)
    assert plain.tta == "none"
    assert any(not torch.equal(a["scores"], b["scores"]) for a, b in zip(plain(files), detector(files)))


def test_bad_inputs_and_options_are_named(checkpoint):
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(UserError, match=r"<input 1>: expected a Tensor\[3, H, W\]"):
        detector([np.zeros((8, 8, 3), np.uint8), torch.zeros(1, 8, 8)])
    with pytest.raises(UserError, match="expected a file path"):
        detector([3])
    with pytest.raises(UserError, match="cannot read image 'nowhere.png'"):
        detector(["nowhere.png"])
    with pytest.raises(UserError, match=r"unknown options \['conf_threshold'\]"):
        Detector.from_checkpoint(checkpoint, device="cpu", conf_threshold=0.1)
    with pytest.raises(UserError, match="either cli_args or option overrides"):
        Detector.from_checkpoint(checkpoint, cli_args=argparse.Namespace(), topk=3)
    with pytest.raises(UserError, match="tta must be 'none' or 'flip', got 'rotate'"):
        Detector(detector.model, detector.postprocessor, detector.class_names, tta="rotate")
    with pytest.raises(UserError, match="single-stage detector only, not Sequential"):
        Detector(torch.nn.Sequential(), detector.postprocessor, detector.class_names, tta="flip")


@pytest.mark.slow
def test_faster_rcnn_detector_equals_the_evaluate_path(data_root, tmp_path):
    path = train_tiny(data_root, tmp_path, *FASTER_RCNN_OPTS)
    files = val_images(data_root)
    reference = reference_detections(path, files, conf_thresh=0.0)
    detector = Detector.from_checkpoint(path, device="cpu", conf_thresh=0.0)
    assert_same(detector(files), reference, detector.class_names)
