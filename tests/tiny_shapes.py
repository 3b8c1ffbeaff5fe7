"""The tiny shapes set and the small-model options the end-to-end and torchrun tests share."""

import os

from prep import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_OPTS = [
    "--dataset",
    "shapes",
    "--basenet",
    "resnet18",
    "--pretrained",
    "none",
    "--fpn_channels",
    "16",
    "--num_head_layers",
    "1",
    "--input_dim",
    "64",
    "--num_scales",
    "1",
    "--device",
    "cpu",
    "-j",
    "0",
    "--eval_batch_size",
    "4",
]
TRAIN_OPTS = [
    "--batch_size",
    "4",
    "--lr",
    "0.01",
    "--max_iter",
    "12",
    "--step_values",
    "8",
    "--warmup_iters",
    "2",
    "--save_step",
    "6",
    "--keep_checkpoints",
    "0",
    "--val_step",
    "0",
    "--log_step",
    "3",
]


def make_tiny_shapes(root: str) -> str:
    """16 train and 6 val images of 64 px under ``root``/shapes; returns ``root``."""
    args = shapes.get_args_parser().parse_args(
        [
            "--data_root",
            root,
            "--num_train",
            "16",
            "--num_val",
            "6",
            "--image_size",
            "64",
            "--min_size",
            "10",
            "--num_workers",
            "0",
        ]
    )
    shapes.main(args)
    return root
