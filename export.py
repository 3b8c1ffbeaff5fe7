"""Export a checkpoint: ONNX or TorchScript network, or a weights-only checkpoint.

    python export.py --checkpoint runs/RUN/model_050000.pth --format onnx         # -> model_050000.onnx
    python export.py --checkpoint CKPT --format torchscript --save_path det.pt
    python export.py --checkpoint CKPT --format weights       # -> model_050000_weights.pth

onnx / torchscript: ``images`` float32[N, 3, H, W] (normalised as in training; N, H, W dynamic) ->
``pred_logits`` [N, A, C], ``pred_box_deltas`` [N, A, 4]. Anchors and post-processing are outside the
graph, in the NumPy reference utils/numpy_postprocess.py, driven by ``<save_path stem>.json`` written
alongside (also inside the file). Single-stage (fpn_ohem) checkpoints only; see utils/export.py.
weights: model weights, options, class names, category ids and anchors, without the optimizer state;
every script's --checkpoint, train.py's --init_from and ``Detector.from_checkpoint`` load it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict

from engine import Detector
from models.archs import ARCH_SPECS, archs_with
from utils.errors import UserError, run_cli
from utils.export import export_onnx, export_torchscript, export_weights
from utils.logger import setup_logging
from utils.options import OptionParser

logger = logging.getLogger("export")

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "weights": "_weights.pth"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = OptionParser("Export a checkpoint to ONNX, TorchScript or weights only", add_help=add_help)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="what to write")
    parser.add_argument(
        "--save_path", default=None, help="output file (default: next to the checkpoint, see the examples)"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    return parser


def main(args: argparse.Namespace) -> Dict[str, Any]:
    setup_logging()
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    save_path = args.save_path or os.path.splitext(args.checkpoint)[0] + SUFFIXES[args.format]
    if os.path.abspath(save_path) == os.path.abspath(args.checkpoint):
        raise UserError(f"--save_path {save_path!r} is the checkpoint itself")
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    if args.format == "weights":
        info = export_weights(args.checkpoint, save_path)
        logger.info("wrote %s (%.1f MB)", save_path, info["bytes"] / 1e6)
        return {"path": save_path, **info}
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu", amp=False)
    if not ARCH_SPECS[detector.args.arch].exportable:
        raise UserError(
            f"--format {args.format} exports single-stage (--arch {archs_with('exportable')}) checkpoints "
            f"only; {args.checkpoint!r} is {detector.args.arch}: use --format weights with Detector"
        )
    if args.format == "onnx":
        meta = export_onnx(detector, save_path, args.opset)
    else:
        meta = export_torchscript(detector, save_path)
    meta_path = os.path.splitext(save_path)[0] + ".json"
    if meta_path.endswith(".torchscript.json"):
        meta_path = meta_path[: -len(".torchscript.json")] + ".json"
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    logger.info("wrote %s and its post-processing settings %s", save_path, meta_path)
    return {"path": save_path, "meta_path": meta_path, "meta": meta}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
