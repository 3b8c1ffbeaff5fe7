"""Index samplers for iteration-based training, all DistributedDataParallel-aware.

Every sampler here yields dataset indices for ONE rank:

1. The whole epoch's draw is made from ``np.random.default_rng([seed, epoch])``, so it is the same on
   every rank (pass the same ``seed`` on all ranks; offsetting by rank is for augmentation seeds only).
2. It is padded by repeating its own beginning to a multiple of ``num_replicas``, exactly as
   ``torch.utils.data.DistributedSampler(drop_last=False)`` does.
3. Rank r takes positions r, r + num_replicas, r + 2 * num_replicas, ... of the padded draw. The
   shards are disjoint in positions and together cover the padded draw; ``len(sampler)`` is the
   per-rank length (equal on all ranks, so all ranks step the same number of batches).

``set_epoch(e)`` gives a new, reproducible draw. ``num_replicas`` / ``rank`` default to
``torch.distributed``'s when it is initialised, else 1 / 0.

Samplers:
  - ``ShuffleSampler``: a random permutation of all images per epoch.
  - ``ClassBalancedSampler``: frequency bins drawn equally, classes within a bin drawn equally, then an
    image containing the class drawn uniformly (as in the Open Images RetinaNet solution).
  - ``RepeatFactorSampler``: LVIS repeat-factor sampling with stochastic rounding (detectron2's
    ``RepeatFactorTrainingSampler``); the epoch length changes from epoch to epoch.
  - ``GroupedBatchSampler`` wraps any of them into batches of images of similar aspect ratio
    (torchvision's ``references/detection/group_by_aspect_ratio.py``), using
    ``create_aspect_ratio_groups``.

``image_labels`` (one int array per image, the training labels present in it, as
``DetectionDataset.image_labels``): negative labels (boxes outside a ``--classes`` subset, kept as
ignore regions) are not classes and are left out of the class statistics; duplicates are fine.
"""

from __future__ import annotations

import logging
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from utils.errors import UserError

logger = logging.getLogger(__name__)


def _replicas_and_rank(num_replicas: int | None, rank: int | None) -> Tuple[int, int]:
    """Fill in ``num_replicas`` / ``rank`` from torch.distributed when initialised, else 1 / 0."""
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1:
        raise UserError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise UserError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
    return int(num_replicas), int(rank)


