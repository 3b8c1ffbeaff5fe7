"""The seeded inputs bench_components.py and loss_memory.py share: targets, and the loss's tensors."""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from layers.anchors import AnchorGenerator, predefined_anchor_whs  # noqa: E402


def make_targets(
    num_images: int, input_dim: int, num_labels: int, generator: torch.Generator, device: torch.device
) -> List[Dict[str, torch.Tensor]]:
    """2..20 random boxes per image (sides 16..input_dim/2 px), labels 0..num_labels-1, plus our fields."""
    targets = []
    for _ in range(num_images):
        count = int(torch.randint(2, 21, (1,), generator=generator))
        wh = torch.empty(count, 2).uniform_(16, input_dim / 2, generator=generator)
        xy = torch.rand(count, 2, generator=generator) * (input_dim - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        size = torch.tensor([input_dim, input_dim])
        targets.append(
            {
                "boxes": boxes.to(device),
                "labels": torch.randint(0, num_labels, (count,), generator=generator).to(device),
                "difficult": torch.zeros(count, dtype=torch.bool, device=device),
                "iscrowd": torch.zeros(count, dtype=torch.bool, device=device),
                "size": size.to(device),
                "orig_size": size.to(device),
                "scale": torch.ones(2, device=device),
            }
        )
    return targets


def loss_inputs(batch_size: int, input_dim: int, num_columns: int, seed: int, device: torch.device):
    """The loss benchmark's tensors (seeded), built in place: anchors (Tensor[A, 4]), pred_logits
    (Tensor[N, A, C], N(-6, 1.5^2), requires grad), pred_box_deltas (Tensor[N, A, 4], requires grad) and
    make_targets' targets (labels 0..C-2: valid for the multibox loss and the focal losses alike)."""
    generator = torch.Generator().manual_seed(seed)
    anchor_generator = AnchorGenerator(predefined_anchor_whs())
    grid_sizes = anchor_generator.grid_sizes_for_input(input_dim, input_dim)
    anchors = anchor_generator(grid_sizes, device)
    n, num_anchors, c = batch_size, anchors.shape[0], num_columns
    logits = torch.randn(n, num_anchors, c, generator=generator).mul_(1.5).sub_(6.0).to(device)
    deltas = torch.randn(n, num_anchors, 4, generator=generator).mul_(0.5).to(device)
    targets = make_targets(n, input_dim, c - 1, generator, device)
    return anchors, logits.requires_grad_(True), deltas.requires_grad_(True), targets
