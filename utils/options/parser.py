"""The one option parser every script shares: its groups are in groups_model.py and groups_run.py.

How scripts use it: the package docstring (utils/options/__init__.py).

Option names follow the original codebase (``--basenet``, ``--shared_heads``, ``--anchor_type``,
``--loss_type``, ``--max_iter``, ``--step_values``, ``--val_step``, ``--man_seed``), and every option of
its four scripts parses: its other spellings are aliases (``--learning-rate``, ``--jaccard_threshold``,
``--num_nodes``), its booleans take ``=True/False/1/0`` (``BoolAction``) and ``--ngpu`` launches torchrun
(utils/launch.py). One spelling per concept: the first option string is the one ``--help`` shows.
"""

from __future__ import annotations

import argparse
from typing import Tuple

from utils.cli import OptionParser  # noqa: F401 (re-exported: scripts build their parser with it)
from utils.options.groups_model import add_model_groups
from utils.options.groups_run import add_run_groups

# Option groups of training only: demo.py and extract_features.py accept them (a training command line
# works there unchanged) but do not list them in --help.
TRAINING_GROUPS = ("loss", "sampling", "schedule", "logging")
TRAINING_OPTIONS = ("train_sets", "augment", "crop_rule", "pretrained", "freeze_upto", "freeze_bn")


def get_common_parser() -> argparse.ArgumentParser:
    """Options shared by train.py, evaluate.py, demo.py and extract_features.py.

    (kmeans_for_anchors.py has its own parser with the same data and input names: its --max_iter is
    k-means iterations.)
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_model_groups(parser)
    add_run_groups(parser)
    return parser


def get_checkpoint_script_parser(
    description: str | None, title: str, add_help: bool = True
) -> Tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """The parser of a script that runs a trained checkpoint (demo.py, extract_features.py): every
    common option (the training ones accepted but not listed in --help) and, in the group ``title``,
    --checkpoint (the original's --model_path). Returns the parser and that group for the script's own."""
    parser = OptionParser(
        description=description,
        add_help=add_help,
        parents=[get_common_parser()],
        hidden_groups=TRAINING_GROUPS,
        hidden_options=TRAINING_OPTIONS,
    )
    group = parser.add_argument_group(title)
    group.add_argument("--checkpoint", "--model_path", required=True, help="a checkpoint written by train.py")
    return parser, group
