"""One run, one folder: train.py's checks that two runs never share a run folder by accident.

* ``check_run_folder``: a folder whose ``args.json`` records other options is refused, naming the
  options that differ; so is starting afresh over a finished or interrupted run's checkpoints without
  ``--resume``. Options that do not change what is trained (FREE_OPTIONS: where data and logs go,
  workers, log and save steps, evaluation settings) may differ, and ``--max_iter`` may grow on resume.
* ``RunLock``: a lock file (``train.lock``, holding pid and host) so that two live runs cannot write
  one folder; the lock of a process that is gone (killed, machine rebooted) is taken over with a warning.
* ``report_resume_auto``: what ``--resume auto`` did when it found nothing to resume, and which other run
  folders of the same dataset and model it did not use (the derived name changes with the options).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import socket
import time
from typing import Any, Dict, List

from utils import distributed as dist_utils
from utils.checkpoint import STRUCTURAL_OPTIONS, args_to_dict, list_checkpoints
from utils.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

ARGS_FILE = "args.json"
LOCK_FILE = "train.lock"

# Options that may differ between the runs of one folder: they change where things are read or written,
# how fast, how often it is logged or saved, or how it is evaluated, not the weights that are trained.
FREE_OPTIONS = frozenset(
    {
        "resume",
        "run_name",
        "save_root",
        "data_root",
        "device",
        "compile",  # the same weights train eagerly or compiled (utils/compile.py)
        "compile_mode",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "dist_timeout",
        "skip_bad_images",
        "log_step",
        "save_step",
        "keep_checkpoints",
        "val_step",
        "val_sets",
        "val_metric",
        "no_val",
        "eval_batch_size",
        "conf_thresh",
        "nms_thresh",
        "pre_nms_topk",
        "topk",
        "class_agnostic_nms",
        "tensorboard",
        "visdom",
        "vis_port",
        "num_classes",  # set from the data, compared through the checkpoint's class names
    }
)
# On resume, the run may also be made longer (or shorter).
RESUME_FREE_OPTIONS = FREE_OPTIONS | {"max_iter"}


def option_differences(saved: Dict[str, Any], current: Dict[str, Any], ignore=frozenset()) -> List[str]:
    """``--name saved -> current`` for each option both dicts hold with different values."""
    return [
        f"--{key} {saved[key]} -> {current[key]}"
        for key in sorted(saved.keys() & current.keys())
        if key not in ignore and saved[key] != current[key]
    ]


def read_args_file(run_dir: str) -> Dict[str, Any] | None:
    """The options recorded in ``run_dir/args.json``, or None when there is none (or it is unreadable:
    a run killed while writing it)."""
    path = os.path.join(run_dir, ARGS_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring the unreadable %s: %s", path, e)
        return None
    return saved if isinstance(saved, dict) else None


def check_run_folder(run_dir: str, options: Dict[str, Any], resuming: bool) -> None:
    """UserError when ``run_dir`` belongs to another run: its args.json records other options, or it
    holds checkpoints and this run is not resuming them. ``options``: this run's (args_to_dict)."""
    saved = read_args_file(run_dir)
    if saved is not None:
        differences = option_differences(saved, options, RESUME_FREE_OPTIONS if resuming else FREE_OPTIONS)
        if differences:
            raise UserError(
                f"run folder {run_dir!r} holds a run with other options ({ARGS_FILE}: "
                f"{'; '.join(differences)}, as 'there -> here'): give --run_name NAME to start a "
                f"separate run{', or repeat its options to resume it' if resuming else ''}"
            )
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resuming:
        raise UserError(
            f"run folder {run_dir!r} already holds checkpoints ({os.path.basename(checkpoints[-1])} the "
            "newest): pass --resume auto to continue that run, or --run_name NAME to start another "
            "(starting afresh here would overwrite them)"
        )


