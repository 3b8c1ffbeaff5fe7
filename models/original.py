"""Checkpoints of the original codebase (gurkirt/FPN.pytorch1.0): recognise them and load them into ours.

The original saves a bare state dict (``torch.save(net.state_dict(), "model_XXXXXX.pth")``, with
``module.`` prefixes when it trained under DataParallel). Its keys tell which model it is:
- ``base_net.*``: its ResNet + FPN (``models/resnet.py``); the block type and block counts give the
  ResNet depth.
- ``loc.*`` / ``conf.*``: the unshared heads (``models/fpn.py``: 4 conv + ReLU per branch, then the
  predictor) = ours with ``--shared_heads 0``.
- ``features_layers.*``, ``loc_heads.*``, ``conf_heads.*``: the "SH" heads (``models/fpn_shared_heads.py``:
  3 shared conv + ReLU, then per branch 1 conv + ReLU and the predictor) = ours with ``--shared_heads 1``.
- a ``.bias`` on the tower convs: trained with ``--bias_heads 1`` (its default is 0); the last conv's
  output channels give the anchors per location A (loc: 4A) and the score columns (conf: A (K + 1)).

Key map (original -> ours, ``--fpn_variant original``):
- ``base_net.conv1``, ``base_net.bn1`` -> ``backbone.stem.0``, ``backbone.stem.1``;
  ``base_net.layer{1-4}.*`` -> ``backbone.layer{1-4}.*`` (the same torchvision block layout).
- ``base_net.lateral_layer{1,2,3}`` (C5, C4, C3) -> ``fpn.lateral_convs.{2,1,0}``;
  ``base_net.corr_layer{1,2}`` (P4, P3) -> ``fpn.output_convs.{1,0}``; ``base_net.conv6``, ``conv7`` ->
  ``fpn.p6``, ``fpn.p7``.
- unshared: ``loc.{0,2,4,6}`` -> ``head.box_tower.{0,2,4,6}``, ``loc.8`` -> ``head.box_pred``; ``conf.*``
  likewise to ``head.cls_tower`` / ``head.cls_pred``.
- SH: ``features_layers.{0,2,4}`` -> ``head.shared_tower.{0,2,4}``; ``loc_heads.0`` -> ``head.box_tower.0``,
  ``loc_heads.2`` -> ``head.box_pred``; ``conf_heads.*`` likewise to ``head.cls_tower`` / ``head.cls_pred``.

Output order: the original flattens each level's [N, A*C, H, W] map by permuting to [N, H, W, A*C] and
concatenating the levels, P3 first, then views [N, -1, C] (``-1, 4`` for boxes): level, cell row-major,
anchor, exactly the order of our ``DetectionHead``. So prediction i of the loaded model is the original's
prediction i, and its box deltas and softmax scores are the same numbers (tests/test_original_parity.py).
Within a cell, anchor a is the a-th (w, h) of the level in the anchor set (the original's ``pdf9``:
aspect ratio major, then scale; ``default`` and ``kmeans``: the three shapes in order), which
layers/anchors.py must build in that order with the original's centres for the boxes to match too.

Conventions that carry over unchanged: scores are a softmax over K + 1 columns with column 0 the
background; box deltas are (dx, dy, dw, dh) with variances (0.1, 0.2) relative to the anchor's centre and
size (``modules/box_utils.py`` encode/decode, which our BoxCoder computes in pixels instead of fractions
of the input, the same deltas). The class order is the dataset's (VOC's 20 names, alphabetical; COCO's
80 in the order of its instances files).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from utils.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# COCO 2017's 80 category names in the order of its instances files (the original's label order).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
ORIGINAL_CLASS_NAMES = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}

# (block type, blocks in layer1..layer4) -> name, as the original's base_models.py builds them.
_RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
_UNSHARED_HEADS = ("loc.", "conf.")
_SHARED_HEADS = ("features_layers.", "loc_heads.", "conf_heads.")
# Fixed renames of base_net.* (the backbone stages keep their torchvision names).
_BASE_NET_RENAMES = {
    "conv1": "backbone.stem.0",
    "bn1": "backbone.stem.1",
    "lateral_layer1": "fpn.lateral_convs.2",  # C5
    "lateral_layer2": "fpn.lateral_convs.1",  # C4
    "lateral_layer3": "fpn.lateral_convs.0",  # C3
    "corr_layer1": "fpn.output_convs.1",  # P4
    "corr_layer2": "fpn.output_convs.0",  # P3
    "conv6": "fpn.p6",
    "conv7": "fpn.p7",
}


def strip_module_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Drop DataParallel's ``module.`` prefix (the original saves ``net.state_dict()`` of the wrapper)."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def is_original_state_dict(obj: Any) -> bool:
    """True for a bare state dict of the original codebase (either head type), detected by its keys."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    keys = strip_module_prefix(obj).keys()
    if not any(k.startswith("base_net.") for k in keys):
        return False
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    return all(has(p) for p in _UNSHARED_HEADS) or all(has(p) for p in _SHARED_HEADS)


