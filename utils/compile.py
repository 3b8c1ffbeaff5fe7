"""``--compile``: torch.compile of a detector's network parts, in place, so that nothing else changes.

What is compiled: the children named ``backbone``, ``fpn`` and ``head`` (the single-stage detector's
whole network; Faster R-CNN's backbone and FPN, its RPN and RoI heads stay eager). The anchors, the
criterion (matching, OHEM's sort, the losses) and the post-processing (top-k, NMS) stay eager: they are
data-dependent (boolean masks, variable counts), where dynamo would break the graph or recompile.

How: ``nn.Module.compile`` (torch.compile of the module's ``__call__``, stored on the module itself), not
``torch.compile(module)``, which returns an ``OptimizedModule`` wrapper whose state-dict keys carry an
``_orig_mod.`` prefix. Here the module objects, their parameters and their state-dict keys stay the same,
so checkpoints written with and without --compile load into each other, the optimizer, EMA
(utils/ema.py copies the eager model: compile after building it) and ``clip_grad_norm_`` see the same
parameters. Under DDP the compiled parts run inside DDP's forward, where dynamo finds the active DDP
module and splits the graphs at DDP's gradient buckets (its DDPOptimizer), as when the DDP-wrapped model
itself is compiled (torch/_dynamo/convert_frame.py, ``_get_active_ddp_module``).

Compilation happens at the first call of each part (minutes for a ResNet-50 on the CPU, about a minute
on a GPU) and again for eval mode and for new input shapes; the first iterations are slow.
"""

from __future__ import annotations

import logging
from typing import List

from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
NETWORK_PARTS = ("backbone", "fpn", "head")


def compile_network(model: nn.Module, mode: str = "default", backend: str = "inductor") -> List[str]:
    """Compile ``model``'s network parts (NETWORK_PARTS that it has) in place; returns their names.

    Args:
        model: the detector itself, not a DDP or FlipTTA wrapper (their ``module`` / ``model``).
        mode: torch.compile's mode: "default", "reduce-overhead" (CUDA graphs on CUDA; on the CPU the
            same as default) or "max-autotune" (benchmarks kernel choices while compiling: slower start).
        backend: torch.compile's backend; "eager" captures the graphs with dynamo and runs them op by
            op (seconds to compile, no speed-up: bench/gpu_suite.py --tiny checks the plumbing with it).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    parts = [name for name in NETWORK_PARTS if isinstance(getattr(model, name, None), nn.Module)]
    if not parts:
        raise ValueError(f"{type(model).__name__} has none of the network parts {NETWORK_PARTS} to compile")
    for name in parts:
        # inductor's modes only: the other backends take no mode
        getattr(model, name).compile(**({"mode": mode} if backend == "inductor" else {}), backend=backend)
    logger.info(
        "torch.compile (mode %s) of %s: compiled at the first call%s",
        mode,
        ", ".join(parts),
        "" if backend == "inductor" else f" (backend {backend})",
    )
    return parts


def is_compiled(module: nn.Module) -> bool:
    """True when ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None
