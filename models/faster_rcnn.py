"""Faster R-CNN with a feature pyramid (two-stage), assembled from torchvision's detection parts.

    ResNetBackbone (C2..C5) -> FPN (P2..P5, P6 = max-pool of P5)
        -> RegionProposalNetwork (torchvision; one anchor size per level on P2..P6, 3 ratios)
        -> MultiScaleRoIAlign (torchvision; P2..P5, 7x7, sampling ratio 2)
        -> TwoMLPHead (1024-d) -> FastRCNNPredictor (K + 1 classes, class-specific boxes)

Only the glue is ours: the backbone and FPN of models/, a torchvision ``AnchorGenerator`` that uses
the pyramid's true strides, the conversion of our targets, and a batched post-processor that keeps
the RoI index of each detection (for feature extraction) and maps boxes back to original pixels.
torchvision's ``GeneralizedRCNNTransform`` is NOT used: our data pipeline already resizes, normalises
and pads (data/transforms.py, data/collate.py).

Two details that decide whether this detector works (both went wrong in the codebases we descend from):
- Strides. The backbone's last stage keeps stride 2, so the levels P2..P6 have strides 4, 8, 16, 32
  and 64 and sizes ceil(H / stride). torchvision's AnchorGenerator derives each stride as
  ``image_size // grid_size``, which is wrong unless the input is a multiple of 64 (600 // 38 = 15 on P4;
  a 608-row batch gives 608 // 10 = 60 on P6), so ``PyramidAnchorGenerator`` passes the true strides and
  refuses feature maps whose sizes do not match them (e.g. a stride-1 last stage).
- RoI levels. ``MultiScaleRoIAlign`` assigns a RoI of size s = sqrt(w * h) (input pixels) to level
  floor(4 + log2(s / 224)) clamped to P2..P5 (FPN paper, Eqn. 1); tests/test_faster_rcnn.py checks
  torchvision's LevelMapper against that formula.

Settings (``build_faster_rcnn``), following the faster-rcnn.pytorch-family configuration the
published VOC07 figures come from, except where noted:
- Input: short side 600, long side at most 1000 (``--resize_mode keep_aspect``, the default sizes).
- RPN: anchors 32, 64, 128, 256, 512 (one size per level, P2..P6), ratios ``--aspect_ratios``
  (0.5, 1, 2); positive IoU 0.7, negative 0.3, 256 anchors per image, half positive at most;
  proposal NMS 0.7; top-n before NMS 2000 (train) / 1000 (test) PER LEVEL, after NMS 2000 / 1000 per
  image (torchvision's FPN values; the single-level original kept 12000 / 2000 and 6000 / 300).
- RoI head: 128 RoIs per image (the original's TRAIN.BATCH_SIZE; torchvision uses 512), at most 25 %
  positive (IoU >= 0.5); every other sampled RoI is background. The original took background only from
  IoU in [0.1, 0.5); torchvision's matcher has no lower bound, so RoIs with IoU < 0.1 can be sampled too.
  Box coding weights (10, 10, 5, 5) (the original's target stds 0.1, 0.1, 0.2, 0.2).
- Box head: two fully connected 1024-d layers on 7x7 RoIAlign features; smooth-L1 (beta 1/9) losses.
- Inference: RoI score > ``--conf_thresh`` (0.05), NMS ``--nms_thresh`` per class (the original used
  0.3 for VOC; pass ``--nms_thresh 0.3`` for its setting), ``--topk`` (100) detections per image;
  ``--class_agnostic_nms`` runs one NMS over all classes of an image instead.
- Ignore regions: torchvision's RPN and RoIHeads have no "ignore" label, so boxes with label -1 (out of a
  ``--classes`` subset), difficult and crowd boxes are removed from the training targets (as the original
  did with VOC's difficult boxes). They are counted: ``outputs["num_dropped_boxes"]`` per batch and
  ``model.dropped_box_counts`` since construction; the first drop is logged.
- Not used by this architecture: ``--anchor_type/--anchor_file/--num_scales`` (the RPN anchors above),
  ``--loss_type/--positive_threshold/--negative_threshold/--neg_pos_ratio/--smooth_l1_beta/--focal_*``,
  ``--box_variances``, ``--p6_from``, ``--num_head_layers``, ``--shared_heads``, ``--pre_nms_topk``.

Interface (the same three objects as the single-stage detector):
- training: ``model(images, targets)`` -> ``{"losses": {loss_objectness, loss_rpn_box_reg,
  loss_classifier, loss_box_reg}, "num_dropped_boxes": int}``; ``criterion(outputs, targets)`` returns
  the losses (the sampling of anchors and RoIs needs the targets, so torchvision computes the losses in
  the forward pass).
- evaluation: ``model(images)`` -> raw per-RoI predictions (see ``FasterRCNNFPN``);
  ``postprocessor(outputs, targets)`` -> per-image {boxes (ORIGINAL image px), scores, labels 0..K-1}.
  In evaluation the model sees no targets, so the RPN clips proposals to the padded batch size; the
  post-processor clips the final boxes to each image's valid size (target["size"]) before NMS.

Feature rows (``model(images, None, return_features=True)`` then the post-processor adds
``roi_features`` to each image's detections; extract_features.py pads them to --num_nodes rows):
Tensor[D, 1 + 4 + (K + 1) + 1024] per image, one row per kept detection, in detection order:

| columns            | content                                                                     |
| ------------------ | --------------------------------------------------------------------------- |
| 0                  | objectness: 1 - P(background) of the detection's RoI                         |
| 1:5                | box x1, y1, x2, y2 in original pixels divided by the original width/height   |
| 5:5+K+1            | the RoI's class probabilities (softmax), background first                   |
| 5+K+1:5+K+1+1024   | the RoI's box-head feature (output of the second 1024-d layer, after ReLU)  |

With class-aware NMS one RoI can give detections of several classes; their rows share the RoI's
objectness, probabilities and feature and differ in the (class-specific) box.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, batched_nms

from models.backbone import ResNetBackbone
from models.fpn import FPN
from utils.box_ops import clip_xyxy

logger = logging.getLogger(__name__)

LEVEL_NAMES = ("p2", "p3", "p4", "p5", "p6")  # RPN levels; RoI features use the first four
PYRAMID_STRIDES = (4, 8, 16, 32, 64)
RPN_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per level, P2..P6
ROI_OUTPUT_SIZE = 7
ROI_SAMPLING_RATIO = 2
BOX_HEAD_DIM = 1024
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
RPN_PRE_NMS_TOP_N = {"training": 2000, "testing": 1000}  # per level
RPN_POST_NMS_TOP_N = {"training": 2000, "testing": 1000}  # per image
ROIS_PER_IMAGE = 128
MIN_BOX_SIZE = 1e-2  # torchvision's RoIHeads: detections narrower than this (input px) are dropped


class PyramidAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with the pyramid's true strides.

    torchvision computes the stride of a level as ``image_size // grid_size``, which is only right when
    the input is a multiple of the largest stride. Here the strides are given, and the feature maps must
    have ceil(H / stride) x ceil(W / stride) cells (what stride-2 convs and pools with padding give);
    any other size means the network's strides differ from the anchors' (e.g. a stride-1 last stage)
    and raises ValueError. Anchors follow torchvision's layout: centred on (x * stride, y * stride) for
    cell (x, y), level-major, then cells row-major, then (ratio, size) per cell; float32 whatever the
    feature dtype (bf16 cannot hold pixel coordinates up to 1000 exactly).

    Args:
        sizes: anchor sizes per level, e.g. ((32,), (64,), (128,), (256,), (512,)).
        aspect_ratios: h / w ratios per level.
        strides: the levels' strides in input pixels.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[int]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int] = PYRAMID_STRIDES,
    ):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        if len(strides) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} anchor levels but {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        height, width = (int(v) for v in image_list.tensors.shape[-2:])
        grid_sizes = [tuple(int(v) for v in f.shape[-2:]) for f in feature_maps]
        expected = [(math.ceil(height / s), math.ceil(width / s)) for s in self.strides]
        if grid_sizes != expected:
            raise ValueError(
                f"feature map sizes {grid_sizes} for a {height}x{width} input do not match the anchor "
                f"strides {self.strides} (expected {expected}); the backbone/FPN strides are wrong"
            )
        device = feature_maps[0].device
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(torch.float32, device)
        anchors = torch.cat(self.grid_anchors([list(g) for g in grid_sizes], strides))
        return [anchors for _ in image_list.image_sizes]


class FP32RPNHead(RPNHead):
    """torchvision's RPNHead with float32 outputs.

    Under bf16 autocast the head's outputs are bf16 and torchvision decodes the proposals in that dtype,
    so proposals (and, through ``RoIHeads.select_training_samples``, the gt boxes and the box regression
    targets) would be rounded to 4-8 px above 512 px. Returning float32 keeps all box arithmetic in fp32.
    """

    def forward(self, x: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class FP32FastRCNNPredictor(FastRCNNPredictor):
    """torchvision's FastRCNNPredictor with float32 outputs (see ``FP32RPNHead`` for why)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        class_logits, box_regression = super().forward(x)
        return class_logits.float(), box_regression.float()


