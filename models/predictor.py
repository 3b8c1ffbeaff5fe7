"""``Detector``: a trained checkpoint as a Python callable, with the checkpoint's own preprocessing.

    from engine import Detector

    detector = Detector.from_checkpoint("runs/x/model_050000.pth", device="cuda")
    results = detector(["a.jpg", image_bgr_array, image_tensor], score_thresh=0.3)
    results[0]["boxes"]        # Tensor[K, 4] float32, xyxy, pixels of the ORIGINAL image
    results[0]["scores"]       # Tensor[K], decreasing
    results[0]["labels"]       # Tensor[K] int64, 0..num_classes-1 (no background)
    results[0]["label_names"]  # list of K class names

Inputs: a file path (any format ``data.image_io.read_image`` reads, EXIF orientation applied); a numpy
array in OpenCV's convention (np.uint8 or uint16 [H, W, 3] BGR, [H, W] grayscale); or a torch tensor
in torchvision's convention (Tensor[3, H, W] RGB, uint8 0..255 or floating point 0..1). Each image goes
through the evaluation pipeline of the checkpoint's options (``--resize_mode``, ``--input_dim`` or
``--min_size``/``--max_size``, ImageNet normalisation) and batches are padded as data/collate.py does,
then ``engine.predict`` runs the model and the post-processor exactly as evaluate.py does, under
``torch.inference_mode()`` and, when the checkpoint trained with ``--amp``, the same autocast dtype
(bf16 on the CPU; an fp16 checkpoint runs in fp32 there, since fp16 autocast needs CUDA).
Both architectures (``fpn_ohem``, ``faster_rcnn_fpn``) work. Results are ordinary CPU tensors.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from data.collate import Collate
from data.image_io import read_image, to_uint8_rgb
from data.transforms import build_transforms
from layers.tta import FlipTTA
from models.detector import FPNDetector
from utils.errors import UserError

logger = logging.getLogger(__name__)

ImageInput = Any  # str | os.PathLike | np.ndarray | Tensor


def image_target(image_rgb: np.ndarray, index: int, file_name: str) -> Dict[str, Any]:
    """The annotation-free target of one image (the fields data/image_list.py's dataset gives)."""
    h, w = image_rgb.shape[:2]
    return {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "difficult": np.zeros((0,), bool),
        "iscrowd": np.zeros((0,), bool),
        "image_id": index,
        "file_name": file_name,
        "orig_size": np.array([h, w], np.int64),
    }


def to_rgb_array(image: ImageInput, name: str) -> np.ndarray:
    """One input as np[H, W, 3] RGB (uint8, or float32 in 0..255 for a float tensor); see the module doc."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0:
            raise UserError(f"{name}: expected an [H, W, 3] BGR or [H, W] array, got shape {image.shape}")
        return to_uint8_rgb(image, name)
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or image.numel() == 0:
            raise UserError(f"{name}: expected a Tensor[3, H, W] RGB, got shape {list(image.shape)}")
        array = image.detach().cpu().permute(1, 2, 0).numpy()
        if image.dtype == torch.uint8:
            return np.ascontiguousarray(array)
        if image.is_floating_point():  # torchvision convention: 0..1
            return np.ascontiguousarray(array.astype(np.float32) * 255.0)
        raise UserError(f"{name}: tensor dtype {image.dtype} (expected uint8 or floating point)")
    raise UserError(f"{name}: expected a file path, a numpy array or a tensor, got {type(image).__name__}")


class Detector:
    """A model and its post-processor with the preprocessing they were trained with.

    Args:
        model, postprocessor: as ``models.build_model`` returns them, weights loaded.
        class_names: the K names, in label order.
        resize_mode, input_dim, min_size, max_size: the evaluation resize (data/transforms.py).
        device: where the model runs.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for fp32.
        batch_size: images per forward pass.
        tta: "none", or "flip" to merge each image's horizontal flip before NMS (layers/tta.py,
            single-stage models only); features (``return_features``) come from the plain pass.
    """

    def __init__(
        self,
        model: nn.Module,
        postprocessor: nn.Module,
        class_names: Sequence[str],
        resize_mode: str = "square",
        input_dim: int = 600,
        min_size: int = 600,
        max_size: int = 1000,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        batch_size: int = 8,
        tta: str = "none",
    ):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if tta not in ("none", "flip"):
            raise UserError(f"tta must be 'none' or 'flip', got {tta!r}")
        if tta == "flip" and not isinstance(model, FPNDetector):
            raise UserError(
                f"tta 'flip' applies to the single-stage detector only, not {type(model).__name__}"
            )
        self.model = model.eval()
        self.tta = tta
        # What predict runs: the model itself, or the model wrapped to merge the flipped pass.
        self._forward_model = FlipTTA(self.model) if tta == "flip" else self.model
        self.postprocessor = postprocessor
        self.class_names = list(class_names)
        self.transforms = build_transforms(False, resize_mode, input_dim, min_size, max_size)
        # keep_aspect images differ in size: pad to a multiple of 32 as training and evaluate.py do.
        self.collate = Collate(32 if resize_mode == "keep_aspect" else 1)
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.batch_size = batch_size
        self.args: argparse.Namespace | None = None  # the merged options, when built from a checkpoint
        self.checkpoint_path: str | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        device: torch.device | str | None = None,
        amp: bool | None = None,
        batch_size: int | None = None,
        cli_args: argparse.Namespace | None = None,
        parser: argparse.ArgumentParser | None = None,
        **overrides: Any,
    ) -> Detector:
        """Rebuild the detector of a checkpoint (train.py's, or export.py's ``--format weights``).

        device: default cuda when available. amp: None uses the checkpoint's ``--amp``/``--amp_dtype``
        (or the command line's, for a script), True/False forces it. batch_size: default the
        checkpoint's ``--eval_batch_size``. overrides: post-processing options of utils/options/
        (``conf_thresh=0.01``, ``nms_thresh``, ``topk``, ``pre_nms_topk``, ``class_agnostic_nms``) and
        ``tta="flip"``, which win over the checkpoint's, and ``compile=True`` (``compile_mode=...``):
        torch.compile the network (utils/compile.py; the first batch of each input size compiles).
        Scripts pass their parsed ``cli_args`` and ``parser`` instead, so that every typed option wins
        as in evaluate.py.
        """
        from utils.checkpoint import build_model_from_checkpoint
        from utils.options import OptionParser, amp_dtype_of, get_common_parser, resolve_device

        if parser is None:
            parser = OptionParser(add_help=False, parents=[get_common_parser()])
        if cli_args is None:
            cli_args = parser.parse_args([])
            unknown = sorted(k for k in overrides if not hasattr(cli_args, k))
            if unknown:
                raise UserError(f"Detector.from_checkpoint: unknown options {unknown}")
            for key, value in overrides.items():
                setattr(cli_args, key, value)
            cli_args.explicit_options = sorted(overrides)
        elif overrides:
            raise UserError("Detector.from_checkpoint: give either cli_args or option overrides, not both")
        device = resolve_device(None if device is None else str(device))
        model, postprocessor, run_args, _ = build_model_from_checkpoint(path, cli_args, parser, device)
        if getattr(cli_args, "compile", False):  # compile=True or --compile, never the checkpoint's
            from utils.compile import compile_network

            compile_network(model, cli_args.compile_mode)
        if amp is not None:
            run_args.amp = amp
        amp_dtype = None
        if run_args.amp:
            if run_args.amp_dtype == "fp16" and device.type != "cuda":
                logger.warning("%s trained with fp16 autocast, which needs CUDA: running in fp32", path)
            else:
                amp_dtype = amp_dtype_of(run_args, device.type)
        if not run_args.class_names:
            raise UserError(f"checkpoint {path!r} has no class names")
        detector = cls(
            model,
            postprocessor,
            run_args.class_names,
            run_args.resize_mode,
            run_args.input_dim,
            run_args.min_size,
            run_args.max_size,
            device,
            amp_dtype,
            batch_size or run_args.eval_batch_size,
            run_args.tta,
        )
        detector.args, detector.checkpoint_path = run_args, path
        return detector

    def preprocess(self, images: Sequence[ImageInput], start: int = 0) -> Tuple[Tensor, List[Dict]]:
        """Inputs -> (batch Tensor[N, 3, H, W] normalised and padded, targets) as the eval loader gives."""
        samples = []
        for i, image in enumerate(images, start):
            name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<input {i}>"
            rgb = to_rgb_array(image, name)
            samples.append(self.transforms(rgb, image_target(rgb, i, name)))
        batch, targets, _ = self.collate(samples)
        return batch, targets

    @torch.inference_mode()
    def predict_batches(
        self, batches: Iterable, return_features: bool = False
    ) -> Iterator[Tuple[List[Dict[str, Any]], List[Dict[str, Tensor]], Dict[str, Any]]]:
        """``engine.predict`` over ``(images, targets, skipped)`` batches (a DataLoader with data/collate.py's
        Collate, or ``preprocess``'s output) with this detector's model, device and autocast."""
        from engine import predict

        yield from predict(
            self._forward_model, self.postprocessor, batches, self.device, self.amp_dtype, return_features
        )

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], score_thresh: float = 0.0
    ) -> List[Dict[str, Any]] | Dict[str, Any]:
        """Detections per image (a list, or one dict for a single non-list input), see the module doc.

        score_thresh: keep detections with score >= it (the post-processor has already applied the
        checkpoint's ``--conf_thresh``, NMS and ``--topk``).
        """
        if not 0 <= score_thresh <= 1:
            raise UserError(f"score_thresh must be in [0, 1], got {score_thresh}")
        single = not isinstance(images, (list, tuple))
        inputs = [images] if single else list(images)
        results: List[Dict[str, Any]] = []
        for start in range(0, len(inputs), self.batch_size):
            batch = self.preprocess(inputs[start : start + self.batch_size], start)
            for _, detections, _ in self.predict_batches([(*batch, [])]):
                results.extend(self.format(d, score_thresh) for d in detections)
        return results[0] if single else results

    def format(self, detection: Dict[str, Tensor], score_thresh: float = 0.0) -> Dict[str, Any]:
        """A post-processor dict -> {boxes, scores, labels, label_names} above ``score_thresh``."""
        keep = detection["scores"] >= score_thresh
        labels = detection["labels"][keep]
        return {
            "boxes": detection["boxes"][keep],
            "scores": detection["scores"][keep],
            "labels": labels,
            "label_names": [self.class_names[int(k)] for k in labels],
        }

    def __repr__(self) -> str:
        return (
            f"Detector({self.checkpoint_path or type(self.model).__name__}, {len(self.class_names)} classes, "
            f"{self.transforms.transforms[-2]!r}, device={self.device}, amp={self.amp_dtype}, tta={self.tta})"
        )