def _last_conv(state_dict: Dict[str, Tensor], prefix: str) -> Tuple[int, Tensor]:
    """(index, weight) of the highest-numbered conv of the nn.Sequential saved under ``prefix``."""
    indices = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.weight$", k))}
    )
    if not indices:
        raise CheckpointError(f"no {prefix}<i>.weight keys in the original checkpoint")
    return indices[-1], state_dict[f"{prefix}{indices[-1]}.weight"]


def describe_original_state_dict(state_dict: Dict[str, Tensor], source: str = "checkpoint") -> Dict[str, Any]:
    """What an original state dict holds, read from its keys and shapes.

    Returns:
        dict with basenet (str), shared_heads (0 or 1), bias_heads (0 or 1), head_size (channels),
        num_tower_layers (per branch, before the predictor), num_shared_layers (3 for SH, else 0),
        num_anchors (A) and num_columns (K + 1).
    """
    sd = strip_module_prefix(state_dict)
    shared = any(k.startswith("features_layers.") for k in sd)
    loc, conf = ("loc_heads.", "conf_heads.") if shared else ("loc.", "conf.")
    block = "bottleneck" if "base_net.layer1.0.conv3.weight" in sd else "basic"
    counts = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"base_net\.layer{stage}\.(\d+)\.", k))}
        counts.append(max(blocks) + 1 if blocks else 0)
    basenet = _RESNET_LAYOUTS.get((block, tuple(counts)))
    if basenet is None:
        raise CheckpointError(
            f"{source}: base_net has {block} blocks {counts}, which is no ResNet the original builds"
        )
    loc_index, loc_weight = _last_conv(sd, loc)
    conf_index, conf_weight = _last_conv(sd, conf)
    num_anchors, rem = divmod(int(loc_weight.shape[0]), 4)
    if rem or num_anchors == 0 or conf_weight.shape[0] % num_anchors or loc_index != conf_index:
        raise CheckpointError(
            f"{source}: inconsistent heads ({loc}{loc_index} has {loc_weight.shape[0]} outputs, "
            f"{conf}{conf_index} {conf_weight.shape[0]})"
        )
    num_shared = _last_conv(sd, "features_layers.")[0] // 2 + 1 if shared else 0
    return {
        "basenet": basenet,
        "shared_heads": int(shared),
        "bias_heads": int(f"{loc}0.bias" in sd),
        "head_size": int(loc_weight.shape[1]),
        "num_tower_layers": loc_index // 2,  # conv, ReLU, conv, ReLU, ..., predictor
        "num_shared_layers": num_shared,
        "num_anchors": num_anchors,
        "num_columns": int(conf_weight.shape[0]) // num_anchors,
    }


def _map_key(key: str, shared: bool, pred_index: int) -> str | None:
    """Our parameter name for one original key, or None when it is not one of the original's."""
    parts = key.split(".")
    if parts[0] == "base_net":
        if parts[1] in _BASE_NET_RENAMES:
            return ".".join([_BASE_NET_RENAMES[parts[1]]] + parts[2:])
        if re.fullmatch(r"layer[1-4]", parts[1]):
            return ".".join(["backbone"] + parts[1:])
        return None
    branches = {"loc_heads": "box", "conf_heads": "cls"} if shared else {"loc": "box", "conf": "cls"}
    if shared and parts[0] == "features_layers":
        return ".".join(["head.shared_tower"] + parts[1:])
    if parts[0] in branches and len(parts) == 3 and parts[1].isdigit():
        branch = branches[parts[0]]
        if int(parts[1]) == pred_index:
            return f"head.{branch}_pred.{parts[2]}"
        return f"head.{branch}_tower.{parts[1]}.{parts[2]}"
    return None


