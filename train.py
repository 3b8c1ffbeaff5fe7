"""Train an FPN detector (single-stage FPN-OHEM by default, or Faster R-CNN FPN with --arch).

Run-book
--------
One process (GPU if present, else CPU)::

    python train.py --dataset voc --train_sets trainval2007,trainval2012 --val_sets test2007 \
        --basenet resnet50 --input_dim 600 --batch_size 24 --lr 0.0005 --max_iter 50000 \
        --step_values 30000,40000

Several GPUs on one node (DistributedDataParallel; ``--batch_size`` is per process)::

    torchrun --nproc_per_node 4 train.py --batch_size 6 ...

Several nodes: add torchrun's ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``.
Learning-rate rule: keep ``lr / total_batch`` constant, total_batch = batch_size * processes; the
original settings are lr 0.0005 at a total batch of 24 (scale linearly, with --warmup_iters for
large batches).

Compiled (``--compile``, utils/compile.py): the backbone, FPN and heads run through torch.compile; the
checkpoints are the same as without it, so a run may be resumed with or without ``--compile``.

Resume: ``--resume auto`` continues from the newest checkpoint of the run folder (or give a path);
the schedule, optimizer, scaler, data order, augmentation and every process's torch generators (which
Faster R-CNN's RPN and RoI sampling draw from) continue exactly where they stopped.

One run per folder (utils/run_folder.py): a folder whose args.json has other options, or that holds
checkpoints when --resume is not given, is refused; train.lock keeps a second live run out. Weights
and optimizer state are checked to be finite before every save, and a failed save leaves the earlier
checkpoints intact (utils/checkpoint.py).

This script builds the parts (datasets, loaders, model, DDP, optimizer, resume); the loop and its hooks
(metrics.jsonl, checkpoints, validation) are training.py's ``Trainer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Tuple

import torch

from data.checks import check_train_split, check_val_split
from data.dataset import build_dataset, check_same_classes
from data.image_check import check_dataset_images
from data.loaders import build_eval_loader, build_train_loader, loader_options
from engine import NonFiniteLossError
from models import build_model
from training import (
    CheckpointSaver,
    MetricsLog,
    Trainer,
    Validator,
    load_training_state,
    restore_rng_state,
)
from utils import distributed as dist_utils
from utils.checkpoint import (
    NonFiniteWeightsError,
    anchors_from_checkpoint,
    args_to_dict,
    load_checkpoint,
    load_newest_checkpoint,
)
from utils.compile import compile_network
from utils.ema import ModelEMA
from utils.errors import run_cli
from utils.init_from import check_resumable, init_model_from
from utils.launch import relaunch_with_torchrun
from utils.logger import setup_logging
from utils.options import (
    OptionParser,
    amp_dtype_of,
    check_common_args,
    get_common_parser,
    resolve_defaults,
    resolve_device,
    resume_checkpoint_path,
    run_folder,
)
from utils.run_folder import RunLock, check_resume_fits, prepare_run_folder, report_resume_auto

logger = logging.getLogger("train")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    # Every option of train.py is in the common parser (utils/options/), so that evaluate.py, demo.py
    # and extract_features.py accept a training command line (and its args.json as --config).
    parser = OptionParser(description=__doc__, add_help=add_help, parents=[get_common_parser()])
    return parser


def check_train_args(args: argparse.Namespace) -> None:
    errors: List[str] = []
    if args.max_iter <= 0:
        errors.append(f"--max_iter must be positive, got {args.max_iter}")
    if args.step_values != sorted(args.step_values) or any(
        s <= 0 or s > args.max_iter for s in args.step_values
    ):
        errors.append(
            f"--step_values {args.step_values} must be increasing and within 1..--max_iter ({args.max_iter})"
        )
    if args.batch_size <= 0 or args.lr <= 0:
        errors.append(f"--batch_size and --lr must be positive, got {args.batch_size} and {args.lr}")
    if args.warmup_iters < 0 or args.save_step <= 0 or args.log_step <= 0 or args.val_step < 0:
        errors.append("--warmup_iters/--val_step must be >= 0 and --save_step/--log_step > 0")
    if not 0 < args.repeat_threshold <= 1:
        errors.append(f"--repeat_threshold must be in (0, 1], got {args.repeat_threshold}")
    if args.num_bins < 1:
        errors.append(f"--num_bins must be >= 1, got {args.num_bins}")
    if args.resume not in (None, "auto") and not args.resume.isdigit() and not os.path.isfile(args.resume):
        errors.append(f"--resume {args.resume!r} does not exist (give a checkpoint path or 'auto')")
    on_cpu = (args.device or "").startswith("cpu") or (args.device is None and not torch.cuda.is_available())
    if args.amp_dtype == "fp16" and args.amp and on_cpu:
        errors.append("--amp --amp_dtype fp16 needs CUDA; use bf16 on the CPU")
    smallest_side = args.input_dim if args.resize_mode == "square" else args.min_size
    if args.amp and on_cpu and smallest_side <= 64:
        # oneDNN's bf16 weight gradient of a stride-2 3x3 conv over a 1x1 map (P7's conv when P6 is 1x1)
        # is garbage: NaN or ~1e37 in about half the calls, measured with torch 2.15 on a Xeon with AMX.
        errors.append(
            f"--amp on the CPU needs inputs larger than 64 px (got {smallest_side}): oneDNN's bf16 "
            "gradient of the P7 conv is wrong when P6 is 1x1; train in fp32 or at a larger size"
        )
    if errors:
        raise SystemExit("Bad options:\n  " + "\n  ".join(errors))


def lr_factor(
    iteration: int, warmup_iters: int, warmup_factor: float, step_values: List[int], gamma: float
) -> float:
    """Multiplier of the base lr at ``iteration``: linear warm-up, then steps of ``gamma``."""
    factor = gamma ** sum(iteration >= s for s in step_values)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD (or AdamW) with no weight decay on norm layers and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def check_images_exist(
    datasets: List[Any], skip_bad_images: bool, mode: str = "headers", num_workers: int = 0
) -> None:
    """Fail at start, naming the files, when annotated images are missing, unreadable or not of their
    annotated size (a bad val image would otherwise stop the run at its first validation); with
    --skip_bad_images, warn with the count. See data/image_check.py."""
    check_dataset_images(datasets, skip_bad_images, mode, num_workers)


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Train; the run folder's lock (see utils/run_folder.py) is released however training ends."""
    relaunch_with_torchrun(args)  # --ngpu N (the original's option): N processes under torchrun
    run_lock = RunLock()
    try:
        return run_training(args, run_lock)
    finally:
        run_lock.release()


