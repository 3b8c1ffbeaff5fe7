"""Exponential moving average of a model's weights (``--ema``), kept beside the trained weights.

Built on ``torch.optim.swa_utils.AveragedModel`` (one foreach lerp per step over parameters and
buffers, so frozen BN statistics and any running statistics are averaged too). The decay ramps up
as ``decay * (1 - exp(-updates / tau))``, as in YOLOv5/timm's ModelEmaV2 practice: early weights are
noise, and a fixed 0.9998 would keep them for thousands of iterations on a short schedule.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class ModelEMA:
    """EMA of ``model``'s parameters and buffers.

    Args:
        model: the model being trained (not its DDP wrapper); copied once, on its device.
        decay: the asymptotic decay, in [0, 1).
        tau: iterations over which the decay ramps up from 0 (tau <= 0: constant decay).

    ``update(model)`` after every optimizer step; ``module`` is the averaged model (eval mode, no
    gradients); checkpoints hold ``module.state_dict()`` and ``updates``, restored with ``load``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = 0
        self._averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=True)
        self._averaged.eval().requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self._averaged.module

    def current_decay(self) -> float:
        """The decay applied by the next update (``updates`` counts those already made)."""
        if self.tau <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def _lerp(self, ema_tensors: List[Tensor], model_tensors: List[Tensor], _n_averaged: Any) -> None:
        weight = 1.0 - self.current_decay()
        if torch.is_floating_point(ema_tensors[0]):
            torch._foreach_lerp_(ema_tensors, model_tensors, weight)
        else:  # integer buffers (BN's num_batches_tracked): follow the model
            for e, m in zip(ema_tensors, model_tensors):
                e.copy_(m)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # AveragedModel copies the model on its first update and averages from the second on; we count
        # both, so that the ramp starts at the first step.
        self._averaged.update_parameters(model)
        self.updates += 1

    def load(self, ema_weights: Dict[str, Tensor], updates: int) -> None:
        """Restore from a checkpoint's ``model_ema`` weights and ``ema_updates`` count."""
        self.module.load_state_dict(ema_weights)
        self.updates = int(updates)
        # AveragedModel's own counter only decides "copy on the first update": resumed, it must average.
        self._averaged.n_averaged.fill_(max(self.updates, 1))
