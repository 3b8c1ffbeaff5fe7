"""The machinery under every script's parser: OptionParser, boolean options, help format, --config.

- ``OptionParser`` records which options were given (``args.explicit_options``), reads ``--config FILE``
  (a JSON object of option values, e.g. a run's ``args.json``) under the command line, shows defaults
  in ``--help`` and can hide option groups a script accepts but does not use.
- ``BoolAction``: a flag that also takes a value, so that both ``--visdom`` and the original
  codebase's ``--visdom=True`` (or ``=False``, ``=1``, ``=0``, ``yes``/``no``) parse.

``--config`` semantics: the file's values replace the parser defaults, the command line overrides
the file, and the file's options count as given (they are in ``explicit_options``: a config file is a
command line kept in a file, so its values win over a checkpoint's as typed ones do). Keys are option
names without dashes (argparse dests, as in ``args.json``). A key that is no option of the script is an
error naming the key and the file, except the few that runs record but that are not options
(``RUN_ONLY_KEYS``: ignored with a warning).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Sequence

logger = logging.getLogger(__name__)

# Keys that train.py writes into args.json and checkpoints but that are not options (set from the data
# or by the scripts themselves). --config ignores them, with a warning.
RUN_ONLY_KEYS = ("num_classes", "class_names", "category_ids", "explicit_options", "config", "world_size")
# Option names (dests) that were renamed: old args.json files and checkpoints still use the old name.
RENAMED_DESTS = {"val_metric": "metric"}

TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "f", "no", "n", "off")


def str2bool(text: str | bool | int) -> bool:
    """ "True"/"1"/"yes"/"on" -> True, "False"/"0"/"no"/"off" -> False (any case); anything else is an error.

    (The original's str2bool read any other word as False: ``--visdom=Flase`` silently turned visdom off.)
    """
    if isinstance(text, bool):
        return text
    if isinstance(text, int) and text in (0, 1):
        return bool(text)
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {text!r}")


class BoolAction(argparse.Action):
    """``--flag`` sets True; ``--flag=VALUE`` / ``--flag VALUE`` sets str2bool(VALUE).

    ``invert=True`` stores the negation (``--train_bn`` into ``freeze_bn``).
    """

    def __init__(self, option_strings, dest, default=False, invert=False, required=False, help=None):
        self.invert = invert
        super().__init__(
            option_strings,
            dest,
            nargs="?",
            const=True,
            default=default,
            type=str2bool,
            required=required,
            help=help,
            metavar="BOOL",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (not values) if self.invert else values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (lists as typed: 0.5,1,2), None and empty lists left out;
    description and epilog kept as written (the scripts' docstrings are run-books)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is argparse.SUPPRESS
            or default is None
            or default == []
            or not action.option_strings
        ):
            return text
        if isinstance(action, BoolAction) and action.invert:
            return text
        shown = ",".join(str(v) for v in default) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class OptionParser(argparse.ArgumentParser):
    """ArgumentParser that records the options given, reads --config, shows defaults and hides groups.

    ``parse_args`` sets ``args.explicit_options`` (sorted dests): the options typed on the command line
    plus those read from ``--config``. A checkpoint's options are overridden by these even when the value
    equals the parser default (e.g. ``--data_root datasets/`` for a checkpoint trained with
    ``/scratch/data``).

    Args (besides ArgumentParser's): ``hidden_groups`` (titles of option groups) and ``hidden_options``
    (dests): accepted but not listed by ``--help`` (demo.py does not list the training options it
    ignores). The first positional argument of ArgumentParser is ``prog``: pass the description as
    ``description=``.
    """

    _probing = False

    def __init__(
        self,
        *args: Any,
        hidden_groups: Sequence[str] = (),
        hidden_options: Sequence[str] = (),
        **kwargs: Any,
    ):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        hidden_names = []
        for group in self._action_groups:
            for action in group._group_actions:
                if group.title in hidden_groups or action.dest in hidden_options:
                    action.help = argparse.SUPPRESS
                    if group.title not in hidden_groups:
                        hidden_names.append(action.option_strings[0])
        if hidden_groups or hidden_names:
            listed = [f"the {', '.join(hidden_groups)} options"] if hidden_groups else []
            listed += [", ".join(hidden_names)] if hidden_names else []
            note = (
                "Also accepted but not listed here, so that a training command line works unchanged (see "
                f"train.py --help): {' and '.join(listed)}."
            )
            self.epilog = f"{self.epilog}\n\n{note}" if self.epilog else note

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        if self._probing:
            return super().parse_known_args(argv, namespace)
        config_path = _config_path(argv)
        config = self._read_config(config_path) if config_path else {}
        if namespace is None:
            namespace = argparse.Namespace()
        for key, value in config.items():
            if not hasattr(namespace, key):
                setattr(namespace, key, value)
        with self._not_required(config):
            parsed, extras = super().parse_known_args(argv, namespace)
            typed = self._given_dests(argv)
        parsed.explicit_options = sorted(typed | set(config))
        return parsed, extras

    def _not_required(self, config: Dict[str, Any]):
        """Options that the config file gives are not required on the command line."""
        parser = self

        class _Context:
            def __enter__(self):
                self.changed = [a for a in parser._actions if a.required and a.dest in config]
                for action in self.changed:
                    action.required = False

            def __exit__(self, *exc):
                for action in self.changed:
                    action.required = True

        return _Context()

    def _given_dests(self, argv: List[str]) -> set:
        # Parse again with every default suppressed: only what was given ends up in the namespace.
        defaults = [(action, action.default) for action in self._actions]
        parser_defaults = self._defaults  # from set_defaults(), applied whatever was typed
        self._probing, self._defaults = True, {}
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            probe, _ = super().parse_known_args(argv, argparse.Namespace())
        finally:
            for action, default in defaults:
                action.default = default
            self._probing, self._defaults = False, parser_defaults
        return set(vars(probe)) - {"config"}

    # --config ------------------------------------------------------------------------------------------

    def _read_config(self, path: str) -> Dict[str, Any]:
        """The option values of a JSON config file, converted and checked like typed values."""
        if not os.path.isfile(path):
            self.error(f"--config {path!r} does not exist")
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            self.error(f"--config {path!r} is not valid JSON: {e}")
        if not isinstance(raw, dict):
            self.error(f"--config {path!r} must hold a JSON object of option names and values")
        actions = self._actions_by_dest()
        config, ignored, unknown = {}, [], []
        for key, value in raw.items():
            dest = RENAMED_DESTS.get(key, key) if key not in actions else key
            if dest in actions:
                if dest in config and dest != key:  # the old name does not override the new one
                    continue
                config[dest] = self._convert(path, key, actions[dest], value)
            elif key in RUN_ONLY_KEYS:
                ignored.append(key)
            else:
                unknown.append(key)
        if unknown:
            self.error(
                f"--config {path!r}: {', '.join(repr(k) for k in unknown)} "
                f"{'is no option' if len(unknown) == 1 else 'are no options'} of {self.prog}"
            )
        ignored = [k for k in ignored if k not in ("config", "explicit_options")]
        if ignored:
            logger.warning(
                "--config %s: ignored %s (recorded by the run, not options)", path, ", ".join(ignored)
            )
        return config

    def _actions_by_dest(self) -> Dict[str, argparse.Action]:
        """dest -> the action whose type defines the value (the first one with an option string)."""
        out: Dict[str, argparse.Action] = {}
        for action in self._actions:
            if action.option_strings and action.dest not in ("help", "config"):
                out.setdefault(action.dest, action)
        return out

    def _convert(self, path: str, key: str, action: argparse.Action, value: Any) -> Any:
        def fail(message: str):
            self.error(f"--config {path!r}: {key}: {message}")

        if value is None:
            if action.default is not None:
                fail(f"null is not a value of {'/'.join(action.option_strings)}")
            return None
        is_flag = isinstance(action, (BoolAction, argparse._StoreTrueAction, argparse._StoreFalseAction))
        try:
            if is_flag:
                converted = str2bool(value)
            elif action.type in (None, str) and action.nargs in ("+", "*"):
                converted = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            elif isinstance(value, list):
                if action.type is None or getattr(action.type, "__name__", "") not in (
                    "float_list",
                    "int_list",
                ):
                    fail(f"a list is not a value of {'/'.join(action.option_strings)}")
                element = float if action.type.__name__ == "float_list" else int
                converted = [_number(element, v) for v in value]
            elif isinstance(value, str):
                converted = action.type(value) if action.type is not None else value
            elif action.type in (int, float):
                converted = _number(action.type, value)
            elif action.type is None or action.type is str:
                converted = str(value)
            else:
                converted = action.type(str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            fail(str(e))
        if action.choices is not None and converted not in action.choices:
            fail(f"{converted!r} is not one of {list(action.choices)}")
        return converted


def _number(kind: type, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    number = kind(value)
    if kind is int and isinstance(value, float) and value != number:
        raise ValueError(f"expected an integer, got {value!r}")
    return number


def _config_path(argv: Iterable[str]) -> str | None:
    """The value of the last --config on the command line (``--config F`` or ``--config=F``)."""
    path, tokens = None, list(argv)
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens):
            path = tokens[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    return path


def add_config_option(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="read option values from a JSON object (e.g. a run's args.json); options given on the "
        "command line override it, and the file's options count as given (they override a checkpoint's)",
    )
