"""Classification and box-regression heads shared across pyramid levels (RetinaNet-style towers).

Each head is a tower of ``num_layers`` 3x3 conv + ReLU followed by a 3x3 predictor conv:
the classification predictor has A * C outputs per cell, the box predictor A * 4 (A anchors per
location, C score columns). ``shared_layers = k`` makes the first k tower layers common to both
heads and leaves ``num_layers - k`` separate layers per branch (0: two separate towers;
``num_layers``: one fully shared tower). The original codebase's two heads are the cases
``num_layers=4`` with k = 0 (``models/fpn.py``, ``--shared_heads 0``) and k = 3 (its "SH" head,
``models/fpn_shared_heads.py``, ``--shared_heads 1``: 3 shared conv + ReLU, then per branch one
conv + ReLU and the predictor). ``bias=False`` drops the tower convs' biases (the original's
``--bias_heads 0``); the predictors always have one.

``norm="gn"`` puts a GroupNorm (32 groups) after every tower conv, as FCOS/ATSS do. GroupNorm
normalises each image and level on its own, so the towers stay shared across levels. (On the shapes
demo, from scratch at 192 px, it did not speed up training: VOC mAP 0.488 with it, 0.504 without,
after 330 iterations.)

Initialisation (``init="retinanet"``, the RetinaNet paper): conv weights N(0, 0.01), biases 0, except
the classification bias:
- ``score_type="sigmoid"`` (focal loss): every class bias is -log((1 - pi) / pi), pi = ``prior_prob``
  (0.01), so each class starts at probability pi and the many easy negatives do not swamp the first
  iterations.
- ``score_type="softmax"`` (multibox + OHEM, column 0 = background): the background bias is
  log(K (1 - pi) / pi) for K = C - 1 foreground classes and the others 0, so that the total
  foreground probability starts at pi (each class pi / K). OHEM already balances the loss, so this
  is not needed for stability; it makes an untrained model predict background (no detections above
  --conf_thresh) instead of a uniform 1 / C, which for small C (e.g. 4 classes: 0.25) would be kept.

``init="original"`` is the original codebase's: weights N(0, 0.01), every bias left at PyTorch's default
(uniform +-1 / sqrt(fan_in)).

Outputs follow the anchor order of layers/anchors.py: per level [N, A*C, H, W] -> [N, H, W, A, C]
-> [N, H*W*A, C], concatenated over levels (level-major, then cell row-major, then anchor). The
original flattens its outputs the same way (permute to [N, H, W, A*C], concatenate, view as [N, -1, C]),
so prediction i of a loaded original checkpoint is its prediction i.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor, nn

HEAD_NORMS = ("none", "gn")
HEAD_INITS = ("retinanet", "original")
GN_GROUPS = 32


def _tower(
    in_channels: int, channels: int, num_layers: int, norm: str = "none", bias: bool = True
) -> nn.Sequential:
    """num_layers x (3x3 conv [+ GroupNorm(32)] + ReLU)."""
    layers: List[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=bias))
        if norm == "gn":
            layers.append(nn.GroupNorm(GN_GROUPS, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _flatten_level(pred: Tensor, num_columns: int) -> Tensor:
    """(N, A * K, H, W) -> (N, H * W * A, K): cell row-major, then anchor, as the anchors are ordered."""
    n, _, h, w = pred.shape
    return pred.view(n, -1, num_columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, num_columns)


class DetectionHead(nn.Module):
    """Classification and box towers applied to every pyramid level with the same weights.

    Args:
        in_channels: channels of every pyramid level (the FPN's ``out_channels``); the towers keep it.
        num_anchors: anchors per location A.
        num_classes: score columns C (K + 1 with background column 0 for softmax, K for sigmoid).
        num_layers: 3x3 conv + ReLU layers per tower (before the predictor).
        shared_layers: leading tower layers shared by both heads, 0..num_layers.
        score_type: "sigmoid" or "softmax", selects the classification bias initialisation.
        prior_prob: initial foreground probability pi.
        norm: "none" (RetinaNet) or "gn" (GroupNorm with 32 groups after each tower conv).
        bias: whether the tower convs have a bias (the predictors always do).
        init: "retinanet" or "original" (see the module docstring).

    ``forward(features list[Tensor[N, in_channels, H_l, W_l]])`` returns a dict:
        pred_logits (Tensor[N, sum_l H_l*W_l*A, C]), pred_box_deltas (Tensor[N, sum_l H_l*W_l*A, 4]),
        head_features (list[Tensor[N, in_channels, H_l, W_l]]: the last classification-tower map after
        its ReLU, per level; the input itself when num_layers is 0).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_layers: int = 4,
        shared_layers: int = 0,
        score_type: str = "sigmoid",
        prior_prob: float = 0.01,
        norm: str = "none",
        bias: bool = True,
        init: str = "retinanet",
    ):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"init must be one of {HEAD_INITS}, got {init!r}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        if norm == "gn" and num_layers > 0 and in_channels % GN_GROUPS:
            raise ValueError(f"GroupNorm heads need channels divisible by {GN_GROUPS}, got {in_channels}")
        if not 0 <= shared_layers <= num_layers:
            raise ValueError(f"shared_layers must be in 0..num_layers ({num_layers}), got {shared_layers}")
        if score_type not in ("sigmoid", "softmax"):
            raise ValueError(f"score_type must be 'sigmoid' or 'softmax', got {score_type!r}")
        if score_type == "softmax" and num_classes < 2:
            raise ValueError(
                f"softmax scores need a background column plus classes, got num_classes={num_classes}"
            )
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.num_layers = num_layers
        self.shared_layers = shared_layers
        self.score_type = score_type
        self.norm = norm
        self.bias = bias
        self.init = init
        self.shared_tower = _tower(in_channels, in_channels, shared_layers, norm, bias)
        self.cls_tower = _tower(in_channels, in_channels, num_layers - shared_layers, norm, bias)
        self.box_tower = _tower(in_channels, in_channels, num_layers - shared_layers, norm, bias)
        self.cls_pred = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if init == "retinanet" and m.bias is not None:
                    nn.init.zeros_(m.bias)
        if init == "retinanet":
            cls_bias = self.cls_pred.bias.detach().view(num_anchors, num_classes)
            if score_type == "sigmoid":
                cls_bias.fill_(-math.log((1 - prior_prob) / prior_prob))
            else:
                cls_bias[:, 0] = math.log((num_classes - 1) * (1 - prior_prob) / prior_prob)

    def forward(self, features: List[Tensor]) -> Dict[str, object]:
        logits_per_level, deltas_per_level, head_features = [], [], []
        for x in features:  # one pass per level; the towers are shared across levels
            x = self.shared_tower(x)
            cls_feature = self.cls_tower(x)
            head_features.append(cls_feature)
            logits_per_level.append(_flatten_level(self.cls_pred(cls_feature), self.num_classes))
            deltas_per_level.append(_flatten_level(self.box_pred(self.box_tower(x)), 4))
        return {
            "pred_logits": torch.cat(logits_per_level, dim=1),
            "pred_box_deltas": torch.cat(deltas_per_level, dim=1),
            "head_features": head_features,
        }