def shard_indices(indices: np.ndarray, num_replicas: int, rank: int) -> np.ndarray:
    """Pad ``indices`` (int64[n], n >= 1) to a multiple of ``num_replicas`` by repeating its beginning
    (as DistributedSampler does) and return rank ``rank``'s strided share, int64[ceil(n / num_replicas)]."""
    n = len(indices)
    total = -(-n // num_replicas) * num_replicas
    if total > n:
        indices = np.resize(indices, total)  # np.resize repeats the array cyclically
    return indices[rank::num_replicas]


def _labels_table(image_labels: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Unique (image, label) pairs with label >= 0, as two int64 arrays, and the number of classes
    (max label + 1, 0 when there are no labels)."""
    num_images = len(image_labels)
    labels_per_image = [np.asarray(labels, dtype=np.int64).reshape(-1) for labels in image_labels]
    counts = np.array([len(labels) for labels in labels_per_image], dtype=np.int64)
    flat_labels = np.concatenate(labels_per_image) if num_images else np.zeros(0, np.int64)
    flat_images = np.repeat(np.arange(num_images, dtype=np.int64), counts)
    keep = flat_labels >= 0
    flat_images, flat_labels = flat_images[keep], flat_labels[keep]
    num_classes = int(flat_labels.max()) + 1 if len(flat_labels) else 0
    # One entry per (image, class): an image with three boxes of class c counts once for c.
    pairs = np.unique(flat_images * max(num_classes, 1) + flat_labels)
    return pairs // max(num_classes, 1), pairs % max(num_classes, 1), num_classes


class _EpochSampler(Sampler):
    """Base class: subclasses implement ``_draw(rng) -> int64[n]`` (the whole epoch, all ranks)."""

    def __init__(self, seed: int, num_replicas: int | None, rank: int | None):
        self.seed = int(seed)
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        self.epoch = 0
        self._cache: Tuple[int, np.ndarray] | None = None

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` / ``__len__`` use epoch ``epoch``'s draw."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch's draw before padding and sharding (int64[n], identical on all ranks)."""
        if self._cache is None or self._cache[0] != self.epoch:
            # A SeedSequence of (seed, epoch), not seed + epoch, so (seed 0, epoch 1) != (seed 1, epoch 0).
            indices = self._draw(np.random.default_rng([self.seed, self.epoch]))
            self._cache = (self.epoch, indices.astype(np.int64, copy=False))
        return self._cache[1]

    def rank_indices(self) -> np.ndarray:
        """This rank's share of the current epoch (int64[len(self)])."""
        return shard_indices(self.epoch_indices(), self.num_replicas, self.rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices().tolist())

    def __len__(self) -> int:
        return -(-len(self.epoch_indices()) // self.num_replicas)


class ShuffleSampler(_EpochSampler):
    """All ``num_items`` indices once per epoch, shuffled (or in order with ``shuffle=False``)."""

    def __init__(
        self,
        num_items: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if num_items < 1:
            raise UserError(f"ShuffleSampler needs at least one item, got num_items={num_items}")
        super().__init__(seed, num_replicas, rank)
        self.num_items = int(num_items)
        self.shuffle = shuffle

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)


class ClassBalancedSampler(_EpochSampler):
    """Frequency-binned class-balanced sampling.

    Classes are sorted by the number of images that contain them and split into ``num_bins`` bins
    holding (nearly) the same number of classes, rarest first. Each of the ``num_samples`` draws of an
    epoch picks a bin, then a class of that bin, then an image containing the class uniformly. Bins
    are drawn equally and so are the classes within a bin: the counts are stratified (they differ by
    at most one), only which bin / class gets the remainder and which image is drawn are random.
    ``num_bins=1`` is plain class-balanced sampling.

    Args:
        image_labels (list of int arrays): training labels present in each image (see module doc).
        num_bins (int): number of frequency bins (capped at the number of classes present).
        num_samples (int or None): draws per epoch over all ranks; default: the number of images with
            at least one label.
        seed, num_replicas, rank: see the module docstring.

    Attributes:
        class_image_counts (int64[K]): images containing each class.
        bins (list of int64 arrays): class ids per bin, rarest bin first.
        num_unlabelled_images (int): images with no label >= 0; never drawn.
        empty_classes (int64 array): classes below the largest label present in no image; never drawn.
    """

    def __init__(
        self,
        image_labels: Sequence[np.ndarray],
        num_bins: int = 1,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed, num_replicas, rank)
        if num_bins < 1:
            raise UserError(f"ClassBalancedSampler: num_bins must be >= 1, got {num_bins}")
        pair_images, pair_labels, num_classes = _labels_table(image_labels)
        if len(pair_images) == 0:
            raise UserError(f"ClassBalancedSampler: none of the {len(image_labels)} images has a label")
        # Images of each class as one CSR table: class c's images are
        # class_images[class_offsets[c]:class_offsets[c] + class_image_counts[c]].
        order = np.argsort(pair_labels, kind="stable")
        self.class_images = pair_images[order]
        self.class_image_counts = np.bincount(pair_labels, minlength=num_classes)
        self.class_offsets = np.concatenate([[0], np.cumsum(self.class_image_counts)[:-1]])
        self.num_labelled_images = len(np.unique(pair_images))
        self.num_unlabelled_images = len(image_labels) - self.num_labelled_images
        self.empty_classes = np.flatnonzero(self.class_image_counts == 0)
        present = np.flatnonzero(self.class_image_counts > 0)
        by_frequency = present[np.argsort(self.class_image_counts[present], kind="stable")]
        self.num_bins = min(num_bins, len(present))
        self.bins: List[np.ndarray] = [
            b.astype(np.int64) for b in np.array_split(by_frequency, self.num_bins)
        ]
        self.num_samples = self.num_labelled_images if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise UserError(f"ClassBalancedSampler: num_samples must be >= 1, got {num_samples}")
        if self.num_unlabelled_images or len(self.empty_classes):
            logger.warning(
                "ClassBalancedSampler never draws %d image(s) without labels and %d class(es) "
                "present in no image (%s)",
                self.num_unlabelled_images,
                len(self.empty_classes),
                self.empty_classes.tolist()[:20],
            )
        if self.num_bins < num_bins:
            logger.warning(
                "ClassBalancedSampler: %d bins asked for, only %d classes present: using %d bins",
                num_bins,
                len(present),
                self.num_bins,
            )

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        n = self.num_samples
        # Stratified bin choice: every bin gets n // B or n // B + 1 draws.
        bin_of_draw = rng.permutation(np.arange(n) % self.num_bins)
        classes = np.empty(n, dtype=np.int64)
        for b, bin_classes in enumerate(self.bins):
            slots = np.flatnonzero(bin_of_draw == b)
            # Stratified class choice within the bin, remainder to a random subset of its classes.
            classes[slots] = rng.permutation(bin_classes)[np.arange(len(slots)) % len(bin_classes)]
        within = np.floor(rng.random(n) * self.class_image_counts[classes]).astype(np.int64)
        return rng.permutation(self.class_images[self.class_offsets[classes] + within])


class RepeatFactorSampler(_EpochSampler):
    """LVIS repeat-factor sampling (Gupta et al. 2019; detectron2's RepeatFactorTrainingSampler).

    Class repeat factor r_c = max(1, sqrt(t / f_c)), with f_c the fraction of ALL images (labelled or
    not) that contain class c and t = ``repeat_threshold``; image repeat factor r_i = max of r_c over
    its classes (1 for an image with no label). Each epoch image i appears floor(r_i) times plus once
    more with probability r_i - floor(r_i) (stochastic rounding), then the draw is shuffled. The
    epoch length therefore varies from epoch to epoch; ``len()`` follows ``set_epoch``.

    Attributes:
        class_repeat_factors (float64[K]), repeat_factors (float64[M]).
    """

    def __init__(
        self,
        image_labels: Sequence[np.ndarray],
        repeat_threshold: float = 0.001,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed, num_replicas, rank)
        if len(image_labels) == 0:
            raise UserError("RepeatFactorSampler needs at least one image")
        if not repeat_threshold > 0 or repeat_threshold == float("inf"):  # NaN fails the comparison
            raise UserError(
                f"RepeatFactorSampler: repeat_threshold must be finite and > 0, got {repeat_threshold}"
            )
        self.repeat_threshold = float(repeat_threshold)
        pair_images, pair_labels, num_classes = _labels_table(image_labels)
        class_fraction = np.bincount(pair_labels, minlength=num_classes) / len(image_labels)
        with np.errstate(divide="ignore"):  # classes present in no image are never looked up below
            self.class_repeat_factors = np.maximum(1.0, np.sqrt(self.repeat_threshold / class_fraction))
        self.repeat_factors = np.ones(len(image_labels), dtype=np.float64)
        np.maximum.at(self.repeat_factors, pair_images, self.class_repeat_factors[pair_labels])

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        whole = np.floor(self.repeat_factors)
        repeats = (whole + (rng.random(len(whole)) < self.repeat_factors - whole)).astype(np.int64)
        return rng.permutation(np.repeat(np.arange(len(whole)), repeats))


def create_aspect_ratio_groups(image_sizes: np.ndarray, k: int = 3) -> np.ndarray:
    """Group id per image from its aspect ratio w / h (torchvision's ``create_aspect_ratio_groups``).

    With k > 0 the bin edges are 2 ** linspace(-1, 1, 2k + 1) (k = 3: 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2),
    giving 2k + 2 groups (below the first edge ... at or above the last); with k = 0 the only edge is 1:
    group 0 = portrait (w / h < 1), group 1 = landscape or square.

    Args:
        image_sizes (ndarray[M, 2]): (h, w) of each image, as ``DetectionDataset.image_sizes``.
    Returns:
        group_ids (int64[M])
    """
    image_sizes = np.asarray(image_sizes, dtype=np.float64)
    if image_sizes.ndim != 2 or image_sizes.shape[1] != 2:
        raise UserError(f"image_sizes must be an array [M, 2] of (h, w), got shape {image_sizes.shape}")
    if (image_sizes <= 0).any():
        bad = np.flatnonzero((image_sizes <= 0).any(axis=1))
        raise UserError(f"image_sizes has non-positive sizes at images {bad[:10].tolist()}")
    if k < 0:
        raise UserError(f"aspect-ratio group factor k must be >= 0, got {k}")
    edges = 2.0 ** np.linspace(-1, 1, 2 * k + 1) if k > 0 else np.array([1.0])
    aspect_ratios = image_sizes[:, 1] / image_sizes[:, 0]
    group_ids = np.digitize(aspect_ratios, edges).astype(np.int64)  # same as bisect_right per value
    logger.info(
        "aspect-ratio group edges %s, images per group %s",
        np.round(edges, 3).tolist(),
        np.bincount(group_ids, minlength=len(edges) + 1).tolist(),
    )
    return group_ids


class GroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` indices that all share one group id (torchvision's GroupedBatchSampler).

    The wrapped sampler's indices are streamed into one buffer per group; a batch is emitted when its
    buffer fills, so batches come out in the order they complete. There are exactly
    ``len(sampler) // batch_size`` batches per epoch: when the stream ends with fewer full batches,
    the fullest leftover buffers are completed with their group's earliest indices of the epoch
    (repeated when the group is small), the rest of the leftovers are dropped. Works on top of any
    of the samplers above, hence under DDP; ``set_epoch`` is forwarded.

    Args:
        sampler: yields dataset indices (for this rank).
        group_ids (int array[M]): group of each dataset index, e.g. from ``create_aspect_ratio_groups``.
        batch_size (int): indices per batch.
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def batches(self) -> List[np.ndarray]:
        """This epoch's batches, each int64[batch_size]."""
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        num_batches = len(indices) // self.batch_size
        if num_batches == 0:
            return []
        bs = self.batch_size
        groups = self.group_ids[indices]
        # Stream positions sorted by group, stream order kept within a group.
        order = np.argsort(groups, kind="stable")
        group_values, group_starts, group_counts = np.unique(
            groups[order], return_index=True, return_counts=True
        )
        rank_in_group = np.arange(len(order)) - np.repeat(group_starts, group_counts)
        num_full_per_group = group_counts // bs
        in_full = rank_in_group < np.repeat(num_full_per_group * bs, group_counts)
        full_positions = order[in_full].reshape(-1, bs)  # [num_full, bs] stream positions, per group
        # A batch completes at the stream position of its last member; emit in completion order.
        full_positions = full_positions[np.argsort(full_positions[:, -1], kind="stable")]
        batches = list(indices[full_positions])
        num_missing = num_batches - len(batches)
        if num_missing > 0:
            leftover_sizes = group_counts - num_full_per_group * bs
            # Fullest leftover buffer first; ties by group id (deterministic).
            for g in np.lexsort((group_values, -leftover_sizes))[:num_missing]:
                start, count, left = group_starts[g], group_counts[g], leftover_sizes[g]
                group_positions = order[start : start + count]
                fill = np.resize(group_positions, bs - left)  # earliest of the group, cycled if needed
                batches.append(indices[np.concatenate([group_positions[count - left :], fill])])
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.batches():
            yield batch.tolist()
