"""Feature pyramid network (Lin et al., 2017) with the optional coarser levels of RetinaNet / Faster R-CNN.

``FPN`` is generic over its inputs: give it C3..C5 with ``extra_levels="p6p7"`` for the single-stage
detector (outputs P3..P7, as in RetinaNet), or C2..C5 with ``extra_levels="maxpool_p6"`` for a
Faster R-CNN FPN (outputs P2..P6).

- Lateral 1x1 convs bring every C_k to ``out_channels``; the top-down path adds the coarser map,
  upsampled with nearest neighbour to the lateral's exact size (so odd sizes such as 75 <- 38 work, not
  only factors of 2); a 3x3 conv smooths each sum.
- ``extra_levels="p6p7"``: P6 = 3x3 stride-2 conv (padding 1) on C5 (``p6_from="c5"``, the RetinaNet
  paper's choice: C5 has more channels and has not been through the top-down sum) or on P5
  (``p6_from="p5"``, as in later detectron2 configs); P7 = 3x3 stride-2 conv on ReLU(P6).
  ``"maxpool_p6"``: P6 = max-pool of the last output with kernel 1, stride 2 (Faster R-CNN FPN, no
  parameters). ``None``: no extra level.
- Level sizes: a stride-2 conv/pool maps a width of w to ceil(w / 2), so a 600x600 input gives P3..P7
  of 75, 38, 19, 10 and 5 cells.
- Initialisation: every conv uses ``kaiming_uniform_(a=1)`` (uniform with bound sqrt(3 / fan_in),
  Caffe2's "XavierFill", as in Detectron and torchvision's FPN), biases 0.
"""

from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

EXTRA_LEVELS = ("p6p7", "maxpool_p6", None)


class FPN(nn.Module):
    """Feature pyramid over backbone maps of increasing stride.

    Args:
        in_channels_list: channels of the input maps, finest first (e.g. [512, 1024, 2048] for C3..C5).
        out_channels: channels of every output level.
        extra_levels: "p6p7" (two more levels, convs), "maxpool_p6" (one more level, max-pool) or None.
        p6_from: "c5" or "p5", the input of the P6 conv (``extra_levels="p6p7"`` only).

    ``forward(features list[Tensor[N, in_channels_list[i], H_i, W_i]])`` returns
    list[Tensor[N, out_channels, ., .]]: len(features) maps at the input sizes, then the extra levels,
    finest first.
    """

    def __init__(
        self,
        in_channels_list: Sequence[int],
        out_channels: int = 256,
        extra_levels: str | None = "p6p7",
        p6_from: str = "c5",
    ):
        super().__init__()
        if extra_levels not in EXTRA_LEVELS:
            raise ValueError(f"extra_levels must be one of {EXTRA_LEVELS}, got {extra_levels!r}")
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.extra_levels = extra_levels
        self.p6_from = p6_from
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels_list)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels_list
        )
        self.p6: nn.Conv2d | None = None
        self.p7: nn.Conv2d | None = None
        if extra_levels == "p6p7":
            p6_in = self.in_channels_list[-1] if p6_from == "c5" else out_channels
            self.p6 = nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1)
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.num_outputs = len(self.in_channels_list) + {"p6p7": 2, "maxpool_p6": 1, None: 0}[extra_levels]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN built for {len(self.lateral_convs)} input maps, got {len(features)}")
        # Top-down: start from the coarsest map, upsample to the next finer lateral's exact size, add.
        inner = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[i](inner))

        if self.extra_levels == "p6p7":
            p6 = self.p6(features[-1] if self.p6_from == "c5" else outputs[-1])
            outputs += [p6, self.p7(F.relu(p6))]
        elif self.extra_levels == "maxpool_p6":
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