def report_resume_auto(run_dir: str, save_root: str, options: Dict[str, Any]) -> str:
    """The one-line warning for ``--resume auto`` that found no checkpoint in ``run_dir`` (logged too).

    It names the other folders under ``save_root`` whose args.json has the same dataset, arch and
    basenet, with how their options differ: after an option change the derived run name changes, so
    these are the runs the user may have meant to resume.
    """
    key = ("dataset", "arch", "basenet")
    others = []
    for path in sorted(glob.glob(os.path.join(save_root, "*", ARGS_FILE))):
        folder = os.path.dirname(path)
        if os.path.abspath(folder) == os.path.abspath(run_dir):
            continue
        saved = read_args_file(folder)
        if saved is None or any(saved.get(k) != options.get(k) for k in key):
            continue
        differences = option_differences(saved, options, RESUME_FREE_OPTIONS)
        newest = list_checkpoints(folder)
        where = f"{os.path.basename(folder)} ({os.path.basename(newest[-1]) if newest else 'no checkpoint'}"
        others.append(where + (f"; differs: {', '.join(differences[:4])})" if differences else ")"))
    message = f"--resume auto: no checkpoint in {run_dir}; starting from iteration 0"
    if others:
        message += (
            f". Not used, of the same {'/'.join(str(options.get(k)) for k in key)}: "
            + "; ".join(others)
            + " (pass --run_name or --resume PATH to continue one of them)"
        )
    logger.warning("%s", message)
    return message


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """``run_dir/train.lock`` held while a run writes the folder; ``release`` removes it (idempotent).

    The file records pid and host. When it exists, a holder on this host whose process is gone is
    stale: the lock is taken over with a warning. A live holder, or one on another host (which cannot
    be checked from here), is refused with a UserError saying how to proceed.
    """

    def __init__(self) -> None:
        self.path: str | None = None

    def acquire(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, LOCK_FILE)
        for _attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing(path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
            self.path = path
            return
        raise UserError(f"could not take the lock {path!r}: another run took it at the same time")

    def _handle_existing(self, path: str) -> None:
        try:
            with open(path) as f:
                holder = json.load(f)
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - os.path.getmtime(path) < 10:  # being written by a run starting right now
                raise UserError(
                    f"run folder {os.path.dirname(path)!r} is being locked by another run"
                ) from None
            logger.warning("removing the unreadable lock file %s", path)
            os.remove(path)
            return
        if host == socket.gethostname() and not _pid_alive(pid):
            logger.warning("taking over %s: its process %d on %s is no longer running", path, pid, host)
            os.remove(path)
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise UserError(
            f"run folder {os.path.dirname(path)!r} is in use by process {pid} on {where} (lock file "
            f"{path!r}): wait for that run to end, or give --run_name NAME for another run"
            + ("; if that process is gone, delete the lock file" if host != socket.gethostname() else "")
        )

    def release(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path) as f:
                ours = json.load(f).get("pid") == os.getpid()
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours:
            os.remove(self.path)
        self.path = None


def prepare_run_folder(run_dir: str, args: argparse.Namespace, rank: int, run_lock: RunLock) -> None:
    """Rank 0 refuses a folder of another run and takes its lock; every rank raises the same error."""
    error = None
    if rank == 0:
        try:
            check_run_folder(run_dir, args_to_dict(args), resuming=args.resume is not None)
            run_lock.acquire(run_dir)
        except UserError as e:
            error = str(e)
    error = dist_utils.broadcast_object(error)
    if error:
        raise UserError(error)


# The options that decide the shapes of the weights, or which of them train (the optimizer's parameter
# groups): a checkpoint resumes only under the same values. They are the checkpoint's structural options
# less those that only say where the first weights and the anchors came from (the checkpoint holds both)
# or set the loss; derived, so an option added to STRUCTURAL_OPTIONS is checked on resume too.
_NOT_WEIGHT_SHAPES = (
    "pretrained",
    "anchor_file",
    "box_variances",
    "positive_threshold",
    "negative_threshold",
    "smooth_l1_beta",
    "focal_alpha",
    "focal_gamma",
    "neg_pos_ratio",
)
WEIGHT_OPTIONS = tuple(o for o in STRUCTURAL_OPTIONS if o not in _NOT_WEIGHT_SHAPES) + ("optimizer",)


def check_resume_fits(checkpoint: Dict[str, Any], path: str, args: argparse.Namespace) -> None:
    """UserError naming the options whose values differ from those the checkpoint's model was built with."""
    differences = option_differences(
        checkpoint["args"], args_to_dict(args), ignore=set(checkpoint["args"]) - set(WEIGHT_OPTIONS)
    )
    if differences:
        raise CheckpointError(
            f"--resume {path!r} was trained with other model options ({'; '.join(differences)}, as "
            "'checkpoint -> this command'): resume with the checkpoint's options, or give "
            "--run_name NAME without --resume to start a new run"
        )
