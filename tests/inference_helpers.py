"""Small checkpoints for the inference tests (Detector, demo, extract_features, export, --init_from).

One or two iterations of train.py on the tiny shapes set: the weights are far from trained, which is
enough to compare two inference paths on the same checkpoint (pass conf_thresh 0 to get detections).
"""

import os

from tiny_shapes import MODEL_OPTS, TRAIN_OPTS

import train

# Faster R-CNN at 64 px: the same backbone/width options plus what the two-stage model needs.
FASTER_RCNN_OPTS = ["--arch", "faster_rcnn_fpn", "--resize_mode", "square"]


def train_tiny(data_root: str, save_root: str, *extra: str, iterations: int = 1) -> str:
    """Train ``iterations`` steps without validation; returns the checkpoint's path."""
    argv = MODEL_OPTS + TRAIN_OPTS + ["--data_root", data_root, "--save_root", str(save_root)]
    argv += ["--run_name", "r", "--max_iter", str(iterations), "--step_values", "", "--no_val"]
    argv += ["--save_step", str(iterations), "--warmup_iters", "0", *extra]
    summary = train.main(train.get_args_parser().parse_args(argv))
    return os.path.join(summary["run_dir"], f"model_{iterations:06d}.pth")


def val_images(data_root: str):
    folder = os.path.join(data_root, "shapes", "images", "val")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))
