"""Training logs: smoothed values, one JSON line per log step, optional TensorBoard and visdom.

Progress goes to a tqdm bar when stderr is a terminal and to plain periodic lines otherwise, so
log files from batch jobs stay readable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict, deque
from typing import Dict

logger = logging.getLogger(__name__)


def setup_logging(rank: int = 0, log_file: str | None = None) -> None:
    """Plain-text logging on rank 0 (warnings only on other ranks), optionally also to a file."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


class SmoothedValue:
    """Tracks a series and gives its median/average over a window and its global average."""

    def __init__(self, window_size: int = 20):
        self.values: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.values) / max(len(self.values), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Windowed averages of named scalars (losses, lr, images/s)."""

    def __init__(self, window_size: int = 20):
        self.meters: Dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value))

    def averages(self) -> Dict[str, float]:
        return {name: meter.avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return "  ".join(f"{name} {meter.avg:.4f}" for name, meter in self.meters.items())


class JsonLinesWriter:
    """Appends one JSON object per call to ``<run_dir>/<name>``."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: Dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


class ScalarSinks:
    """TensorBoard (tensorboardX) and visdom, each only when asked for.

    visdom must never hang or kill a run: if no server is listening we warn once and go on without it.
    """

    def __init__(
        self,
        run_dir: str,
        tensorboard: bool = False,
        visdom: bool = False,
        vis_port: int = 8097,
        env: str = "main",
    ):
        self.tb = None
        self.vis = None
        self.env = env
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        if visdom:
            self.vis = _connect_visdom(vis_port, env)

    def add_scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
        if self.vis is not None:
            try:
                for name, value in values.items():
                    self.vis.line(
                        X=[step], Y=[value], win=name, env=self.env, update="append", opts={"title": name}
                    )
            except Exception as e:  # noqa: BLE001 - a dead visdom server must not stop training
                logger.warning("visdom logging failed (%s); disabling it for the rest of the run", e)
                self.vis = None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _connect_visdom(port: int, env: str):
    import socket

    # Probe the port first: visdom's client otherwise retries for a long time before giving up.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex(("localhost", port)) != 0:
            logger.warning(
                "--visdom: no visdom server on localhost:%d (start one with `python -m visdom.server "
                "-port %d`); continuing without visdom",
                port,
                port,
            )
            return None
    import visdom

    vis = visdom.Visdom(port=port, env=env, raise_exceptions=False)
    if not vis.check_connection(timeout_seconds=2):
        logger.warning("--visdom: server on port %d did not answer; continuing without visdom", port)
        return None
    return vis


class Progress:
    """A tqdm bar on a terminal, plain lines every ``print_every`` iterations otherwise."""

    def __init__(self, total: int, start: int = 0, print_every: int = 20, enabled: bool = True):
        self.total = total
        self.print_every = max(print_every, 1)
        self.enabled = enabled
        self.start_time = time.time()
        self.start = start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True)

    def update(self, iteration: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif iteration % self.print_every == 0 or iteration == self.total:
            done = iteration - self.start
            elapsed = time.time() - self.start_time
            eta = elapsed / max(done, 1) * (self.total - iteration)
            logger.info("iter %d/%d  %s  eta %s", iteration, self.total, text, _format_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