def build_datasets(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The training set and the validation set (None with --no_val), checked: same classes, splits that
    fit, images present (check_images_exist), and the class hierarchy attached for --metric oid."""
    train_set = build_dataset(args, args.train_sets, train=True)
    args.num_classes = len(train_set.class_names)
    logger.info(
        "training on %s/%s: %d images, %d classes",
        args.dataset,
        args.train_sets,
        len(train_set),
        args.num_classes,
    )
    val_set = None if args.no_val else build_dataset(args, args.val_sets, train=False)
    if val_set is not None:
        try:
            check_same_classes(val_set, train_set.class_names, train_set.category_ids, "--train_sets")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    check_train_split(train_set)
    if val_set is not None:
        check_val_split(val_set, train_set)
    check_images_exist(
        [train_set] if val_set is None else [train_set, val_set],
        args.skip_bad_images,
        args.check_images,
        args.num_workers,
    )
    if val_set is not None and args.metric == "oid":
        hierarchy_path = os.path.join(args.data_root, args.dataset, "hierarchy.json")
        if not os.path.isfile(hierarchy_path):
            raise SystemExit(
                f"--metric oid needs the class hierarchy {hierarchy_path!r} (prep/openimages.py)"
            )
        with open(hierarchy_path) as f:
            val_set.hierarchy = json.load(f)
    return train_set, val_set


def checkpoint_to_resume(
    args: argparse.Namespace, run_dir: str, rank: int
) -> Tuple[str | None, Dict[str, Any] | None]:
    """(path, checkpoint) of --resume (auto: the run folder's newest), checked to fit these options;
    (None, None) when not resuming or --resume auto found nothing."""
    resume_path, checkpoint = None, None
    if args.resume == "auto":
        resume_path, checkpoint = load_newest_checkpoint(run_dir)
        if checkpoint is None and rank == 0:
            report_resume_auto(run_dir, args.save_root, args_to_dict(args))
    elif args.resume:  # a path, or an iteration of this run folder
        resume_path = resume_checkpoint_path(args.resume, run_dir)
        checkpoint = load_checkpoint(resume_path)
    if checkpoint is not None:
        check_resumable(checkpoint, resume_path)  # not a weights-only file (utils/init_from.py)
        check_resume_fits(checkpoint, resume_path, args)
    return resume_path, checkpoint


def build_train_model(
    args: argparse.Namespace,
    checkpoint: Dict[str, Any] | None,
    resume_path: str | None,
    device: torch.device,
    world_size: int,
) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(model, criterion, postprocessor) on ``device``: with the checkpoint's anchors when resuming (its
    weights are loaded with the optimizer's, by load_training_state), else with --init_from's weights or
    --pretrained's; channels_last and SyncBatchNorm as asked."""
    anchor_whs = anchors_from_checkpoint(checkpoint) if checkpoint is not None else None
    # The checkpoint holds every weight: build frozen as --pretrained implies, but read no weight file.
    model, criterion, postprocessor = build_model(
        args, anchor_whs_per_level=anchor_whs, load_pretrained=checkpoint is None and not args.init_from
    )
    if args.init_from and checkpoint is None:  # weights of a trained detector (utils/init_from.py)
        init_model_from(model, args.init_from)
    elif args.init_from:
        logger.info("--init_from %s not used: resuming from %s", args.init_from, resume_path)
    model.to(device)
    if args.channels_last:
        # Converting the weights is enough: convolutions propagate the weight's layout to their outputs.
        model.to(memory_format=torch.channels_last)
    criterion.to(device)
    postprocessor.to(device)
    if args.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        logger.warning("--sync_bn has no effect in a single process (launch with torchrun to use it)")
    return model, criterion, postprocessor


def build_loaders(
    args: argparse.Namespace, train_set: Any, val_set: Any, device: torch.device, rank: int, world_size: int
) -> Tuple[Any, Any]:
    """The training loader (this rank's share of the sampler's order) and the validation loader over
    this rank's block of the val set (None without a val set)."""
    train_loader = build_train_loader(
        train_set,
        args.batch_size,
        args.num_workers,
        size_divisibility=32 if args.resize_mode == "keep_aspect" else 1,
        seed=args.man_seed,
        num_replicas=world_size,
        rank=rank,
        sampler=args.sampler,
        num_bins=args.num_bins,
        repeat_threshold=args.repeat_threshold,
        aspect_ratio_group=args.aspect_ratio_group,
        **loader_options(args, device),
    )
    val_loader = None
    if val_set is not None:  # every rank validates its block of the val set; rank 0 scores them all
        val_loader = build_eval_loader(
            val_set,
            args.eval_batch_size,
            args.num_workers,
            size_divisibility=32 if args.resize_mode == "keep_aspect" else 1,
            indices=dist_utils.shard_range(len(val_set)) if world_size > 1 else None,
            **loader_options(args, device),
        )
    return train_loader, val_loader


def run_training(args: argparse.Namespace, run_lock: RunLock) -> Dict[str, Any]:
    resolve_defaults(args)
    check_common_args(args)
    check_train_args(args)
    device = resolve_device(args.device)
    dist_info = dist_utils.init_distributed(device, args.dist_timeout)
    rank, world_size = dist_info["rank"], dist_info["world_size"]
    if device.type == "cuda" and dist_utils.is_distributed():
        device = torch.device("cuda", dist_info["local_rank"])
    torch.manual_seed(args.man_seed + rank)

    run_dir = run_folder(args, dist_utils.get_world_size())
    prepare_run_folder(run_dir, args, rank, run_lock)
    setup_logging(rank, os.path.join(run_dir, "train.log"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_set, val_set = build_datasets(args)
    resume_path, checkpoint = checkpoint_to_resume(args, run_dir, rank)

    model, criterion, postprocessor = build_train_model(args, checkpoint, resume_path, device, world_size)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(it, args.warmup_iters, args.warmup_factor, args.step_values, args.gamma),
    )
    amp_dtype = amp_dtype_of(args, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, args.ema_decay, args.ema_tau) if args.ema else None
    start_iter = 0
    if checkpoint is not None:
        start_iter = load_training_state(checkpoint, resume_path, model, optimizer, scheduler, scaler, ema)

    model_without_ddp = model
    if dist_utils.is_distributed():  # under torchrun, one process included (as torchvision's reference)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        logger.info(
            "DistributedDataParallel over %d processes (%s backend)",
            world_size,
            torch.distributed.get_backend(),
        )
    if args.compile:  # in place, after the EMA's copy: the same parameters and state-dict keys
        compile_network(model_without_ddp, args.compile_mode)

    train_loader, val_loader = build_loaders(args, train_set, val_set, device, rank, world_size)

    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(args_to_dict(args), f, indent=2, sort_keys=True)
    log = MetricsLog(run_dir, args.log_step, args.tensorboard, args.visdom, args.vis_port)
    saved = {  # what a checkpoint holds besides the training state, to rebuild the model
        "args": args_to_dict(args),
        "class_names": list(train_set.class_names),
        "category_ids": [int(c) for c in train_set.category_ids],
    }
    saver = CheckpointSaver(run_dir, args.save_step, args.keep_checkpoints, saved, last_saved=resume_path)
    validator = None
    if val_loader is not None:
        validator = Validator(
            postprocessor,
            val_loader,
            val_set,
            args.val_step,
            log,
            args.metric,
            args.iou_thresh,
            amp_dtype,
            args.tta,
        )
    trainer = Trainer(
        model,
        criterion,
        optimizer,
        scheduler,
        scaler,
        train_loader,
        device,
        model_without_ddp=model_without_ddp,
        class_names=train_set.class_names,
        start_iter=start_iter,
        max_iter=args.max_iter,
        amp_dtype=amp_dtype,
        clip_grad=args.clip_grad,
        ema=ema,
        skip_bad_images=args.skip_bad_images,
        log_step=args.log_step,
        hooks=(log, saver, validator),
    )
    if checkpoint is not None:
        # Last, after everything that draws from torch's generators at start-up (weight init): the
        # random draws of training (Faster R-CNN's RPN/RoI sampling) continue as if never stopped.
        restore_rng_state(checkpoint.get("rng_states"), rank, world_size, device)
    try:
        summary = trainer.run()
    except (NonFiniteLossError, NonFiniteWeightsError) as e:
        logger.error("%s", e)
        dist_utils.cleanup()
        raise SystemExit(f"training stopped: {e}") from e
    logger.info(
        "done: %d iterations, %d boxes removed by random crops; run folder %s",
        summary["iteration"],
        summary.pop("boxes_cropped_out"),
        run_dir,
    )
    logger.info(
        "images per class delivered by the %s sampler (this rank): %s",
        args.sampler,
        summary["images_per_class"],
    )
    dist_utils.cleanup()
    return {"run_dir": run_dir, **summary, **(validator.last if validator is not None else {})}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
