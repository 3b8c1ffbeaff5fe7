"""Merge Open Images challenge submission CSVs, e.g. from models trained on different class bins.

    python merge_submissions.py --inputs bin0.csv bin1.csv bin2.csv --output submission.csv

Each input is a CSV written by ``evaluate.py --submission`` (``ImageId,PredictionString``, predictions
"LabelMID score xmin ymin xmax ymax" with normalised coordinates). Predictions of the same ImageId are
concatenated in the order of ``--inputs``; every image that appears in any input gets one row, in order of
first appearance (see ``metrics.oid.submission.merge_oid_submissions``). Nothing is rescored: the models'
scores are compared as they are, which is what the challenge metric does with one file per class bin.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict

from metrics.oid.submission import merge_oid_submissions
from utils.cli import HelpFormatter
from utils.errors import run_cli

logger = logging.getLogger("merge_submissions")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge Open Images submission CSVs", add_help=add_help, formatter_class=HelpFormatter
    )
    parser.add_argument("--inputs", nargs="+", required=True, help="submission CSVs, in merge order")
    parser.add_argument(
        "--save_path",
        "--output",
        "--out",
        dest="output",
        required=True,
        help="merged submission CSV (written atomically)",
    )
    return parser


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Merge ``args.inputs`` into ``args.output``; returns merge_oid_submissions' counts."""
    missing = [p for p in args.inputs if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--inputs: file(s) not found: {missing}")
    if os.path.abspath(args.output) in {os.path.abspath(p) for p in args.inputs}:
        raise SystemExit(f"--output {args.output!r} is one of the --inputs; write the merge elsewhere")
    stats = merge_oid_submissions(args.inputs, args.output)
    for f in stats["per_file"]:
        print(f"{f['path']}: {f['num_rows']} images, {f['num_predictions']} predictions")
    print(f"-> {args.output}: {stats['num_images']} images, {stats['num_predictions']} predictions")
    return stats


if __name__ == "__main__":
    run_cli(main, get_args_parser())
