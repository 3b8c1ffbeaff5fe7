"""Single-stage FPN detector: backbone -> FPN -> shared heads, with anchors for the actual feature sizes.

The model only predicts; matching and losses live in the criterion (layers/losses.py) and decoding
plus NMS in the post-processor (layers/postprocess.py), as in DETR's ``build_model``.
"""

from __future__ import annotations

from typing import Dict, List

from torch import Tensor, nn

from layers.anchors import AnchorGenerator
from models.backbone import ResNetBackbone
from models.fpn import FPN
from models.heads import DetectionHead


class FPNDetector(nn.Module):
    """Backbone + FPN + classification/box heads; outputs raw scores and deltas for every anchor.

    Args:
        backbone: returns C3..C5 (finest first), with ``out_channels``.
        fpn: turns them into one map per anchor level (P3..P7).
        head: ``DetectionHead`` applied to every level.
        anchor_generator: anchors for the levels' grid sizes (its strides must match the pyramid's).

    ``forward(images Tensor[N, 3, H, W], targets=None, return_features=False)`` returns a dict:
        pred_logits (Tensor[N, A, C]), pred_box_deltas (Tensor[N, A, 4]),
        anchors (Tensor[A, 4], xyxy input pixels), num_anchors_per_level (list[int]),
        grid_sizes (list[(h_l, w_l)]) and, with ``return_features``, head_features
        (list per level of Tensor[N, F, h_l, w_l], the last classification-tower map after its ReLU).
    Any H, W works (not only multiples of 32): the level sizes are ceil(H / stride). In a padded batch,
    the anchors over the padding are kept; the criterion's matching and the post-processor's clipping to
    target["size"] deal with them. ``targets`` is accepted for the common interface (a two-stage model
    needs them in its forward) and not used.
    """

    def __init__(
        self, backbone: ResNetBackbone, fpn: FPN, head: DetectionHead, anchor_generator: AnchorGenerator
    ):
        super().__init__()
        if fpn.num_outputs != anchor_generator.num_levels:
            raise ValueError(
                f"the FPN gives {fpn.num_outputs} levels, "
                f"the anchor generator has {anchor_generator.num_levels}"
            )
        if head.num_anchors != anchor_generator.num_anchors_per_location:
            raise ValueError(
                f"the head predicts {head.num_anchors} anchors per location, "
                f"the anchor generator makes {anchor_generator.num_anchors_per_location}"
            )
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator

    def forward(
        self, images: Tensor, targets: List[Dict] | None = None, return_features: bool = False
    ) -> Dict[str, object]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Tensor[N, 3, H, W], got shape {list(images.shape)}")
        features = self.fpn(self.backbone(images))
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        expected = self.anchor_generator.grid_sizes_for_input(int(images.shape[-2]), int(images.shape[-1]))
        if grid_sizes != expected:
            # The anchor strides and the network's strides disagree: the anchors would be misplaced.
            raise ValueError(f"feature map sizes {grid_sizes} differ from the anchor grids {expected}")
        head_outputs = self.head(features)
        outputs = {
            "pred_logits": head_outputs["pred_logits"],
            "pred_box_deltas": head_outputs["pred_box_deltas"],
            "anchors": self.anchor_generator(grid_sizes, images.device, image_size=tuple(images.shape[-2:])),
            "num_anchors_per_level": self.anchor_generator.num_anchors_per_level(grid_sizes),
            "grid_sizes": grid_sizes,
        }
        if return_features:
            outputs["head_features"] = head_outputs["head_features"]
        return outputs
