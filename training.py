"""train.py's loop, and the hooks that log, save and validate during it (the engine's training half).

``Trainer.run`` owns the loop, as detr's ``train_one_epoch`` does: batches from ``iterate_batches``
(epochs and the resume position), the --skip_bad_images accounting, ``engine.train_one_iter`` (AMP and
the grad scaler, clipping, the non-finite loss stop agreed across ranks), the lr schedule, the EMA
update, the loss terms averaged over ranks, the meters and the progress bar. After every step it calls
each hook's ``after_step`` in list order, and once the loop reaches ``max_iter`` each ``after_train``:

* ``MetricsLog``: a metrics.jsonl line (and TensorBoard / visdom scalars) every ``log_step`` and at
  the end, on rank 0; at the end, curves.png.
* ``CheckpointSaver``: every ``save_step`` and at the end, checks that the weights and optimizer state
  are finite on every rank, gathers every rank's generator states, writes on rank 0 and prunes old
  checkpoints; every rank stops on a failed save. ``load_training_state`` is its inverse.
* ``Validator``: every ``val_step`` and at the end, scores the weights (the EMA weights first, as
  ``val_ema_*``) over the ranks' shards of the val set and logs ``val_*`` (engine.metric_summary's keys).

Every rank runs the loop and every hook, since the hooks take part in collectives (the finite check,
the generator states, the save error, sharded validation); only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Sequence

import torch

from data.loaders import iterate_batches
from engine import evaluate, metric_summary, targets_to_device, train_one_iter
from layers.tta import FlipTTA
from utils import distributed as dist_utils
from utils.checkpoint import (
    NonFiniteWeightsError,
    non_finite_state,
    prune_checkpoints,
    save_checkpoint,
    state_dict_mismatch,
)
from utils.ema import ModelEMA
from utils.errors import CheckpointError
from utils.logger import JsonLinesWriter, MetricLogger, Progress, ScalarSinks, peak_memory_mib
from utils.plots import plot_run_curves

logger = logging.getLogger("train")  # train.py's: its log reads as one script's


class Hook:
    """Called by ``Trainer.run``: ``after_step`` after each step, ``after_train`` once at ``max_iter``.
    A hook reads the trainer's state (``iteration``, ``meters``, ``model_without_ddp``, ...)."""

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """The training loop. ``model`` is what the step runs (DDP-wrapped in a distributed run);
    ``model_without_ddp`` is the module whose weights are averaged (``ema``), saved and validated.
    ``loader`` yields ``(images, targets, skipped_files)`` (data.loaders.build_train_loader)."""

    def __init__(
        self,
        model: torch.nn.Module,
        criterion: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        loader: Any,
        device: torch.device,
        *,
        model_without_ddp: torch.nn.Module,
        class_names: Sequence[str],
        start_iter: int,
        max_iter: int,
        amp_dtype: torch.dtype | None = None,
        clip_grad: float = 0.0,
        ema: ModelEMA | None = None,
        skip_bad_images: bool = False,
        log_step: int = 20,
        hooks: Sequence[Hook | None] = (),
    ):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.scaler, self.loader, self.device = scaler, loader, device
        self.model_without_ddp, self.class_names = model_without_ddp, list(class_names)
        self.iteration, self.max_iter, self.log_step = start_iter, max_iter, log_step
        self.amp_dtype, self.clip_grad, self.ema = amp_dtype, clip_grad, ema
        self.skip_bad_images = skip_bad_images
        self.hooks = [hook for hook in hooks if hook is not None]  # in call order
        self.world_size = dist_utils.get_world_size()
        self.is_main = dist_utils.is_main_process()
        self.meters = MetricLogger(window_size=log_step)
        self.num_skipped = 0  # unreadable images the loader skipped (--skip_bad_images)
        self.num_dropped_for_sync = 0  # readable images left out because another rank's batch was empty
        self.num_cropped_out = 0  # boxes removed by random crops
        # What the sampler actually delivered, per class (images containing the class), for the log.
        self.images_per_class = torch.zeros(len(self.class_names), dtype=torch.int64)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def run(self) -> Dict[str, Any]:
        """Train from ``iteration`` to ``max_iter``. Returns ``iteration``, the image counts
        (``skipped_images``, ``dropped_for_sync_images``), ``boxes_cropped_out``, ``final_loss`` (averaged
        over the last ``log_step`` steps) and ``images_per_class`` (this rank's, by class name).

        Raises engine.NonFiniteLossError or utils.checkpoint.NonFiniteWeightsError on every rank when a
        loss or the state became non-finite (nothing is saved then), CheckpointError on a failed save.
        """
        progress = Progress(self.max_iter, self.iteration, self.log_step, enabled=self.is_main)
        try:
            self._loop(progress)
        finally:
            progress.close()
        for hook in self.hooks:
            hook.after_train(self)
        if self.num_skipped:
            logger.warning(
                "%d unreadable images were skipped during training (--skip_bad_images)", self.num_skipped
            )
        if self.num_dropped_for_sync:
            logger.warning(
                "%d readable images were not trained on because another process's batch was all unreadable",
                self.num_dropped_for_sync,
            )
        return {
            "iteration": self.iteration,
            "skipped_images": self.num_skipped,
            "dropped_for_sync_images": self.num_dropped_for_sync,
            "boxes_cropped_out": self.num_cropped_out,
            "final_loss": self.meters.averages().get("loss"),
            "images_per_class": dict(zip(self.class_names, self.images_per_class.tolist())),
        }

    def _loop(self, progress: Progress) -> None:
        last_time = time.time()
        for _epoch, (images, targets, skipped) in iterate_batches(self.loader, self.iteration):
            if self.iteration >= self.max_iter:
                break
            self.num_skipped += len(skipped)
            if self.world_size > 1 and self.skip_bad_images:
                # A process whose whole batch was unreadable cannot take the step; the others must skip
                # it too, or they would wait for its gradients forever. Their images are counted.
                if not dist_utils.all_true(len(targets) > 0, self.device):
                    self.num_dropped_for_sync += len(targets)
                    continue
            if len(targets) == 0:
                continue
            data_time = time.time() - last_time  # waiting for the loader (and the checks above)
            self.num_cropped_out += sum(int(t.get("num_cropped_out", 0)) for t in targets)
            for t in targets:
                present = t["labels"][t["labels"] >= 0].unique()
                self.images_per_class[present] += 1
            terms = self.step(
                images.to(self.device, non_blocking=True), targets_to_device(targets, self.device)
            )
            now = time.time()
            self.meters.update(
                **terms,
                images_per_s=len(targets) * self.world_size / max(now - last_time, 1e-9),
                data_time=data_time,
                compute_time=now - last_time - data_time,
            )
            last_time = now
            progress.update(self.iteration, f"{self.meters}  lr {self.lr:.2e}")
            for hook in self.hooks:
                hook.after_step(self)

    def step(self, images: torch.Tensor, targets: List[Dict[str, Any]]) -> Dict[str, float]:
        """One iteration: forward/backward/step, the lr schedule and the EMA. Returns the loss terms,
        averaged over the ranks in a distributed run (the log shows the mean, not rank 0's share)."""
        terms = train_one_iter(
            self.model,
            self.criterion,
            images,
            targets,
            self.optimizer,
            self.iteration,
            self.scaler,
            self.amp_dtype,
            self.clip_grad,
        )
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model_without_ddp)
        self.iteration += 1
        if self.world_size > 1:
            reduced = dist_utils.reduce_dict(
                {k: torch.tensor(v, device=self.device) for k, v in terms.items()}
            )
            terms = {k: float(v) for k, v in reduced.items()}
        return terms


