"""Training logs: smoothed values, one JSON line per log step, optional TensorBoard and visdom.

Progress goes to a tqdm bar when stderr is a terminal and to plain periodic lines otherwise, so
log files from batch jobs stay readable. While a bar is shown, log records go through tqdm
(``logging_redirect_tqdm``), so a log line never prints into the bar. Values are shown with 4
significant digits (``format_value``).

TensorBoard goes through tensorboardX, not ``torch.utils.tensorboard``: the latter imports the full
``tensorboard`` package (grpcio, werkzeug, markdown, absl, ...), tensorboardX needs only numpy,
packaging and protobuf, and both write the same event files. Tags are grouped ``train/...`` and
``val/...`` (``tensorboard_tag``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator

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
    """Tracks a series and gives its average over the last ``window_size`` values."""

    def __init__(self, window_size: int = 20):
        self.values: deque = deque(maxlen=window_size)

    def update(self, value: float) -> None:
        self.values.append(value)

    @property
    def avg(self) -> float:
        return sum(self.values) / max(len(self.values), 1)


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
        return "  ".join(f"{name} {format_value(meter.avg)}" for name, meter in self.meters.items())


def format_value(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits: 0.0123, 1.235, 1235, 1.235e+05, 2.5e-05."""
    return f"{value:.{digits}g}"


def peak_memory_mib() -> float | None:
    """Peak CUDA memory allocated by this process on the current device (MiB), None without CUDA use."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def tensorboard_tag(name: str) -> str:
    """Group scalars: ``val_map50_area`` -> ``val/map50_area``, ``loss`` -> ``train/loss``; a name that
    already has a group (``a/b``) is kept."""
    if "/" in name:
        return name
    if name.startswith("val_"):
        return "val/" + name[len("val_") :]
    return "train/" + name


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
                self.tb.add_scalar(tensorboard_tag(name), value, step)
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


class _BarOrLines:
    """A tqdm bar on a terminal (log records routed through tqdm meanwhile), else nothing."""

    def __init__(self, total: int, initial: int = 0, use_bar: bool | None = None, **tqdm_kwargs: Any):
        self.bar = None
        self._redirect = None
        if use_bar is None:
            use_bar = sys.stderr.isatty()
        if use_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, **tqdm_kwargs)
            # Our handlers write to stdout, which the bar (on stderr) shares on a terminal: route the root
            # logger's records through tqdm.write so they print above the bar, not into it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Progress(_BarOrLines):
    """Training progress: a tqdm bar on a terminal, plain lines every ``print_every`` iterations otherwise.

    The text given to ``update`` gets the peak CUDA memory appended when CUDA is in use.
    """

    def __init__(
        self,
        total: int,
        start: int = 0,
        print_every: int = 20,
        enabled: bool = True,
        use_bar: bool | None = None,
    ):
        self.total = total
        self.print_every = max(print_every, 1)
        self.enabled = enabled
        self.start_time = time.time()
        self.start = start
        super().__init__(total, initial=start, use_bar=use_bar if enabled else False)

    def update(self, iteration: int, text: str) -> None:
        if not self.enabled:
            return
        mem = peak_memory_mib()
        if mem is not None:
            text = f"{text}  max_mem {mem:.0f} MiB"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif iteration % self.print_every == 0 or iteration == self.total:
            done = iteration - self.start
            elapsed = time.time() - self.start_time
            eta = elapsed / max(done, 1) * (self.total - iteration)
            logger.info("iter %d/%d  %s  eta %s", iteration, self.total, text, _format_seconds(eta))


class ImageProgress(_BarOrLines):
    """Progress of inference over ``total`` images: images/s and ETA, on a tqdm bar on a terminal or as a
    plain log line every ``log_every_s`` seconds (and at the end) otherwise."""

    def __init__(
        self, total: int, desc: str = "inference", log_every_s: float = 30.0, use_bar: bool | None = None
    ):
        self.total = total
        self.desc = desc
        self.log_every_s = log_every_s
        self.done = 0
        self.start_time = time.time()
        self.last_log = self.start_time
        super().__init__(total, use_bar=use_bar, desc=desc, unit="img", leave=False)

    def update(self, num_images: int) -> None:
        self.done += num_images
        if self.bar is not None:
            self.bar.update(num_images)
            return
        now = time.time()
        if now - self.last_log >= self.log_every_s or self.done >= self.total:
            self.last_log = now
            logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc 120/4952 images  35.2 images/s  eta 0:02:17`` (``max_mem`` on CUDA)."""
        elapsed = (time.time() if now is None else now) - self.start_time
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        text = (
            f"{self.desc} {self.done}/{self.total} images  {format_value(rate, 3)} images/s  "
            f"eta {_format_seconds(max(eta, 0.0))}"
        )
        mem = peak_memory_mib()
        return text if mem is None else f"{text}  max_mem {mem:.0f} MiB"


def iterate_with_progress(data_loader: Iterable, desc: str = "inference") -> Iterator:
    """Yield the ``(images, targets, skipped)`` batches of an evaluation loader, counting their images
    (``len(targets) + len(skipped)``) on an ``ImageProgress`` over the images this process reads (its
    batch sampler's indices, a shard in a distributed evaluation; else the whole dataset)."""
    sampler = getattr(getattr(data_loader, "batch_sampler", None), "sampler", None)
    if sampler is None or not hasattr(sampler, "__len__"):
        sampler = getattr(data_loader, "dataset", ())
    total = len(sampler)
    progress = ImageProgress(total, desc=desc)
    try:
        for batch in data_loader:
            progress.update(len(batch[1]) + len(batch[2]))
            yield batch
    finally:
        progress.close()


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