def map_original_state_dict(state_dict: Dict[str, Tensor], source: str = "checkpoint") -> Dict[str, Tensor]:
    """Rename an original state dict to our FPNDetector's parameter names (see the module docstring).

    Raises CheckpointError naming the keys that belong to neither model.
    """
    sd = strip_module_prefix(state_dict)
    info = describe_original_state_dict(sd, source)
    shared = bool(info["shared_heads"])
    mapped, unknown = {}, []
    for key, value in sd.items():
        ours = _map_key(key, shared, 2 * info["num_tower_layers"])
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = value
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys of no original model part, e.g. {unknown[:5]}")
    return mapped


def load_original_weights(
    model: nn.Module, state_dict: Dict[str, Tensor], source: str = "checkpoint"
) -> None:
    """Load an original state dict into our model (built with ``original_args``), checking every key.

    Our own buffers the original does not have (the anchor sizes, and ``num_batches_tracked`` of batch
    norm in checkpoints from old PyTorch versions) keep the model's values; anything else missing,
    unexpected or of another shape is an error that names the keys.
    """
    mapped = map_original_state_dict(state_dict, source)
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    kept = [k for k in missing if k.endswith("num_batches_tracked") or k.startswith("anchor_generator.")]
    missing = [k for k in missing if k not in kept]
    unexpected = [k for k in mapped if k not in own]
    wrong = [
        f"{k}: {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and own[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what} (e.g. {keys[:3]})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit the model its keys describe: " + "; ".join(problems))
    mapped.update({k: own[k] for k in kept})
    model.load_state_dict(mapped, strict=True)


def _class_names(
    args: argparse.Namespace, num_classes: int, source: str
) -> Tuple[List[str], List[int] | None]:
    """Names (and category ids when the dataset's annotation file is here) of the checkpoint's K classes."""
    split = (args.val_sets or "").split(",")[0].strip()
    path = os.path.join(args.data_root, args.dataset, "annotations", f"{split}.json")
    known = ORIGINAL_CLASS_NAMES.get(args.dataset)
    if os.path.isfile(path):
        with open(path) as f:
            categories = json.load(f).get("categories", [])
        names, ids = [c["name"] for c in categories], [int(c["id"]) for c in categories]
        if len(names) != num_classes:
            raise UserError(f"{source} predicts {num_classes} classes, {path} has {len(names)}")
        if known is not None and tuple(names) != known:
            at = next(i for i, (a, b) in enumerate(zip(names, known)) if a != b)
            raise UserError(
                f"{path} orders its classes unlike the original's {args.dataset} (label {at}: {names[at]!r} "
                f"vs {known[at]!r}): its checkpoints would score the wrong classes"
            )
        return names, ids
    if known is not None and len(known) == num_classes:
        return list(known), None
    raise UserError(
        f"{source} predicts {num_classes} classes; give the --dataset it was trained on (voc: 20, coco: 80) "
        f"or one whose annotation file ({path}) lists them"
    )


