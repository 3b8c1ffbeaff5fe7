"""DataLoaders for training (iteration-based, resumable, DDP-aware) and for evaluation.

Training draws batches epoch after epoch from one of the samplers in ``data/samplers.py``. Every
sample carries its own augmentation seed, a pure function of (seed, epoch, batch, position), so a
run resumed at iteration i sees exactly the batches and augmentations an uninterrupted run would,
whatever the number of workers.

The index samplers and ResumableBatchSampler run in the main process (the DataLoader sends each worker
the ``(index, seed)`` items of a batch), so ``set_epoch`` takes effect with persistent workers too:
a worker holds no epoch state, and ``--persistent_workers`` gives the same batches as fresh workers.
``loader_options`` turns ``--pin_memory``, ``--persistent_workers`` and ``--prefetch_factor`` into the
builders' keywords.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from data.collate import Collate
from data.samplers import (
    ClassBalancedSampler,
    GroupedBatchSampler,
    RepeatFactorSampler,
    ShuffleSampler,
    create_aspect_ratio_groups,
)
from utils.errors import UserError

logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 32-bit seed that depends only on where the sample sits in the epoch's stream."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Takes ``(index, seed)`` items; seeds NumPy and ``random`` before the wrapped dataset's transforms."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        np.random.seed(seed)
        random.seed(seed)
        return self.dataset[index]


class ResumableBatchSampler(Sampler):
    """Wraps a batch sampler: forwards ``set_epoch``, can skip the first batches of an epoch, and tags
    every index with its augmentation seed (see ``sample_seed``).

    The seed follows the sample's position in the global (all ranks) stream: rank r's j-th sample of
    its b-th batch is sample r + (b * batch_size + j) * num_replicas of the epoch, which is where the
    round-robin sharding of our samplers took it from. So N processes with batch B see the same
    augmented samples as one process with batch N * B.
    """

    def __init__(
        self, batch_sampler: Any, index_sampler: Any, seed: int, num_replicas: int = 1, rank: int = 0
    ):
        self.batch_sampler = batch_sampler
        self.index_sampler = index_sampler
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches
        if hasattr(self.index_sampler, "set_epoch"):
            self.index_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        position = 0  # samples of this rank already drawn in the epoch
        for b, batch in enumerate(self.batch_sampler):
            if b >= self.skip_batches:
                yield [
                    (
                        int(i),
                        sample_seed(self.seed, self.epoch, self.rank + (position + j) * self.num_replicas),
                    )
                    for j, i in enumerate(batch)
                ]
            position += len(batch)


def build_index_sampler(
    dataset: Any,
    sampler: str,
    seed: int,
    num_replicas: int,
    rank: int,
    num_bins: int = 1,
    repeat_threshold: float = 0.001,
) -> Any:
    """The per-rank index sampler named by ``--sampler``."""
    if sampler == "random":
        return ShuffleSampler(len(dataset), seed=seed, num_replicas=num_replicas, rank=rank)
    if sampler == "class_balanced":
        return ClassBalancedSampler(
            dataset.image_labels,
            num_bins=num_bins,
            num_samples=None,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
    if sampler == "repeat_factor":
        return RepeatFactorSampler(
            dataset.image_labels,
            repeat_threshold=repeat_threshold,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
    raise UserError(f"unknown --sampler {sampler!r} (random, class_balanced, repeat_factor)")


def loader_options(args: Any, device: torch.device) -> Dict[str, Any]:
    """``pin_memory``, ``persistent_workers`` and ``prefetch_factor`` for the builders below, from
    ``--pin_memory`` (auto: when ``device`` is CUDA), ``--persistent_workers`` and ``--prefetch_factor``
    with ``args.num_workers`` workers.

    The last two need workers. check_common_args refuses them with ``-j 0`` on the command line; a
    checkpoint's values (evaluate.py merges them) meeting a typed ``-j 0`` are left out with a log line.
    """
    persistent_workers = bool(args.persistent_workers)
    prefetch_factor = args.prefetch_factor
    if args.num_workers == 0 and (persistent_workers or prefetch_factor is not None):
        logger.info("-j 0: --persistent_workers and --prefetch_factor do not apply (no worker processes)")
        persistent_workers, prefetch_factor = False, None
    pin_memory = {"auto": device.type == "cuda", "on": True, "off": False}[args.pin_memory]
    return {
        "pin_memory": pin_memory,
        "persistent_workers": persistent_workers,
        "prefetch_factor": prefetch_factor,
    }


def _worker_options(
    num_workers: int, pin_memory: bool | None, persistent_workers: bool, prefetch_factor: int | None
) -> Dict[str, Any]:
    """The DataLoader keywords; ``pin_memory`` None: when CUDA is available (the builders' default)."""
    if num_workers == 0 and (persistent_workers or prefetch_factor is not None):
        raise UserError(
            "persistent_workers and prefetch_factor need num_workers > 0 "
            f"(got persistent_workers={persistent_workers}, prefetch_factor={prefetch_factor})"
        )
    if prefetch_factor is not None and prefetch_factor < 1:
        raise UserError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        "persistent_workers": persistent_workers,
        "prefetch_factor": prefetch_factor,
    }


