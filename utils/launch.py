"""``--ngpu N`` (the original codebase's option): train.py starts N processes with torchrun.

The original ran one process and split each batch of ``--batch_size`` images over N GPUs with
DataParallel. Here one process drives one GPU (DistributedDataParallel, launched by torchrun) and
``--batch_size`` is per process, so ``--ngpu N`` re-executes the same command line as

    python -m torch.distributed.run --standalone --nproc_per_node N train.py <argv> --ngpu 1 \\
        --batch_size <batch_size / N>

which trains with the same total batch (and lr rule, and run folder name) as the original's command.
The command is printed first. Under torchrun already, ``--ngpu`` must equal the processes per node.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import List, Sequence

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)


def torchrun_command(script: str, argv: Sequence[str], ngpu: int, batch_size: int) -> List[str]:
    """The command that runs ``script argv`` in ``ngpu`` processes with the same total batch.

    The last occurrence of an option wins in argparse, so ``--ngpu 1 --batch_size B/N`` are appended
    rather than edited into ``argv`` (which may spell them ``--ngpu=2``, ``--ngpu 2`` or in a --config).
    """
    if ngpu < 2:
        raise UserError(f"--ngpu {ngpu}: a torchrun launch needs 2 or more processes")
    if batch_size % ngpu:
        raise UserError(
            f"--batch_size {batch_size} does not split evenly over --ngpu {ngpu} processes (as the "
            f"original's DataParallel split it): give a multiple of {ngpu}"
        )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ngpu),
        script,
        *argv,
        "--ngpu",
        "1",
        "--batch_size",
        str(batch_size // ngpu),
    ]


def relaunch_with_torchrun(
    args: argparse.Namespace, argv: Sequence[str] | None = None, script: str | None = None
) -> None:
    """With ``--ngpu N > 1`` outside torchrun, replace this process by torchrun's (never returns).

    ``argv`` / ``script`` default to ``sys.argv``. Does nothing for ``--ngpu 1``. Under torchrun
    (LOCAL_WORLD_SIZE set) checks that N equals its processes per node. GPUs: with ``--device cpu``
    the processes run on the CPU (gloo); otherwise N visible GPUs are needed.
    """
    ngpu = int(args.ngpu or 1)
    if ngpu < 1:
        raise UserError(f"--ngpu must be >= 1, got {ngpu}")
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world_size is not None:
        if ngpu > 1 and ngpu != int(local_world_size):
            raise UserError(
                f"--ngpu {ngpu} under torchrun with {local_world_size} processes per node: drop --ngpu "
                "(torchrun's --nproc_per_node sets the processes)"
            )
        return
    if ngpu == 1:
        return
    on_cpu = (args.device or "").startswith("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not on_cpu and visible < ngpu:
        raise UserError(
            f"--ngpu {ngpu} needs {ngpu} GPUs, {visible} visible (CUDA_VISIBLE_DEVICES); "
            "with --device cpu it starts CPU processes"
        )
    command = torchrun_command(
        script or sys.argv[0], list(sys.argv[1:] if argv is None else argv), ngpu, args.batch_size
    )
    print(
        f"--ngpu {ngpu}: starting {ngpu} processes of --batch_size {args.batch_size // ngpu} each "
        f"(total {args.batch_size}, as the original's DataParallel) with:\n  {shlex.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os.execv(command[0], command)
