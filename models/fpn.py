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

``variant="original"`` is the FPN of the original codebase (gurkirt/FPN.pytorch1.0,
``models/resnet.py``), for its checkpoints and its recipe. It differs from ours in four places:
- P5 is the 1x1 lateral of C5 itself: there is no 3x3 conv on the coarsest level.
- The top-down path upsamples the *smoothed* map: P4 = 3x3(up(P5) + lateral(C4)),
  P3 = 3x3(up(P4) + lateral(C3)), where ours upsamples the sum before its 3x3.
- Upsampling is bilinear with ``align_corners=True`` (ours: nearest).
- The 3x3 convs (smoothing, P6, P7) have no bias; the 1x1 laterals keep one. Initialisation: every
  weight N(0, sqrt(2 / (k * k * out_channels))) (He, fan-out), the laterals' biases at PyTorch's
  default (uniform +-1 / sqrt(fan_in)), as the original leaves them.
P6 = 3x3 stride 2 on C5 and P7 = 3x3 stride 2 on ReLU(P6), as in ours with ``p6_from="c5"``.
Parameter names are ours (``lateral_convs``, ``output_convs``, ``p6``, ``p7``); ``output_convs`` has
one conv fewer (P3 and P4 only). models/original.py maps the original's names onto these.
"""

from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

EXTRA_LEVELS = ("p6p7", "maxpool_p6", None)
FPN_VARIANTS = ("ours", "original")


class FPN(nn.Module):
    """Feature pyramid over backbone maps of increasing stride.

    Args:
        in_channels_list: channels of the input maps, finest first (e.g. [512, 1024, 2048] for C3..C5).
        out_channels: channels of every output level.
        extra_levels: "p6p7" (two more levels, convs), "maxpool_p6" (one more level, max-pool) or None.
        p6_from: "c5" or "p5", the input of the P6 conv (``extra_levels="p6p7"`` only).
        variant: "ours" or "original" (see the module docstring; "original" needs "p6p7" from "c5").

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
        variant: str = "ours",
    ):
        super().__init__()
        if extra_levels not in EXTRA_LEVELS:
            raise ValueError(f"extra_levels must be one of {EXTRA_LEVELS}, got {extra_levels!r}")
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        if variant not in FPN_VARIANTS:
            raise ValueError(f"variant must be one of {FPN_VARIANTS}, got {variant!r}")
        original = variant == "original"
        if original and (extra_levels != "p6p7" or p6_from != "c5"):
            raise ValueError(
                f"the original FPN has P6 and P7 from C5, got extra_levels={extra_levels!r}, "
                f"p6_from={p6_from!r}"
            )
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.extra_levels = extra_levels
        self.p6_from = p6_from
        self.variant = variant
        bias = not original  # the original's 3x3 convs have no bias
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels_list)
        num_smoothed = len(self.in_channels_list) - (1 if original else 0)  # original: no 3x3 on P5
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias) for _ in range(num_smoothed)
        )
        self.p6: nn.Conv2d | None = None
        self.p7: nn.Conv2d | None = None
        if extra_levels == "p6p7":
            p6_in = self.in_channels_list[-1] if p6_from == "c5" else out_channels
            self.p6 = nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1, bias=bias)
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1, bias=bias)
        self.num_outputs = len(self.in_channels_list) + {"p6p7": 2, "maxpool_p6": 1, None: 0}[extra_levels]

        for m in self.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if original:  # N(0, sqrt(2 / n)), n = k * k * out_channels; biases keep PyTorch's default
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN built for {len(self.lateral_convs)} input maps, got {len(features)}")
        if self.variant == "original":
            return self._forward_original(features)
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

    def _forward_original(self, features: List[Tensor]) -> List[Tensor]:
        # Top-down as the original: P5 is the lateral itself; each finer level adds the bilinearly
        # upsampled *output* of the coarser one (after its 3x3), then smooths the sum.
        outputs = [self.lateral_convs[-1](features[-1])]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            up = F.interpolate(outputs[0], size=lateral.shape[-2:], mode="bilinear", align_corners=True)
            outputs.insert(0, self.output_convs[i](up + lateral))
        p6 = self.p6(features[-1])
        return outputs + [p6, self.p7(F.relu(p6))]