def _worker_init(worker_id: int) -> None:
    # Samples are seeded one by one (SeededDataset); this only keeps stray RNG use distinct per worker.
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


def build_train_loader(
    dataset: Any,
    batch_size: int,
    num_workers: int,
    size_divisibility: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    sampler: str = "random",
    num_bins: int = 1,
    repeat_threshold: float = 0.001,
    aspect_ratio_group: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader whose ``batch_sampler`` is a ResumableBatchSampler; ``batch_size`` is per rank.

    ``pin_memory`` (None: when CUDA is available), ``persistent_workers`` and ``prefetch_factor`` (None:
    the DataLoader's default, 2 batches per worker) go to the DataLoader; see ``loader_options``.
    """
    index_sampler = build_index_sampler(
        dataset, sampler, seed, num_replicas, rank, num_bins, repeat_threshold
    )
    if aspect_ratio_group:
        group_ids = create_aspect_ratio_groups(dataset.image_sizes)
        batch_sampler = GroupedBatchSampler(index_sampler, group_ids, batch_size)
    else:
        batch_sampler = BatchSampler(index_sampler, batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise UserError(
            f"the training set gives no full batch of {batch_size} per rank "
            f"({len(dataset)} images, {num_replicas} ranks): lower --batch_size"
        )
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=ResumableBatchSampler(batch_sampler, index_sampler, seed, num_replicas, rank),
        collate_fn=Collate(size_divisibility),
        worker_init_fn=_worker_init,
        **_worker_options(num_workers, pin_memory, persistent_workers, prefetch_factor),
        # Own generator for the workers' base seed: without one, every epoch's iterator draws from torch's
        # global generator, which training's own random draws (Faster R-CNN sampling) then depend on.
        generator=torch.Generator().manual_seed(seed + rank),
    )


def iterate_batches(loader: DataLoader, start_iter: int) -> Iterator[Tuple[int, Any]]:
    """Endless (epoch, batch) stream that starts where iteration ``start_iter`` left off.

    Epoch lengths may change from epoch to epoch (repeat-factor sampling), so the resume point is
    found by walking the epochs and asking each one its length after ``set_epoch``.
    """
    batch_sampler: ResumableBatchSampler = loader.batch_sampler
    epoch, remaining = 0, start_iter
    while True:
        batch_sampler.set_epoch(epoch)
        if remaining < len(batch_sampler):
            break
        remaining -= len(batch_sampler)
        epoch += 1
    skip = remaining
    while True:
        batch_sampler.set_epoch(epoch, skip_batches=skip)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def build_eval_loader(
    dataset: Any,
    batch_size: int,
    num_workers: int,
    size_divisibility: int,
    indices: List[int] | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """Sequential, unshuffled batches for inference; the last three keywords as in build_train_loader.

    Persistent workers of a loader that train.py validates with stay alive between validations (they
    cost memory, not time, while idle).
    """
    sampler = SequentialSampler(range(len(dataset))) if indices is None else indices
    batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=Collate(size_divisibility),
        **_worker_options(num_workers, pin_memory, persistent_workers, prefetch_factor),
        generator=torch.Generator(),  # keeps validation from drawing from torch's global generator
    )
