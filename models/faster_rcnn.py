"""Faster R-CNN with a feature pyramid (two-stage), assembled from torchvision's detection parts.

    ResNetBackbone (C2..C5) -> FPN (P2..P5, P6 = max-pool of P5)
        -> RegionProposalNetwork (torchvision; one anchor size per level on P2..P6, 3 ratios)
        -> MultiScaleRoIAlign (torchvision; P2..P5, 7x7, sampling ratio 2)
        -> TwoMLPHead (1024-d) -> FastRCNNPredictor (K + 1 classes, class-specific boxes)

Only the glue is ours: the backbone and FPN of models/, a torchvision ``AnchorGenerator`` that uses
the pyramid's true strides, the conversion of our targets and the named loss terms
(``layers/faster_rcnn_losses.py``), and a batched post-processor that keeps the RoI index of each
detection (for feature extraction) and maps boxes back to original pixels
(``layers/faster_rcnn_postprocess.py``), as the single-stage model's criterion and post-processor live
in ``layers/losses.py`` and ``layers/postprocess.py``.
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
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from layers.faster_rcnn_losses import FasterRCNNCriterion, convert_targets
from layers.faster_rcnn_postprocess import BOX_CODER_WEIGHTS, FasterRCNNPostProcess
from models.backbone import ResNetBackbone
from models.fpn import FPN

logger = logging.getLogger(__name__)

LEVEL_NAMES = ("p2", "p3", "p4", "p5", "p6")  # RPN levels; RoI features use the first four
PYRAMID_STRIDES = (4, 8, 16, 32, 64)
RPN_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per level, P2..P6
ROI_OUTPUT_SIZE = 7
ROI_SAMPLING_RATIO = 2
BOX_HEAD_DIM = 1024
RPN_PRE_NMS_TOP_N = {"training": 2000, "testing": 1000}  # per level
RPN_POST_NMS_TOP_N = {"training": 2000, "testing": 1000}  # per image
ROIS_PER_IMAGE = 128


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
    if not args.num_classes or args.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (set from the dataset), got {args.num_classes!r}")
    if anchor_whs_per_level is not None:
        logger.warning("faster_rcnn_fpn ignores the given anchor sizes: its RPN uses %s", RPN_ANCHOR_SIZES)
    if args.anchor_type != "predefined":
        logger.warning(
            "--anchor_type %s does not apply to --arch faster_rcnn_fpn (ignored)", args.anchor_type
        )
    aspect_ratios = tuple(float(r) for r in args.aspect_ratios)
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