class MetricsLog(Hook):
    """metrics.jsonl in the run folder, and TensorBoard / visdom when asked, written on rank 0 only;
    ``write`` takes other hooks' records too (validation)."""

    def __init__(
        self,
        run_dir: str,
        log_step: int,
        tensorboard: bool = False,
        visdom: bool = False,
        vis_port: int = 8097,
    ):
        self.run_dir, self.log_step = run_dir, log_step
        self.enabled = dist_utils.is_main_process()
        self.jsonl = JsonLinesWriter(os.path.join(run_dir, "metrics.jsonl")) if self.enabled else None
        self.sinks = (
            ScalarSinks(run_dir, tensorboard, visdom, vis_port, env=os.path.basename(run_dir))
            if self.enabled
            else None
        )

    def write(self, record: Dict[str, Any]) -> None:
        """One metrics.jsonl line; its values but the iteration as scalars at that iteration."""
        if not self.enabled:
            return
        self.jsonl.write(record)
        self.sinks.add_scalars({k: v for k, v in record.items() if k != "iteration"}, record["iteration"])

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iteration % self.log_step and trainer.iteration != trainer.max_iter:
            return
        mem = peak_memory_mib()
        self.write(
            {
                "iteration": trainer.iteration,
                "lr": trainer.lr,
                **trainer.meters.averages(),
                "skipped_images": trainer.num_skipped,
                "boxes_cropped_out": trainer.num_cropped_out,
                **({"max_mem_mib": mem} if mem is not None else {}),
            }
        )

    def after_train(self, trainer: Trainer) -> None:
        if self.enabled:
            self.sinks.close()
            plot_run_curves(self.run_dir)


def rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    """The state of torch's global generators this process draws from (CPU, and ``device``'s on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(
    rng_states: List[Dict[str, torch.Tensor]] | None, rank: int, world_size: int, device: torch.device
) -> None:
    """Set this rank's generators to their state at the checkpoint (saved by every rank)."""
    if rng_states is None or len(rng_states) != world_size:
        logger.warning(
            "random generators re-seeded from --man_seed, not restored: the checkpoint holds %s",
            "none" if rng_states is None else f"{len(rng_states)} processes' states, not {world_size}",
        )
        return
    torch.set_rng_state(rng_states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in rng_states[rank]:
        torch.cuda.set_rng_state(rng_states[rank]["cuda"], device)


def anchors_of(model: torch.nn.Module) -> List[List[List[float]]] | None:
    """The (w, h) anchors per level, for the checkpoint (None for architectures without our anchors)."""
    generator = getattr(model, "anchor_generator", None)
    if generator is None or not hasattr(generator, "anchor_whs_per_level"):
        return None
    return [w.tolist() for w in generator.anchor_whs_per_level()]


class CheckpointSaver(Hook):
    """``model_<iteration>.pth`` every ``save_step`` and at the end, never of a non-finite state; keeps
    the newest ``keep`` (0: all). ``extra``: what the checkpoint holds besides the training state (the
    options as a dict, class names, category ids). ``last_saved``: the checkpoint resumed from, if any."""

    def __init__(
        self, run_dir: str, save_step: int, keep: int, extra: Dict[str, Any], last_saved: str | None = None
    ):
        self.run_dir, self.save_step, self.keep, self.extra = run_dir, save_step, keep, extra
        self.last_saved = last_saved

    def state(self, trainer: Trainer) -> Dict[str, Any]:
        """What ``load_training_state`` restores, with the options and the anchors to rebuild the model."""
        model, ema = trainer.model_without_ddp, trainer.ema
        return {
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "iteration": trainer.iteration,
            **self.extra,
            "anchors": anchors_of(model),
            "model_ema": None if ema is None else ema.module.state_dict(),
            "ema_updates": None if ema is None else ema.updates,
        }

    def check_finite(self, trainer: Trainer) -> None:
        bad = non_finite_state(trainer.model_without_ddp, trainer.optimizer, trainer.device)
        if bad:
            raise NonFiniteWeightsError(trainer.iteration, bad, self.last_saved)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iteration % self.save_step and trainer.iteration != trainer.max_iter:
            return
        self.check_finite(trainer)
        rng_states = dist_utils.all_gather_object(rng_state(trainer.device))  # every rank's, for resume
        save_error = None
        if trainer.is_main:
            path = os.path.join(self.run_dir, f"model_{trainer.iteration:06d}.pth")
            try:
                save_checkpoint({**self.state(trainer), "rng_states": rng_states}, path)
                prune_checkpoints(self.run_dir, self.keep)
                self.last_saved = path
            except CheckpointError as e:
                save_error = str(e)
        save_error = dist_utils.broadcast_object(save_error)  # every rank stops on a failed save
        if save_error:
            raise CheckpointError(save_error)

    def after_train(self, trainer: Trainer) -> None:
        # The save at max_iter checked already; checked again so "done" never covers NaN weights.
        self.check_finite(trainer)


def load_training_state(
    checkpoint: Dict[str, Any],
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEMA | None = None,
) -> int:
    """Restore what ``CheckpointSaver`` saved (not the generators: ``restore_rng_state``, last).
    Returns the iteration to continue from. CheckpointError when the weights do not fit ``model``."""
    problem = state_dict_mismatch(model.state_dict(), checkpoint["model"])
    if problem:
        raise CheckpointError(f"--resume {path!r} does not fit the model of these options: {problem}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None:
        if checkpoint.get("model_ema") is None:
            raise SystemExit(f"--ema: the checkpoint {path!r} was trained without --ema")
        ema.load(checkpoint["model_ema"], checkpoint["ema_updates"])
    logger.info("resumed from %s at iteration %d", path, int(checkpoint["iteration"]))
    return int(checkpoint["iteration"])


class Validator(Hook):
    """Scores the weights every ``val_step`` (0: only at the end) and at the end: every rank runs its
    shard of ``loader`` (build_eval_loader's ``indices``) and rank 0 scores them all (engine.evaluate).
    Logs ``val_<key>`` of engine.metric_summary, ``val_ema_<key>`` for the EMA weights; ``last`` holds
    the latest."""

    def __init__(
        self,
        postprocessor: torch.nn.Module,
        loader: Any,
        dataset: Any,
        val_step: int,
        log: MetricsLog,
        metric: str = "voc",
        iou_thresh: float = 0.5,
        amp_dtype: torch.dtype | None = None,
        tta: str | None = None,
    ):
        self.postprocessor, self.loader, self.dataset = postprocessor, loader, dataset
        self.val_step, self.log = val_step, log
        self.metric, self.iou_thresh, self.amp_dtype, self.tta = metric, iou_thresh, amp_dtype, tta
        self.last: Dict[str, float] = {}

    def after_step(self, trainer: Trainer) -> None:
        if (
            self.val_step and trainer.iteration % self.val_step == 0
        ) or trainer.iteration == trainer.max_iter:
            self.last = self.validate(trainer)
            self.log.write({"iteration": trainer.iteration, **self.last})

    def validate(self, trainer: Trainer) -> Dict[str, float]:
        summary: Dict[str, float] = {}
        if trainer.ema is not None:  # the EMA weights first, under val_ema_*; then the trained weights
            summary = {
                k.replace("val_", "val_ema_", 1): v
                for k, v in self.validate_weights(trainer.ema.module, trainer).items()
            }
        return {**self.validate_weights(trainer.model_without_ddp, trainer), **summary}

    def validate_weights(self, net: torch.nn.Module, trainer: Trainer) -> Dict[str, float]:
        metrics, _ = evaluate(
            FlipTTA(net) if self.tta == "flip" else net,
            self.postprocessor,
            self.loader,
            self.dataset,
            trainer.device,
            self.metric,
            self.iou_thresh,
            amp_dtype=self.amp_dtype,
            sharded=True,
            progress=trainer.is_main,
        )
        if "voc" in metrics:
            logger.info("iteration %d validation:\n%s", trainer.iteration, metrics["voc"]["table"])
        if "oid" in metrics:
            logger.info(
                "iteration %d validation (Open Images metric):\n%s",
                trainer.iteration,
                metrics["oid"]["table"],
            )
        summary = metric_summary(metrics)  # evaluate.py's keys, prefixed val_ below
        if not summary.get("skipped_images"):  # the counts only when images were skipped
            summary.pop("num_images", None)
            summary.pop("skipped_images", None)
        return {f"val_{k}": v for k, v in summary.items()}
