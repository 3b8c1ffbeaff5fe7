"""Model builders: the only place where command-line options become constructor arguments.

``build_model(args) -> (model, criterion, postprocessor)``, dispatched on ``args.arch``:
- "fpn_ohem": ResNet backbone (C3..C5) -> FPN (P3..P7) -> shared heads, trained with the OHEM
  multibox loss (``--loss_type mbox``, softmax, K + 1 score columns) or the focal loss
  (``--loss_type focal``, sigmoid, K columns).
- "faster_rcnn_fpn": ``models.faster_rcnn.build_faster_rcnn`` (two-stage, same backbone and FPN).

Backbone policy: with loaded weights (``--pretrained imagenet`` or PATH) the stem plus the first
``--freeze_upto`` stages are frozen and batch norm follows ``--bn_mode`` (frozen by default; eval, the
original's, keeps the statistics and trains the affine parameters; train = ``--train_bn``). From
scratch (``--pretrained none``) nothing is frozen and batch norm trains: freezing random weights would
keep them random.

Heads: ``--shared_heads`` 0 = separate towers, > 0 = the original's SH head (all but the last of the
``--num_head_layers`` convs shared); ``--num_shared_layers k`` shares any k. ``--fpn_variant original``
builds the original codebase's FPN and initialises the heads as it did (models/fpn.py, models/heads.py);
its checkpoints load through models/original.py.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Dict, List, Sequence, Tuple

from torch import Tensor, nn

from layers.anchor_sets import ORIGINAL_ANCHOR_TYPES, original_anchor_whs, resolve_anchor_file
from layers.anchors import DEFAULT_STRIDES, AnchorGenerator, load_anchor_file, predefined_anchor_whs
from layers.box_coder import BoxCoder
from layers.losses import FocalLoss, MultiBoxLoss
from layers.postprocess import PostProcess
from models.archs import ARCH_SPECS
from models.backbone import ResNetBackbone
from models.detector import FPNDetector
from models.faster_rcnn import build_faster_rcnn
from models.fpn import FPN
from models.heads import DetectionHead
from utils.errors import UserError
from utils.options.resolve import max_per_class_of, require_resolved

logger = logging.getLogger(__name__)

__all__ = [
    "ARCH_BUILDERS",
    "ARCH_SPECS",
    "FPNDetector",
    "build_model",
    "build_anchors",
    "count_parameters",
    "model_summary",
]


def anchor_input_side(args: argparse.Namespace) -> int | None:
    """The square side the original anchor sets are computed for: --input_dim, or --min_size (keep_aspect)."""
    return args.min_size if args.resize_mode == "keep_aspect" else args.input_dim


def build_anchors(
    args: argparse.Namespace, strides: Sequence[int] = DEFAULT_STRIDES, need_whs: bool = True
) -> Tuple[List[Tensor] | None, str]:
    """Per-level anchor (w, h) sizes and their centre layout ("stride" or "original") from the options.

    - predefined: RetinaNet's sets from --num_scales / --aspect_ratios (h / w), stride layout.
    - pdf9 / default: the original codebase's sets (layers/anchor_sets.py), original layout.
    - kmeans: --anchor_file (or, without one, the original's clustered set of --dataset voc / coco),
      in the layout the file records (kmeans_for_anchors.py --method per_level: stride).

    ``need_whs=False`` (anchors from a checkpoint): only the layout is derived; a kmeans file that is
    no longer there then counts as the stride layout, with a warning.
    """
    side = anchor_input_side(args)
    if args.anchor_type == "kmeans":
        path = resolve_anchor_file(args.anchor_file, args.dataset)
        if not path:
            raise UserError(
                f"--anchor_type kmeans needs --anchor_file for --dataset {args.dataset!r} "
                "(write one with kmeans_for_anchors.py; voc and coco have the original's sets built in)"
            )
        if not need_whs and not os.path.isfile(path):
            logger.warning(
                "anchor file %s not found: assuming the stride layout for the checkpoint's anchors", path
            )
            return None, "stride"
        whs, meta = load_anchor_file(path, expected_strides=strides, input_side=side)
        # Pixel anchors fitted to another input size are misplaced in scale; say so rather than fail.
        keys = ("resize_mode",) + (
            ("input_dim",) if args.resize_mode == "square" else ("min_size", "max_size")
        )
        for key in keys if meta["units"] == "pixels" else ():
            if key in meta and meta[key] != getattr(args, key):
                logger.warning(
                    "anchor file %s was made for %s=%s, this run uses %s",
                    path,
                    key,
                    meta[key],
                    getattr(args, key),
                )
        return whs, meta["layout"]
    if args.anchor_type == "predefined":
        return predefined_anchor_whs(args.num_scales, args.aspect_ratios), "stride"
    if args.anchor_type in ORIGINAL_ANCHOR_TYPES:
        return original_anchor_whs(args.anchor_type, side, strides), "original"
    raise UserError(
        f"--anchor_type must be one of predefined, kmeans, {', '.join(ORIGINAL_ANCHOR_TYPES)}; "
        f"got {args.anchor_type!r}"
    )


def build_fpn_ohem(
    args: argparse.Namespace,
    anchor_whs_per_level: Sequence[Tensor] | None = None,
    load_pretrained: bool = True,
) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """The single-stage FPN detector, its loss and its post-processor (see ``build_model``)."""
    if args.loss_type not in ("mbox", "focal"):
        raise UserError(f"--loss_type must be 'mbox' or 'focal', got {args.loss_type!r}")
    if not args.num_classes or args.num_classes < 1:
        raise UserError(f"num_classes must be >= 1 (set from the dataset), got {args.num_classes!r}")
    focal = args.loss_type == "focal"
    score_type = ARCH_SPECS["fpn_ohem"].score_type(args.loss_type)  # as the scripts read the scores
    original = args.fpn_variant == "original"

    from_scratch = args.pretrained == "none"
    if from_scratch and load_pretrained and (args.freeze_upto or args.bn_mode != "train"):
        logger.info(
            "--pretrained none: training the whole backbone, batch norm included "
            "(--freeze_upto / --bn_mode apply to loaded weights only)"
        )
    backbone = ResNetBackbone(
        args.basenet,
        pretrained=args.pretrained if load_pretrained else "none",
        freeze_upto=0 if from_scratch else args.freeze_upto,
        bn_mode="train" if from_scratch else args.bn_mode,
        return_levels=(3, 4, 5),
    )
    fpn = FPN(
        backbone.out_channels,
        args.fpn_channels,
        extra_levels="p6p7",
        p6_from=args.p6_from,
        variant=args.fpn_variant,
    )

    if anchor_whs_per_level is None:
        anchor_whs_per_level, layout = build_anchors(args)
    else:
        logger.info(
            "anchors from the checkpoint (--anchor_type %s gives their layout only)", args.anchor_type
        )
        _, layout = build_anchors(args, need_whs=False)
    anchor_generator = AnchorGenerator(anchor_whs_per_level, strides=DEFAULT_STRIDES, layout=layout)

    head = DetectionHead(
        args.fpn_channels,
        num_anchors=anchor_generator.num_anchors_per_location,
        num_classes=args.num_classes if score_type == "sigmoid" else args.num_classes + 1,
        num_layers=args.num_head_layers,
        shared_layers=args.num_shared_layers,
        score_type=score_type,
        norm=args.head_norm,
        bias=bool(args.bias_heads),
        init="original" if original else "retinanet",
    )
    model = FPNDetector(backbone, fpn, head, anchor_generator)

    box_coder = BoxCoder(variances=tuple(args.box_variances))
    matching = dict(
        positive_threshold=args.positive_threshold,
        negative_threshold=args.negative_threshold,
        smooth_l1_beta=args.smooth_l1_beta,
        best_anchor_match=args.best_anchor_match,
        matcher=args.matcher,
        atss_topk=args.atss_topk,
    )
    if focal:
        criterion = FocalLoss(box_coder, alpha=args.focal_alpha, gamma=args.focal_gamma, **matching)
    else:
        criterion = MultiBoxLoss(box_coder, neg_pos_ratio=args.neg_pos_ratio, **matching)
    # --protocol original: per class candidates over all levels, NMS on unclipped boxes, per-class caps
    # (utils.options.resolve.max_per_class_of).
    original = args.protocol == "original"
    postprocessor = PostProcess(
        box_coder,
        score_type=score_type,
        conf_thresh=args.conf_thresh,
        pre_nms_topk=args.pre_nms_topk,
        nms_thresh=args.nms_thresh,
        max_detections=args.topk,
        class_agnostic=args.class_agnostic_nms,
        per_class_topk=original,
        max_per_class=max_per_class_of(args),
        clip_before_nms=not original,
    )
    return model, criterion, postprocessor


# arch name -> builder(args, anchor_whs_per_level, load_pretrained) -> (model, criterion, postprocessor);
# what differs between them for the scripts is described next to it, in ARCH_SPECS (models/archs.py).
ARCH_BUILDERS: Dict[str, Callable[..., Tuple[nn.Module, nn.Module, nn.Module]]] = {
    "fpn_ohem": build_fpn_ohem,
    "faster_rcnn_fpn": build_faster_rcnn,
}


def build_model(
    args: argparse.Namespace,
    anchor_whs_per_level: Sequence[Tensor] | None = None,
    load_pretrained: bool = True,
) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """Build ``(model, criterion, postprocessor)`` for ``args.arch``.

    Args:
        args: the options of utils/options, resolved (``resolve_defaults``; a UserError otherwise), with
            ``num_classes`` = K, without background, set by the script.
        anchor_whs_per_level (list of Tensor[k, 2], optional): anchor sizes saved with a checkpoint;
            they override ``--anchor_type`` / ``--anchor_file``.
        load_pretrained: False when the weights will come from a checkpoint (resuming): the backbone is
            then frozen exactly as ``--pretrained`` implies, but no weight file is read.
    """
    if args.arch not in ARCH_BUILDERS:
        raise UserError(f"unknown --arch {args.arch!r}; expected one of {sorted(ARCH_BUILDERS)}")
    require_resolved(args, f"--arch {args.arch}'s builder")
    model, criterion, postprocessor = ARCH_BUILDERS[args.arch](args, anchor_whs_per_level, load_pretrained)
    logger.info("%s", model_summary(model))
    return model, criterion, postprocessor


def count_parameters(module: nn.Module) -> Tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def model_summary(model: nn.Module) -> str:
    """One line per top-level part: trainable and frozen parameters, in millions."""
    lines = [f"{type(model).__name__}:"]
    for name, child in list(model.named_children()) + [("total", model)]:
        trainable, frozen = count_parameters(child)
        if trainable or frozen:
            lines.append(f"  {name:<16} {trainable / 1e6:8.3f} M trainable {frozen / 1e6:8.3f} M frozen")
    return "\n".join(lines)