def convert_targets(targets: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Tensor]], Dict[str, int]]:
    """Our training targets -> torchvision's, without the boxes torchvision cannot ignore.

    Args:
        targets: per image boxes (Tensor[G, 4], xyxy input px), labels (Tensor[G] int64, 0..K-1 or -1),
            optional difficult / iscrowd (Tensor[G] bool).

    Returns:
        (list of {"boxes": Tensor[G', 4] float32, "labels": Tensor[G'] int64 in 1..K}, counts) where
        counts = {"dropped": boxes removed, "ignore_label": label -1, "difficult": ..., "crowd": ...}
        (a box can have several reasons; "dropped" counts it once). Raises ValueError naming the image
        when a kept box has zero or negative width or height (its regression target would be infinite).
    """
    converted: List[Dict[str, Tensor]] = []
    counts = {"dropped": 0, "ignore_label": 0, "difficult": 0, "crowd": 0}
    for target in targets:
        boxes, labels = target["boxes"], target["labels"]
        ignore_label = labels < 0
        difficult = target.get("difficult", torch.zeros_like(ignore_label)).bool()
        crowd = target.get("iscrowd", torch.zeros_like(ignore_label)).bool()
        drop = ignore_label | difficult | crowd
        keep = ~drop
        kept_boxes = boxes[keep].float()
        degenerate = (kept_boxes[:, 2:] <= kept_boxes[:, :2]).any(dim=1)
        if degenerate.any():
            raise ValueError(
                f"image {target.get('image_id', '?')} ({target.get('file_name', '?')}): degenerate "
                f"training boxes (x2 <= x1 or y2 <= y1): {kept_boxes[degenerate][:3].tolist()}"
            )
        # torchvision reserves label 0 for background.
        converted.append({"boxes": kept_boxes, "labels": labels[keep].long() + 1})
        for name, mask in (
            ("dropped", drop),
            ("ignore_label", ignore_label),
            ("difficult", difficult),
            ("crowd", crowd),
        ):
            counts[name] += int(mask.sum())
    return converted, counts


