"""What differs between the architectures: one small description each, read by the scripts and checks.

``ARCH_SPECS[name]`` says, for ``--arch name``, what the scripts and the option checks would otherwise
find out with ``if args.arch == ...``: its score type for a loss, the parts of its run name, which
options and scripts apply to it, and what the rows of extract_features.py hold. The builder itself is
``models.ARCH_BUILDERS[name]``; a new architecture adds one entry to each.

This module imports nothing of the project, so that utils/options can read it (for ``--arch``'s
choices and the checks) while models/__init__.py builds the networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class ArchSpec:
    """One architecture as the scripts see it.

    Attributes:
        name: the ``--arch`` value.
        summary: one line for ``--help``.
        loss_types: the ``--loss_type`` values it trains with.
        sigmoid_losses: the loss types whose scores are per-class sigmoids (K columns); the others are
            a softmax with background first (K + 1 columns).
        our_anchors: its anchors come from --anchor_type / --num_scales / --aspect_ratios / --anchor_file
            (named in the run name); False: fixed anchors of its own (``run_name_anchors``).
        run_name_anchors: the run name's anchor part when ``our_anchors`` is False.
        our_heads: the single-stage heads, whose options (--shared_heads, --num_shared_layers,
            --head_norm gn, --fpn_variant original, --bn_mode eval) apply and are named in the run name.
        tta: --tta flip applies (a second, flipped pass merged before NMS).
        original_protocol: --protocol original (the original's post-processing) applies.
        exportable: export.py writes it as ONNX / TorchScript (else: --format weights only).
        needs_topk: its post-processing needs a cap per image (--topk >= 1).
        first_fpn_level: the pyramid level of its first FPN lateral (init_from.py maps FPN weights by it).
        feature_rows: what extract_features.py writes after objectness, box and class probabilities:
            "anchor_cell" (the classification tower's 3x3 neighbourhood of the detection's anchor) or
            "roi" (the detection's RoI box-head feature).
    """

    name: str
    summary: str
    loss_types: Tuple[str, ...]
    sigmoid_losses: Tuple[str, ...]
    our_anchors: bool
    run_name_anchors: str
    our_heads: bool
    tta: bool
    original_protocol: bool
    exportable: bool
    needs_topk: bool
    first_fpn_level: int
    feature_rows: str

    def score_type(self, loss_type: str) -> str:
        """ "sigmoid" or "softmax": how the model's class scores are read for ``--loss_type loss_type``."""
        return "sigmoid" if loss_type in self.sigmoid_losses else "softmax"


ARCH_SPECS: Dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            name="fpn_ohem",
            summary="single-stage FPN detector",
            loss_types=("mbox", "focal"),
            sigmoid_losses=("focal",),
            our_anchors=True,
            run_name_anchors="",
            our_heads=True,
            tta=True,
            original_protocol=True,
            exportable=True,
            needs_topk=False,
            first_fpn_level=3,
            feature_rows="anchor_cell",
        ),
        ArchSpec(
            name="faster_rcnn_fpn",
            summary="two-stage Faster R-CNN with FPN",
            loss_types=("mbox",),
            sigmoid_losses=(),
            our_anchors=False,
            run_name_anchors="rpn",
            our_heads=False,
            tta=False,
            original_protocol=False,
            exportable=False,
            needs_topk=True,
            first_fpn_level=2,
            feature_rows="roi",
        ),
    )
}


def archs_with(feature: str) -> str:
    """The --arch values whose description has ``feature`` true, as error messages name them
    ("fpn_ohem", or "fpn_ohem / other")."""
    return " / ".join(name for name, spec in ARCH_SPECS.items() if getattr(spec, feature))
