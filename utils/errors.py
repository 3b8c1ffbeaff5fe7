"""The project's own errors, and the top-level runner that shows them without a traceback.

A ``UserError`` is a problem with what the user gave us: bad data or annotations, bad options,
unreadable or missing files, checkpoints that do not fit. Scripts run ``main`` through ``run_cli``,
which prints the message and exits with status 2; any other exception is a bug and keeps its
traceback. ``UserError`` subclasses ``ValueError`` so that callers (and tests) that catch
``ValueError`` keep working.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

# Set FPN_TRACEBACK=1 to see the traceback of a UserError too (when debugging the project itself).
TRACEBACK_ENV = "FPN_TRACEBACK"


class UserError(ValueError):
    """Bad input: the message names the file, record or option and says what to do."""


class CheckpointError(UserError):
    """A checkpoint (or weights file) that is missing, unreadable, non-finite or does not fit."""


# Shown as a message: ours (ImageReadError among them), and files that are missing or of the wrong kind.
USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def run_cli(
    main: Callable[[argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse ``argv`` with ``parser`` and run ``main``; a user error becomes ``error: ...`` and exit 2."""
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        main(args)
    except USER_ERRORS as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        logging.shutdown()
        prog = os.path.basename(parser.prog or sys.argv[0])
        message = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else _os_message(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _os_message(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename!r}" if e.strerror else str(e)
