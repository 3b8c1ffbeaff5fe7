"""Export a trained detector: ONNX, TorchScript, or a weights-only checkpoint (used by export.py).

ONNX and TorchScript hold the network only: ``images`` (float32[N, 3, H, W], normalised as in training,
any N, H, W) -> ``pred_logits`` (float32[N, A, C]) and ``pred_box_deltas`` (float32[N, A, 4]), A being
the anchors of an H x W input. Anchors and post-processing (decode, thresholds, NMS, rescaling) stay
outside, in utils/numpy_postprocess.py, driven by the JSON of ``export_meta`` written next to the file
(and stored in the ONNX metadata / TorchScript extra files): NMS with dynamic shapes exports cleanly
neither to ONNX (torchvision's NMS has no ONNX NMS mapping with batched, per-class groups) nor through
the tracer. The network is exported through tracing (the anchor cache, an OrderedDict keyed by grid
sizes, is what makes ``torch.jit.script`` fail, so the wrapper below leaves the anchor generator out);
ONNX uses the TorchScript-based exporter (``dynamo=False``), which keeps batch, height and width dynamic.
Single-stage models only (``--arch fpn_ohem``); Faster R-CNN's proposal stage (RPN NMS, RoIAlign over
a variable number of proposals) is not exported: use ``--format weights`` and ``Detector`` for it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_box_deltas")
# What a weights-only checkpoint keeps of a training checkpoint (no optimizer, scheduler, scaler, RNG).
WEIGHTS_KEYS = ("model", "args", "class_names", "category_ids", "anchors", "iteration")


class ExportableNetwork(nn.Module):
    """The single-stage network without its anchor generator: images -> (pred_logits, pred_box_deltas).

    ``images`` Tensor[N, 3, H, W] -> Tensor[N, A, C] (raw scores: softmax over C = K + 1 with background
    first, or sigmoid over C = K) and Tensor[N, A, 4] (deltas against the anchors of
    utils/numpy_postprocess.grid_anchors), the same tensors FPNDetector's forward returns.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not all(hasattr(detector, name) for name in ("backbone", "fpn", "head", "anchor_generator")):
            raise UserError(
                f"{type(detector).__name__} cannot be exported to ONNX/TorchScript (single-stage --arch "
                "fpn_ohem only); use --format weights and Detector"
            )
        self.backbone, self.fpn, self.head = detector.backbone, detector.fpn, detector.head

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        outputs = self.head(self.fpn(self.backbone(images)))
        return outputs["pred_logits"], outputs["pred_box_deltas"]


def export_meta(detector: Any) -> Dict[str, Any]:
    """Everything utils/numpy_postprocess.py needs, from a models.predictor.Detector."""
    post, args = detector.postprocessor, detector.args
    generator = detector.model.anchor_generator
    return {
        "arch": args.arch,
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "class_names": list(detector.class_names),
        "category_ids": list(args.category_ids or []),
        "anchor_whs": generator.anchor_whs.tolist(),
        "strides": list(generator.strides),
        "box_variances": list(post.box_coder.variances),
        "clamp_dwdh": post.box_coder.clamp_dwdh,
        "score_type": post.score_type,
        "conf_thresh": post.conf_thresh,
        "pre_nms_topk": post.pre_nms_topk,
        "nms_thresh": post.nms_thresh,
        "max_detections": post.max_detections,
        "class_agnostic": post.class_agnostic,
        "resize_mode": args.resize_mode,
        "input_dim": args.input_dim,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def example_input(detector: Any, batch: int = 2) -> Tensor:
    """A random batch at the checkpoint's input size (square) or its min_size square (keep_aspect)."""
    args = detector.args
    side = args.input_dim if args.resize_mode == "square" else args.min_size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, side, side, generator=generator)


def export_onnx(detector: Any, path: str, opset: int = 17) -> Dict[str, Any]:
    """The network as ONNX with dynamic batch, height and width; returns the metadata (also stored)."""
    import onnx

    network = ExportableNetwork(detector.model).eval()
    meta = export_meta(detector)
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch", 1: "anchors"} for name in OUTPUT_NAMES})
    with torch.no_grad():
        torch.onnx.export(
            network,
            (example_input(detector),),
            path,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = "fpn_ohem_meta", json.dumps(meta)
    onnx.save(model, path)
    return meta


def export_torchscript(detector: Any, path: str) -> Dict[str, Any]:
    """The network traced to TorchScript (any batch, height, width); metadata in the extra file meta.json."""
    network = ExportableNetwork(detector.model).eval()
    meta = export_meta(detector)
    with torch.no_grad():
        traced = torch.jit.trace(network, (example_input(detector),), check_trace=False)
    torch.jit.save(traced, path, _extra_files={"meta.json": json.dumps(meta)})
    return meta


def export_weights(checkpoint_path: str, path: str) -> Dict[str, Any]:
    """The checkpoint without optimizer/scheduler/scaler/RNG state: loadable by every script and Detector."""
    state = load_checkpoint(checkpoint_path)
    weights = {key: state[key] for key in WEIGHTS_KEYS if key in state}
    weights["format"] = "weights"
    save_checkpoint(weights, path)
    left_out = sorted(set(state) - set(WEIGHTS_KEYS))
    logger.info("weights-only checkpoint %s (left out: %s)", path, ", ".join(left_out) or "nothing")
    return {"left_out": left_out, "bytes": os.path.getsize(path)}