class FasterRCNNFPN(nn.Module):
    """Backbone + FPN + torchvision RPN + torchvision RoIHeads (box branch only).

    Args:
        backbone: returns C2..C5 (strides 4..32).
        fpn: C2..C5 -> P2..P6 (``extra_levels="maxpool_p6"``).
        rpn: torchvision RegionProposalNetwork over P2..P6 (with a ``PyramidAnchorGenerator``).
        roi_heads: torchvision RoIHeads whose ``box_roi_pool`` pools P2..P5.

    ``forward(images Tensor[N, 3, H, W], targets=None, return_features=False)``:
    - training (needs targets): {"losses": dict of 4 loss tensors, "num_dropped_boxes": int}.
    - evaluation: {"proposals": list of Tensor[R_i, 4] (xyxy input px), "class_logits": Tensor[R, K+1],
      "box_regression": Tensor[R, 4 * (K+1)] (torchvision coding, weights 10, 10, 5, 5),
      "image_sizes": list of (h, w) the proposals were clipped to} with R = sum R_i (images in batch
      order) and, with return_features, "box_features": Tensor[R, 1024].
    Image sizes: each target's "size" (the valid area before batch padding) when targets are given,
    else the padded size H x W for every image.
    """

    def __init__(self, backbone: ResNetBackbone, fpn: FPN, rpn: RegionProposalNetwork, roi_heads: RoIHeads):
        super().__init__()
        num_rpn_levels = len(rpn.anchor_generator.sizes)
        if fpn.num_outputs != num_rpn_levels or num_rpn_levels != len(LEVEL_NAMES):
            raise ValueError(
                f"the FPN gives {fpn.num_outputs} levels, the RPN anchors {num_rpn_levels}; "
                f"both must be {len(LEVEL_NAMES)} (P2..P6)"
            )
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.dropped_box_counts = {"dropped": 0, "ignore_label": 0, "difficult": 0, "crowd": 0}

    def forward(
        self, images: Tensor, targets: List[Dict[str, Any]] | None = None, return_features: bool = False
    ) -> Dict[str, Any]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Tensor[N, 3, H, W], got shape {list(images.shape)}")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        features = OrderedDict(zip(LEVEL_NAMES, self.fpn(self.backbone(images))))
        if targets is not None:
            image_sizes = [(int(t["size"][0]), int(t["size"][1])) for t in targets]
        else:
            image_sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * len(images)
        image_list = ImageList(images, image_sizes)

        if self.training:
            if targets is None:
                raise ValueError("FasterRCNNFPN needs targets in training mode (the losses sample from them)")
            tv_targets, counts = convert_targets(targets)
            self._record_dropped(counts)
            proposals, rpn_losses = self.rpn(image_list, features, tv_targets)
            _, roi_losses = self.roi_heads(features, proposals, image_sizes, tv_targets)
            return {"losses": {**rpn_losses, **roi_losses}, "num_dropped_boxes": counts["dropped"]}

        proposals, _ = self.rpn(image_list, features)
        box_features = self.roi_heads.box_head(self.roi_heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = self.roi_heads.box_predictor(box_features)
        outputs = {
            "proposals": proposals,
            "class_logits": class_logits,
            "box_regression": box_regression,
            "image_sizes": image_sizes,
        }
        if return_features:
            outputs["box_features"] = box_features
        return outputs

    def _record_dropped(self, counts: Dict[str, int]) -> None:
        if counts["dropped"] and not self.dropped_box_counts["dropped"]:
            logger.info(
                "dropping ignore-label (-1), difficult and crowd boxes from the training targets "
                "(torchvision's RPN/RoIHeads cannot ignore regions); first batch: %s",
                counts,
            )
        for name, value in counts.items():
            self.dropped_box_counts[name] += value


class FasterRCNNCriterion(nn.Module):
    """The four loss terms of the model's training output, optionally weighted.

    torchvision's RPN and RoIHeads sample anchors and RoIs against the targets inside the forward pass,
    so the losses are computed there; this module only names and weights them.
    ``forward(outputs, targets) -> {loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg}``.
    """

    LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")

    def __init__(self, weights: Dict[str, float] | None = None):
        super().__init__()
        weights = dict(weights or {})
        unknown = set(weights) - set(self.LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; expected some of {self.LOSS_NAMES}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.LOSS_NAMES}

    def forward(self, outputs: Dict[str, Any], targets: List[Dict[str, Any]]) -> Dict[str, Tensor]:
        losses = outputs.get("losses")
        if losses is None:
            raise ValueError("outputs hold no losses: call the model in training mode, with targets")
        return {name: losses[name] * self.weights[name] for name in self.LOSS_NAMES}


class FasterRCNNPostProcess(nn.Module):
    """Per-image detections from the RoI head outputs of a whole batch, in original image pixels.

    The steps of torchvision's ``RoIHeads.postprocess_detections``, batched over images: decode the
    class-specific boxes, softmax scores, clip to each image's valid size (target["size"]), drop the
    background column, keep (RoI, class) pairs with score > ``score_thresh`` and both sides >= 0.01 px,
    NMS per image and class (per image with ``class_agnostic``) in one ``batched_nms`` call, keep the
    ``detections_per_img`` best per image. Then map to original pixels (divide by target["scale"],
    clip to target["orig_size"]).

    Args:
        score_thresh, nms_thresh, detections_per_img, class_agnostic: as named.
        box_coder_weights: must be the RoI head's (torchvision's (10, 10, 5, 5)).

    Inputs (forward): outputs of ``FasterRCNNFPN`` in evaluation mode; targets per image: size (Tensor[2],
    h, w valid), scale (Tensor[2], sx, sy; 1 if absent), orig_size (Tensor[2], h, w; size / scale if
    absent).

    Returns: per image {boxes (Tensor[D, 4] float32 xyxy original px), scores (Tensor[D]), labels
    (Tensor[D] int64, 0..K-1), roi_idxs (Tensor[D] int64, index of the detection's RoI in the image's
    proposals)} sorted by decreasing score, plus roi_features (Tensor[D, 1 + 4 + K + 1 + F], see the
    module docstring) when the outputs hold "box_features".
    """

    def __init__(
        self,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        class_agnostic: bool = False,
        box_coder_weights: Tuple[float, float, float, float] = BOX_CODER_WEIGHTS,
    ):
        super().__init__()
        if detections_per_img < 1:
            raise ValueError(f"detections_per_img must be >= 1, got {detections_per_img}")
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.class_agnostic = class_agnostic
        self.box_coder = det_utils.BoxCoder(box_coder_weights)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Any], targets: List[Dict[str, Any]]) -> List[Dict[str, Tensor]]:
        proposals: List[Tensor] = outputs["proposals"]
        num_images = len(proposals)
        if len(targets) != num_images:
            raise ValueError(f"{num_images} images in the outputs but {len(targets)} targets")
        class_logits = outputs["class_logits"].float()
        device = class_logits.device
        num_rois, num_columns = class_logits.shape
        num_classes = num_columns - 1
        num_rois_per_image = torch.tensor([len(p) for p in proposals], device=device)
        image_idxs = torch.repeat_interleave(torch.arange(num_images, device=device), num_rois_per_image)
        first_roi = torch.cumsum(num_rois_per_image, 0) - num_rois_per_image
        rois = torch.cat(proposals).float() if num_rois else class_logits.new_zeros(0, 4)

        sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device).float()  # [N, 2] h, w
        probs = F.softmax(class_logits, -1)  # [R, K+1]
        pred_boxes = self.box_coder.decode_single(outputs["box_regression"].float(), rois)
        pred_boxes = clip_xyxy(pred_boxes.reshape(num_rois, num_columns, 4), sizes[image_idxs][:, None, :])

        # Every (RoI, foreground class) pair is a candidate: [R, K] flattened RoI-major.
        scores = probs[:, 1:].reshape(-1)
        boxes = pred_boxes[:, 1:].reshape(-1, 4)
        labels = torch.arange(num_classes, device=device).repeat(num_rois)
        roi_idxs = torch.arange(num_rois, device=device).repeat_interleave(num_classes)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = torch.where(
            (scores > self.score_thresh) & (widths >= MIN_BOX_SIZE) & (heights >= MIN_BOX_SIZE)
        )[0]
        cand_images = image_idxs[roi_idxs[keep]]
        groups = cand_images if self.class_agnostic else cand_images * num_classes + labels[keep]
        kept = batched_nms(boxes[keep], scores[keep], groups, self.nms_thresh)  # decreasing score
        keep = keep[kept]

        # The best detections_per_img of each image: a stable sort by image keeps the score order.
        cand_images = image_idxs[roi_idxs[keep]]
        order = torch.sort(cand_images, stable=True).indices
        keep, cand_images = keep[order], cand_images[order]
        counts = torch.bincount(cand_images, minlength=num_images)
        rank = torch.arange(len(keep), device=device) - (torch.cumsum(counts, 0) - counts)[cand_images]
        in_top = rank < self.detections_per_img
        keep, cand_images = keep[in_top], cand_images[in_top]
        counts = counts.clamp(max=self.detections_per_img)

        scales, orig_sizes = _scales_and_orig_sizes(targets, sizes)
        scales, orig_sizes = scales.to(device), orig_sizes.to(device)
        det_boxes = clip_xyxy(boxes[keep] / scales[cand_images].repeat(1, 2), orig_sizes[cand_images])
        det_rois = roi_idxs[keep]
        columns = {
            "boxes": det_boxes,
            "scores": scores[keep],
            "labels": labels[keep],
            "roi_idxs": det_rois - first_roi[cand_images],
        }
        if "box_features" in outputs:
            orig_wh = orig_sizes[cand_images].flip(-1)
            normalised = det_boxes / torch.cat([orig_wh, orig_wh], dim=1)
            det_probs = probs[det_rois]
            columns["roi_features"] = torch.cat(
                [1 - det_probs[:, :1], normalised, det_probs, outputs["box_features"][det_rois].float()],
                dim=1,
            )
        split = counts.tolist()
        per_column = {name: value.split(split) for name, value in columns.items()}
        return [{name: per_column[name][i] for name in columns} for i in range(num_images)]


