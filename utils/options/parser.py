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
