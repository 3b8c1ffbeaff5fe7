"""Draw a run folder's curves (loss terms, learning rate, validation metrics, throughput) as one PNG.

    python plot_run.py runs/RUN                 # writes runs/RUN/curves.png (train.py does it at the end)
    python plot_run.py runs/RUN --out run.png
    python plot_run.py --metrics runs/RUN/metrics_model_050000_voc_test2007.json --out pr.png
        # precision/recall per class again from a metrics file of evaluate.py, without evaluating

The curves come from ``<run>/metrics.jsonl`` (one JSON line per log step and per validation); an
iteration logged twice (a resumed run) is drawn once, with its last record.
"""

from __future__ import annotations

import argparse
import json
import os

from utils.errors import UserError, run_cli
from utils.logger import setup_logging
from utils.plots import plot_pr_curves, plot_run


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "plot_run.py",
        description="Draw a run's training curves, or the PR curves of a metrics file",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", nargs="?", default=None, help="a run folder written by train.py")
    parser.add_argument("--metrics", default=None, help="a metrics_*.json of evaluate.py: draw its PR curves")
    parser.add_argument(
        "--out",
        default=None,
        help="PNG to write (default: <run_dir>/curves.png, or pr_*.png next to --metrics)",
    )
    return parser


def main(args: argparse.Namespace) -> str:
    setup_logging()
    if (args.run_dir is None) == (args.metrics is None):
        raise UserError("give a run folder or --metrics FILE (one of them)")
    if args.metrics:
        try:
            with open(args.metrics) as f:
                metrics = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--metrics {args.metrics}: cannot read it ({err})") from err
        stem = os.path.splitext(os.path.basename(args.metrics))[0].removeprefix("metrics_")
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), f"pr_{stem}.png")
        path = plot_pr_curves(metrics, out, title=stem)
    else:
        if not os.path.isdir(args.run_dir):
            raise UserError(f"{args.run_dir}: no such run folder")
        path = plot_run(args.run_dir, args.out)
    print(path)
    return path


if __name__ == "__main__":
    run_cli(main, get_args_parser())
