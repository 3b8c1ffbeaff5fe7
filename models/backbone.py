"""ResNet backbones returning the C2..C5 feature maps, with ImageNet or user weights and freezing.

Levels follow the FPN paper: C_k is the output of the residual stage with stride 2**k
(C2 = layer1, stride 4; C3 = layer2, stride 8; C4 = layer3, stride 16; C5 = layer4, stride 32).
The single-stage detector uses C3..C5; a two-stage FPN detector can ask for C2..C5.

Weights (``pretrained``):
- "imagenet": torchvision's IMAGENET1K_V1 file, read from torch's hub cache
  (``<torch.hub.get_dir()>/checkpoints/<file>``). Nothing is downloaded: when the file is missing the
  error names the exact path to put it at.
- "none": random initialisation (training from scratch).
- any other string: the path of a torchvision-format ResNet state dict ("module." prefixes are
  stripped, fc.* keys ignored; any other missing or unexpected key is an error).

Freezing (only meaningful with loaded weights; ``build_model`` passes 0 / False when training from
scratch): ``freeze_upto = k`` freezes the stem (conv1 + bn1) and the first k residual stages:
0 = nothing frozen, 1 = stem + layer1 (the default, as in Detectron/torchvision), 2 = + layer2,
3 = + layer3, 4 = the whole backbone. Frozen parameters get ``requires_grad = False``.
``freeze_bn = True`` freezes every batch norm of the backbone: affine parameters are not trained and
the running statistics are not updated (the layers stay in eval mode whatever ``model.train()`` says),
because detection batches are too small to estimate them well. Batch norm inside a frozen stage is
always frozen. ``bn_mode`` says the same in three words and adds the original codebase's policy:
"frozen" (= ``freeze_bn=True``), "train" (= ``freeze_bn=False``) and "eval": the running statistics stay
fixed (eval mode) while the affine parameters train, as the original's ``set_bn_eval`` with ``--bn 0``.
The layers stay ``nn.BatchNorm2d`` (not FrozenBatchNorm2d) so that a checkpoint has
the same keys whether or not batch norm was frozen while training it.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence

import torch
import torchvision
from torch import Tensor, nn

from utils.checkpoint import safe_torch_load
from utils.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

BN_MODES = ("frozen", "eval", "train")
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Output channels of layer1..layer4 (C2..C5).
_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnet152": (256, 512, 1024, 2048),
}


def imagenet_weights_path(name: str) -> str:
    """Where torch's hub cache keeps torchvision's IMAGENET1K_V1 weights file for ResNet ``name``."""
    if name not in RESNET_NAMES:
        raise UserError(f"unknown backbone {name!r}; expected one of {RESNET_NAMES}")
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _read_state_dict(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file {path!r} does not exist")
    obj = safe_torch_load(path, "--pretrained weights file")
    # Training scripts often wrap the weights ({"model": sd} or {"state_dict": sd}).
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"--pretrained weights file {path!r} does not hold a state dict (a dict of name -> tensor)"
        )
    return obj


def load_resnet_weights(resnet: torchvision.models.ResNet, name: str, pretrained: str) -> str:
    """Load ImageNet (``pretrained="imagenet"``) or file (``pretrained=PATH``) weights into ``resnet``.

    Returns the path the weights came from. Raises FileNotFoundError when the file is missing (the
    message names the cache path for "imagenet") and ValueError when the file does not fit the network
    (missing, unexpected or wrongly shaped keys, fc.* excepted).
    """
    if pretrained == "imagenet":
        path = imagenet_weights_path(name)
        url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ImageNet weights for {name} are not in torch's cache: put "
                f"{os.path.basename(path)!r} (from {url}) "
                f"at {path!r} (set TORCH_HOME to use another cache folder), or pass --pretrained PATH "
                f"(a torchvision {name} state dict), or --pretrained none to train from scratch"
            )
    else:
        path = pretrained
    state_dict = _read_state_dict(path)
    state_dict = {
        k.removeprefix("module."): v for k, v in state_dict.items() if not k.startswith(("fc.", "module.fc."))
    }

    own = resnet.state_dict()
    problems: List[str] = []
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    # num_batches_tracked is absent from old torchvision files; batch norm fills it in itself.
    missing = [
        k
        for k in own
        if k not in state_dict and not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in own]
    for label, keys in (("wrongly shaped", wrong_shape), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {label} keys (e.g. {keys[:3]})")
    if problems:
        raise UserError(f"weights file {path!r} does not fit a torchvision {name}: " + "; ".join(problems))
    resnet.load_state_dict(state_dict, strict=False)  # strict=False only for the dropped fc.* keys
    logger.info("loaded %s weights from %s", name, path)
    return path


class ResNetBackbone(nn.Module):
    """A torchvision ResNet cut after its residual stages; returns the feature maps of ``return_levels``.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
        pretrained: "imagenet", "none" or a state-dict path (see the module docstring).
        freeze_upto: freeze the stem and the first ``freeze_upto`` stages (0..4).
        freeze_bn: freeze every batch norm (parameters and running statistics).
        bn_mode: "frozen", "eval" or "train" (see the module docstring); overrides ``freeze_bn`` when given.
        return_levels: which C_k to return, increasing, from 2..5.

    Attributes:
        out_channels (list[int]): channels of each returned map; strides (list[int]): 2**k per map.

    ``forward(images Tensor[N, 3, H, W]) -> list[Tensor[N, out_channels[i], ceil(H / strides[i]), ...]]``.
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: str = "imagenet",
        freeze_upto: int = 1,
        freeze_bn: bool = True,
        return_levels: Sequence[int] = (3, 4, 5),
        bn_mode: str | None = None,
    ):
        super().__init__()
        bn_mode = bn_mode if bn_mode is not None else ("frozen" if freeze_bn else "train")
        if bn_mode not in BN_MODES:
            raise UserError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if name not in RESNET_NAMES:
            raise UserError(f"unknown backbone {name!r}; expected one of {RESNET_NAMES}")
        return_levels = tuple(int(k) for k in return_levels)
        if (
            not return_levels
            or list(return_levels) != sorted(set(return_levels))
            or not set(return_levels) <= {2, 3, 4, 5}
        ):
            raise UserError(f"return_levels must be increasing levels from 2..5, got {return_levels}")
        if not 0 <= freeze_upto <= 4:
            raise UserError(f"freeze_upto must be in 0..4, got {freeze_upto}")

        resnet = getattr(torchvision.models, name)(weights=None)
        self.weights_path: str | None = None
        if pretrained != "none":
            self.weights_path = load_resnet_weights(resnet, name, pretrained)

        self.name = name
        self.return_levels = return_levels
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        # Keep only the stages up to the deepest level asked for (fc and avgpool are dropped).
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2 if max(return_levels) >= 3 else None
        self.layer3 = resnet.layer3 if max(return_levels) >= 4 else None
        self.layer4 = resnet.layer4 if max(return_levels) >= 5 else None
        self.out_channels: List[int] = [_STAGE_CHANNELS[name][k - 2] for k in return_levels]
        self.strides: List[int] = [2**k for k in return_levels]

        self.freeze_upto = freeze_upto
        self.bn_mode = bn_mode
        self.freeze_bn = bn_mode == "frozen"
        frozen_parts = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4][: freeze_upto + 1]
        frozen_parts = frozen_parts if freeze_upto > 0 else []
        for part in frozen_parts:
            if part is not None:
                part.requires_grad_(False)
        frozen_bn = set()
        for part in frozen_parts:
            if part is not None:
                frozen_bn.update(m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        all_bn = {m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        if bn_mode == "frozen":
            frozen_bn.update(all_bn)
        for m in frozen_bn:
            m.requires_grad_(False)
        # Kept in eval mode by train(): the frozen ones; with "eval" all (their affine params still train).
        eval_bn = all_bn if bn_mode == "eval" else frozen_bn
        # Names, not module references: SyncBatchNorm conversion replaces the modules after this.
        self._frozen_bn_names = sorted(n for n, m in self.named_modules() if m in eval_bn)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Set train/eval mode, keeping frozen batch norm in eval mode (its running stats stay fixed)."""
        super().train(mode)
        modules = dict(self.named_modules())
        for name in self._frozen_bn_names:
            modules[name].eval()
        return self

    def forward(self, images: Tensor) -> List[Tensor]:
        x = self.layer1(self.stem(images))
        features = [x]
        for stage in (self.layer2, self.layer3, self.layer4):
            if stage is None:
                break
            x = stage(x)
            features.append(x)
        return [features[k - 2] for k in self.return_levels]

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, return_levels={self.return_levels}, freeze_upto={self.freeze_upto}, "
            f"bn_mode={self.bn_mode}, weights={self.weights_path}"
        )
