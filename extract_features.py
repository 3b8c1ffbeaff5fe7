"""Per image, the top detections with their scores, boxes and head features (the original's extraction).

    python extract_features.py --checkpoint CKPT --dataset voc --val_sets test2007 --save_path feats/
    python extract_features.py --checkpoint CKPT --images some_folder/ --save_path feats/

For each image, detections go through class-agnostic NMS and the top --num_nodes (10) are kept.
Each image gives one float32 tensor ``<save_path>/<image path>.pth`` (the path relative to the folder
holding all images, without extension; names that still collide keep it: ``x_png.pth``) of shape
[num_nodes, 1 + 4 + C + 9 * F]; rows past the number of surviving detections are zero. Row layout:

| columns                 | content                                                                   |
| ----------------------- | ------------------------------------------------------------------------- |
| 0                       | objectness: 1 - P(background) (softmax models), max class sigmoid (focal)  |
| 1:5                     | box x1, y1, x2, y2, normalised by the original image width/height         |
| 5:5+C                   | class probabilities: C = K+1 with background first (mbox), C = K (focal)  |
| 5+C:5+C+9F              | last classification-tower feature (F = --fpn_channels, 256) in the 3x3     |
|                         | cell neighbourhood of the detection's anchor, flattened channel-major      |
|                         | ([F, 3, 3] -> 9F; zeros outside the feature map)                           |

With ``--arch faster_rcnn_fpn`` checkpoints the feature part is the detection's RoI box-head feature
instead (see models/faster_rcnn.py), and C is K+1.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from data.dataset import build_dataset
from data.image_list import ImageListDataset, find_images
from data.loaders import build_eval_loader, loader_options
from demo import check_skipped, counting_skips
from engine import Detector
from models.archs import ARCH_SPECS
from utils.errors import UserError, run_cli
from utils.logger import setup_logging
from utils.options import (
    check_common_args,
    get_checkpoint_script_parser,
    resolve_defaults,
    set_as_typed,
)
from utils.output_paths import output_stems, unique_files

logger = logging.getLogger("extract_features")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    title = "extraction (the original's names are aliases)"
    parser, g = get_checkpoint_script_parser(__doc__, title, add_help)
    g.add_argument(
        "--images",
        "--samples_path",
        nargs="*",
        default=None,
        help="image files/folders (default: --val_sets of --dataset)",
    )
    g.add_argument(
        "--save_path", "--out", "--output", default="features", help="output folder, one .pth per image"
    )
    parser.set_defaults(topk=10)  # --topk / --num_nodes (utils/options/): detections kept per image
    return parser


def cell_neighbourhood_features(
    head_features: List[Tensor],
    anchor_idxs: Tensor,
    image_idx: int,
    num_anchors_per_level: List[int],
    grid_sizes: List[tuple],
) -> Tensor:
    """3x3 features around the anchor cells of detections of one image.

    head_features: per level Tensor[N, F, H_l, W_l]; anchor_idxs (Tensor[D]) index the concatenated
    anchors (level-major, then row-major cells, then anchor type). Returns Tensor[D, 9 * F].
    """
    num_feat = head_features[0].shape[1]
    out = head_features[0].new_zeros(len(anchor_idxs), num_feat * 9)
    offsets = torch.tensor([0] + num_anchors_per_level, device=anchor_idxs.device).cumsum(0)
    for level, (feature, (h, w)) in enumerate(zip(head_features, grid_sizes)):
        in_level = (anchor_idxs >= offsets[level]) & (anchor_idxs < offsets[level + 1])
        if not in_level.any():
            continue
        per_location = num_anchors_per_level[level] // (h * w)
        cell = (anchor_idxs[in_level] - offsets[level]) // per_location
        ys, xs = cell // w, cell % w
        padded = F.pad(feature[image_idx], (1, 1, 1, 1))  # [F, H+2, W+2]; zeros outside the map
        dy, dx = torch.meshgrid(
            torch.arange(3, device=ys.device), torch.arange(3, device=ys.device), indexing="ij"
        )
        rows = ys[:, None] + dy.reshape(1, 9)  # [D_l, 9], in padded coordinates (offset 1 cancels -1..1)
        cols = xs[:, None] + dx.reshape(1, 9)
        patch = padded[:, rows, cols]  # [F, D_l, 9]
        out[in_level] = patch.permute(1, 0, 2).reshape(-1, num_feat * 9).to(out.dtype)
    return out


def detection_rows(
    outputs: Dict[str, Any],
    detection: Dict[str, Tensor],
    image_idx: int,
    orig_size: Tensor,
    score_type: str,
    num_nodes: int,
) -> Tensor:
    """The [num_nodes, 1 + 4 + C + 9F] feature table of one image (zero rows past the detections)."""
    anchor_idxs = detection["anchor_idxs"].to(outputs["pred_logits"].device)[:num_nodes]
    logits = outputs["pred_logits"][image_idx, anchor_idxs].float()
    if score_type == "softmax":
        probs = logits.softmax(-1)
        objectness = 1 - probs[:, 0]
    else:
        probs = logits.sigmoid()
        objectness = probs.max(-1).values if len(probs) else probs.new_zeros(0)
    h, w = (float(v) for v in orig_size)
    boxes = detection["boxes"][:num_nodes].to(probs.device) / probs.new_tensor([w, h, w, h])
    feats = cell_neighbourhood_features(
        outputs["head_features"],
        anchor_idxs,
        image_idx,
        outputs["num_anchors_per_level"],
        outputs["grid_sizes"],
    )
    rows = torch.cat([objectness[:, None], boxes, probs, feats.float()], dim=1)
    table = rows.new_zeros(num_nodes, rows.shape[1])
    table[: len(rows)] = rows
    return table.cpu()


def main(args: argparse.Namespace) -> Dict[str, Any]:
    setup_logging()
    resolve_defaults(args)
    check_common_args(args)
    args.num_nodes = args.topk  # --num_nodes is an alias of --topk
    if args.num_nodes < 1:
        raise SystemExit(f"--num_nodes must be >= 1, got {args.num_nodes}")
    if args.tta != "none":  # a feature row belongs to one anchor of one pass; the flipped pass has none
        raise SystemExit(f"--tta {args.tta} does not apply to extract_features.py (features are per anchor)")
    # The original keeps the top detections after class-agnostic NMS, whatever the checkpoint's options.
    set_as_typed(args, class_agnostic_nms=True, topk=args.num_nodes, tta=args.tta)
    files = None
    if args.images is not None:
        files, _ = unique_files(find_images(args.images))
        if not files:
            raise UserError(f"no images found in {args.images}")
    detector = Detector.from_checkpoint(args.checkpoint, args.device, cli_args=args, parser=get_args_parser())
    run_args = detector.args
    if files is not None:
        # Unreadable files always come back as skipped samples, so that their names reach this process.
        dataset = ImageListDataset(files, detector.transforms, skip_bad_images=True)
    else:
        dataset = build_dataset(run_args, run_args.val_sets, train=False)
        files = [dataset.image_path(i) for i in range(len(dataset))]
        if not files:
            raise UserError(f"--val_sets {run_args.val_sets} of {run_args.dataset} has no images")
    stem_of = dict(zip(files, output_stems(files)))
    loader = build_eval_loader(
        dataset,
        detector.batch_size,
        run_args.num_workers,
        size_divisibility=detector.collate.size_divisibility,
        **loader_options(run_args, detector.device),
    )
    arch = ARCH_SPECS[run_args.arch]
    score_type = arch.score_type(run_args.loss_type)
    num_written, shape, skipped = 0, None, []
    batches = detector.predict_batches(counting_skips(loader, skipped), return_features=True)
    for targets, detections, outputs in batches:
        check_skipped(skipped, args.skip_bad_images)
        for i, (target, det) in enumerate(zip(targets, detections)):
            if arch.feature_rows == "roi":  # two-stage models hand back their own per-detection features
                rows = det["roi_features"][: args.num_nodes].float()
                table = rows.new_zeros(args.num_nodes, rows.shape[1])  # zero rows past the detections
                table[: len(rows)] = rows
            else:
                table = detection_rows(outputs, det, i, target["orig_size"], score_type, args.num_nodes)
            out_path = os.path.join(args.save_path, stem_of[str(target["file_name"])] + ".pth")
            os.makedirs(os.path.dirname(out_path), exist_ok=True)
            torch.save(table, out_path)
            num_written, shape = num_written + 1, tuple(table.shape)
    check_skipped(skipped, args.skip_bad_images)
    if skipped:
        logger.warning(
            "%d of %d images were unreadable and skipped (--skip_bad_images): %s",
            len(skipped),
            len(files),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    logger.info("wrote %d feature tensors of shape %s to %s", num_written, shape, args.save_path)
    return {
        "num_images": num_written,
        "num_skipped": len(skipped),
        "shape": shape,
        "save_path": args.save_path,
    }


if __name__ == "__main__":
    run_cli(main, get_args_parser())
