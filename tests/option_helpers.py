"""Options for tests, made as the scripts make them: a script's real parser, then resolve_defaults."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any


def parse_options(*argv: str, script: str = "train", num_classes: int | None = None, **options: Any):
    """``script``'s parser on ``argv`` plus ``--key value`` for each keyword option (lists comma-joined,
    booleans as ``--key=True``), resolved by ``resolve_defaults`` as the script's main does, and
    ``num_classes`` set as the script sets it from the dataset."""
    from utils.options import resolve_defaults

    argv = list(argv)
    for key, value in options.items():
        if isinstance(value, bool):
            argv.append(f"--{key}={value}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", ",".join(str(v) for v in value)]
        else:
            argv += [f"--{key}", str(value)]
    args: argparse.Namespace = importlib.import_module(script).get_args_parser().parse_args(argv)
    resolve_defaults(args)
    if num_classes is not None:
        args.num_classes = num_classes
    return args


def parser_of(script: str, monkeypatch: Any = None) -> argparse.ArgumentParser:
    """``script``'s own parser (``script``.py's get_args_parser), with sys.argv set to it when given
    ``monkeypatch`` (the program name in --help comes from there)."""
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    return importlib.import_module(script).get_args_parser()