def _scales_and_orig_sizes(targets: List[Dict[str, Any]], sizes: Tensor) -> Tuple[Tensor, Tensor]:
    """(Tensor[N, 2] sx, sy; Tensor[N, 2] original h, w) with the defaults of the docstring."""
    scales = torch.stack(
        [
            torch.as_tensor(t["scale"], dtype=torch.float32).cpu() if "scale" in t else torch.ones(2)
            for t in targets
        ]
    )
    orig_sizes = torch.stack(
        [
            torch.as_tensor(t["orig_size"]).float().cpu()
            if "orig_size" in t
            else sizes[i].cpu() / scales[i].flip(0)  # (h / sy, w / sx)
            for i, t in enumerate(targets)
        ]
    )
    return scales, orig_sizes


def build_faster_rcnn(
    args: argparse.Namespace,
    anchor_whs_per_level: Sequence[Tensor] | None = None,
    load_pretrained: bool = True,
) -> Tuple[FasterRCNNFPN, FasterRCNNCriterion, FasterRCNNPostProcess]:
    """``--arch faster_rcnn_fpn``: the model, its criterion and its post-processor.

    Reads --basenet, --pretrained, --freeze_upto, --freeze_bn, --fpn_channels, --aspect_ratios,
    --num_classes (K), --conf_thresh, --nms_thresh, --topk and --class_agnostic_nms; the other settings
    are in the module docstring. Backbone policy as for the single-stage model: loaded weights freeze
    the stem + first --freeze_upto stages and batch norm (unless --train_bn); from scratch nothing is
    frozen. ``load_pretrained=False`` (resuming) freezes the same way without reading a weight file.
    ``anchor_whs_per_level`` (single-stage anchors from a checkpoint) does not apply here.
    """
    if not getattr(args, "num_classes", None) or args.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (set from the dataset), got {args.num_classes!r}")
    if anchor_whs_per_level is not None:
        logger.warning("faster_rcnn_fpn ignores the given anchor sizes: its RPN uses %s", RPN_ANCHOR_SIZES)
    if getattr(args, "anchor_type", "predefined") != "predefined":
        logger.warning(
            "--anchor_type %s does not apply to --arch faster_rcnn_fpn (ignored)", args.anchor_type
        )
    aspect_ratios = tuple(float(r) for r in getattr(args, "aspect_ratios", (0.5, 1.0, 2.0)))
    if not aspect_ratios or any(r <= 0 for r in aspect_ratios):
        raise ValueError(f"--aspect_ratios must be positive, got {aspect_ratios}")

    from_scratch = args.pretrained == "none"
    backbone = ResNetBackbone(
        args.basenet,
        pretrained=args.pretrained if load_pretrained else "none",
        freeze_upto=0 if from_scratch else args.freeze_upto,
        freeze_bn=False if from_scratch else args.freeze_bn,
        return_levels=(2, 3, 4, 5),
    )
    fpn = FPN(backbone.out_channels, args.fpn_channels, extra_levels="maxpool_p6")

    anchor_generator = PyramidAnchorGenerator(
        sizes=[(s,) for s in RPN_ANCHOR_SIZES],
        aspect_ratios=[aspect_ratios] * len(RPN_ANCHOR_SIZES),
        strides=PYRAMID_STRIDES,
    )
    rpn = RegionProposalNetwork(
        anchor_generator,
        FP32RPNHead(args.fpn_channels, anchor_generator.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n=dict(RPN_PRE_NMS_TOP_N),
        post_nms_top_n=dict(RPN_POST_NMS_TOP_N),
        nms_thresh=0.7,
    )
    roi_heads = RoIHeads(
        MultiScaleRoIAlign(list(LEVEL_NAMES[:4]), ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO),
        TwoMLPHead(args.fpn_channels * ROI_OUTPUT_SIZE**2, BOX_HEAD_DIM),
        FP32FastRCNNPredictor(BOX_HEAD_DIM, args.num_classes + 1),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=ROIS_PER_IMAGE,
        positive_fraction=0.25,
        bbox_reg_weights=BOX_CODER_WEIGHTS,
        # Used only by RoIHeads.postprocess_detections, which our post-processor replaces; kept equal.
        score_thresh=args.conf_thresh,
        nms_thresh=args.nms_thresh,
        detections_per_img=args.topk,
    )
    model = FasterRCNNFPN(backbone, fpn, rpn, roi_heads)
    criterion = FasterRCNNCriterion()
    postprocessor = FasterRCNNPostProcess(
        score_thresh=args.conf_thresh,
        nms_thresh=args.nms_thresh,
        detections_per_img=args.topk,
        class_agnostic=args.class_agnostic_nms,
        box_coder_weights=BOX_CODER_WEIGHTS,
    )
    return model, criterion, postprocessor
