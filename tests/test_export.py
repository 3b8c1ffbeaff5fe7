"""export.py: ONNX (onnxruntime) and TorchScript match PyTorch; the NumPy post-processing matches
Detector; the weights-only checkpoint loads everywhere."""

import json
import os

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from inference_helpers import train_tiny, val_images
from option_helpers import parse_options
from tiny_shapes import MODEL_OPTS, make_tiny_shapes

import demo
import evaluate
import export
import extract_features
from engine import Detector
from models import build_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.export import ExportableNetwork
from utils.numpy_postprocess import detect, grid_anchors


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    return train_tiny(data_root, tmp_path_factory.mktemp("runs"), iterations=2)


def run_export(checkpoint, fmt, save_path=None):
    argv = ["--checkpoint", checkpoint, "--format", fmt] + (
        ["--save_path", str(save_path)] if save_path else []
    )
    return export.main(export.get_args_parser().parse_args(argv))


def pytorch_outputs(checkpoint, images):
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    with torch.no_grad():
        outputs = detector.model(images)
    return outputs["pred_logits"], outputs["pred_box_deltas"], outputs["anchors"]


# Batch, height and width all differ from the 2 x 64 x 64 example the export traced with.
SHAPES = [(1, 3, 64, 64), (3, 3, 96, 160), (2, 3, 75, 50)]


def test_onnx_matches_pytorch_with_dynamic_batch_and_size(checkpoint, tmp_path):
    summary = run_export(checkpoint, "onnx", tmp_path / "det.onnx")
    assert summary["meta_path"] == str(tmp_path / "det.json")
    model = onnx.load(str(tmp_path / "det.onnx"))
    stored = json.loads({p.key: p.value for p in model.metadata_props}["fpn_ohem_meta"])
    assert stored == json.load(open(tmp_path / "det.json")) and stored["class_names"][0] == "circle"
    session = onnxruntime.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for shape in SHAPES:
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        logits, deltas, anchors = pytorch_outputs(checkpoint, images)
        got_logits, got_deltas = session.run(None, {"images": images.numpy()})
        np.testing.assert_allclose(got_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_deltas, deltas.numpy(), rtol=1e-4, atol=1e-4)
        # The reference anchors are the model's anchors for this input size.
        ref_anchors, counts = grid_anchors(shape[2], shape[3], stored["anchor_whs"], stored["strides"])
        np.testing.assert_array_equal(ref_anchors, anchors.numpy())
        assert sum(counts) == logits.shape[1]


def test_torchscript_matches_pytorch_with_dynamic_batch_and_size(checkpoint, tmp_path):
    summary = run_export(checkpoint, "torchscript")
    assert summary["path"].endswith("model_000002.torchscript.pt")
    extra = {"meta.json": ""}
    scripted = torch.jit.load(summary["path"], _extra_files=extra)
    assert json.loads(extra["meta.json"])["strides"] == [8, 16, 32, 64, 128]
    for shape in SHAPES:
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        logits, deltas, _ = pytorch_outputs(checkpoint, images)
        with torch.no_grad():
            got_logits, got_deltas = scripted(images)
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_deltas, deltas, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("resize", ["square", "keep_aspect"])
def test_numpy_reference_postprocessing_matches_detector(resize, checkpoint, data_root, tmp_path):
    path = checkpoint
    if resize == "keep_aspect":  # the same weights, evaluated keep_aspect: padding and scales come in
        state = load_checkpoint(checkpoint)
        state["args"].update(resize_mode="keep_aspect", min_size=96, max_size=160)
        path = str(tmp_path / "keep_aspect.pth")
        save_checkpoint(state, path)
    state = load_checkpoint(path)
    state["args"]["conf_thresh"] = 0.0  # many candidates, so that NMS and top-k have work to do
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(state, path)
    meta = run_export(path, "onnx", tmp_path / "det.onnx")["meta"]
    session = onnxruntime.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    first = cv2.imread(val_images(data_root)[0])[:, :, ::-1]
    images = [cv2.resize(first, (100, 48)), cv2.imread(val_images(data_root)[1])[:, :, ::-1].copy()]
    reference = detect(lambda x: session.run(None, {"images": x}), images, meta)
    detector = Detector.from_checkpoint(path, device="cpu")
    expected = detector([np.ascontiguousarray(im[:, :, ::-1]) for im in images])  # Detector takes BGR
    for got, want in zip(reference, expected):
        assert len(want["scores"]) == meta["max_detections"] == 100
        np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["boxes"], want["boxes"].numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(got["labels"], want["labels"].numpy())
        assert got["label_names"] == want["label_names"]


@pytest.mark.slow
def test_weights_only_checkpoint_loads_in_every_script(checkpoint, data_root, tmp_path):
    summary = run_export(checkpoint, "weights", tmp_path / "w.pth")
    assert summary["left_out"] == ["lr_scheduler", "optimizer", "rng_states", "scaler"]
    state = load_checkpoint(str(tmp_path / "w.pth"))
    assert state["format"] == "weights" and "optimizer" not in state
    assert summary["bytes"] < 0.6 * os.path.getsize(checkpoint)  # SGD momentum doubles the full one
    weights = str(tmp_path / "w.pth")
    files = val_images(data_root)
    a = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)(files)
    b = Detector.from_checkpoint(weights, device="cpu", conf_thresh=0.0)(files)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
    ev = lambda ck, out: evaluate.main(  # noqa: E731
        evaluate.get_args_parser().parse_args(
            ["--checkpoint", ck, "--data_root", data_root, "--save_path", str(out)]
        )
    )
    (m_full,), (m_weights,) = ev(checkpoint, tmp_path / "e1").values(), ev(weights, tmp_path / "e2").values()
    assert m_weights == m_full
    records = demo.main(
        demo.get_args_parser().parse_args(
            ["--checkpoint", weights, "--images", *files[:2], "--save_path", str(tmp_path / "d")]
        )
    )
    assert len(records) == 2
    feats = extract_features.main(
        extract_features.get_args_parser().parse_args(
            ["--checkpoint", weights, "--data_root", data_root, "--save_path", str(tmp_path / "f")]
        )
    )
    assert feats["num_images"] == 6


def test_two_stage_models_are_refused_with_the_way_out():
    args = parse_options(*MODEL_OPTS, arch="faster_rcnn_fpn", num_classes=3)
    model, _, _ = build_model(args, load_pretrained=False)
    with pytest.raises(UserError, match="use --format weights and Detector"):
        ExportableNetwork(model)