def original_args(
    state_dict: Dict[str, Tensor], cli_args: argparse.Namespace, source: str = "checkpoint"
) -> argparse.Namespace:
    """Our options for an original checkpoint: the network from its keys, the rest from the command line.

    Typed options that contradict the keys (``--basenet``, ``--shared_heads``, ``--bias_heads``) are an
    error. Anchors come from ``--anchor_type`` (and ``--anchor_file``) as typed; untyped, 9 anchors per
    location mean ``pdf9`` and 3 mean ``kmeans`` (the original's default, its shipped set of
    ``--dataset``); the model builder checks the count. The input is square (``--input_dim``, 600 as
    the original) unless ``--resize_mode`` is typed.
    """
    info = describe_original_state_dict(state_dict, source)
    args = argparse.Namespace(**vars(cli_args))
    typed = set(getattr(cli_args, "explicit_options", None) or ())
    if "dataset" not in typed and args.dataset not in ORIGINAL_CLASS_NAMES:
        guess = {20: "voc", 80: "coco"}.get(info["num_columns"] - 1)
        if guess is not None:
            logger.info("%s: %d classes, taking --dataset %s", source, info["num_columns"] - 1, guess)
            args.dataset = guess
    contradictions = []
    if "basenet" in typed and args.basenet != info["basenet"]:
        contradictions.append(f"--basenet {args.basenet} (its base_net is a {info['basenet']})")
    if "shared_heads" in typed and int(args.shared_heads > 0) != info["shared_heads"]:
        contradictions.append(
            f"--shared_heads {args.shared_heads} "
            f"(its heads are {'SH' if info['shared_heads'] else 'unshared'})"
        )
    if "bias_heads" in typed and int((args.bias_heads or 0) > 0) != info["bias_heads"]:
        contradictions.append(
            f"--bias_heads {args.bias_heads} (its head convs have {'a' if info['bias_heads'] else 'no'} bias)"
        )
    if contradictions:
        raise UserError(f"{source} is an original checkpoint that contradicts " + ", ".join(contradictions))
    if args.classes:
        raise UserError(
            f"--classes: {source} is an original checkpoint, trained on every class of its dataset"
        )
    num_layers = info["num_tower_layers"] + info["num_shared_layers"]
    args.__dict__.update(
        arch="fpn_ohem",
        basenet=info["basenet"],
        pretrained="imagenet",
        freeze_upto=0,
        bn_mode="eval",
        freeze_bn=True,
        fpn_variant="original",
        p6_from="c5",
        fpn_channels=info["head_size"],
        num_head_layers=num_layers,
        shared_heads=info["shared_heads"],
        num_shared_layers=info["num_shared_layers"],
        bias_heads=info["bias_heads"],
        head_norm="none",
        loss_type="mbox",
        num_classes=info["num_columns"] - 1,
        box_variances=[0.1, 0.2],
    )
    if "anchor_type" not in typed:
        args.anchor_type = {9: "pdf9", 3: "kmeans"}.get(info["num_anchors"], args.anchor_type)
        logger.info(
            "%s: %d anchors per location, taking --anchor_type %s",
            source,
            info["num_anchors"],
            args.anchor_type,
        )
    if "resize_mode" not in typed:
        args.resize_mode = "square"
    args.class_names, args.category_ids = _class_names(args, args.num_classes, source)
    return args


def build_model_from_original(
    path: str, state_dict: Dict[str, Tensor], cli_args: argparse.Namespace, device: torch.device
):
    """Rebuild an original checkpoint as our model. Returns (model, postprocessor, args, checkpoint), like
    utils.checkpoint.build_model_from_checkpoint; ``checkpoint`` is ours ({model, args, iteration, ...})."""
    from models import build_model  # late import: models/__init__ imports this package's modules
    from utils.checkpoint import args_to_dict, checkpoint_iteration

    args = original_args(state_dict, cli_args, source=repr(path))
    model, _criterion, postprocessor = build_model(args, load_pretrained=False)
    expected = describe_original_state_dict(state_dict)["num_anchors"]
    if model.anchor_generator.num_anchors_per_location != expected:
        got = model.anchor_generator.num_anchors_per_location
        raise UserError(
            f"--anchor_type {args.anchor_type} gives {got} anchors per location, "
            f"the original checkpoint {path!r} predicts {expected}"
        )
    load_original_weights(model, state_dict, source=repr(path))
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    postprocessor.to(device)
    iteration = checkpoint_iteration(path)
    logger.info(
        "loaded the original checkpoint %s (%s, %s heads)",
        path,
        args.basenet,
        "SH" if args.shared_heads else "unshared",
    )
    checkpoint = {
        "model": model.state_dict(),
        "args": args_to_dict(args),
        "iteration": iteration if iteration >= 0 else None,
        "class_names": args.class_names,
        "category_ids": args.category_ids,
        "format": "original",
    }
    return model, postprocessor, args, checkpoint
