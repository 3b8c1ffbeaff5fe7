import math
from collections import defaultdict

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from data.samplers import (
    ClassBalancedSampler,
    GroupedBatchSampler,
    RepeatFactorSampler,
    ShuffleSampler,
    create_aspect_ratio_groups,
    shard_indices,
)


def imbalanced_labels(num_images: int = 1000, seed: int = 0):
    """Class 0 in 90% of images, class 1 in 8%, class 2 in 2% (independently), the first 20 with no label."""
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(num_images):
        if i < 20:
            labels.append(np.zeros(0, np.int64))
            continue
        present = [c for c, p in enumerate((0.9, 0.08, 0.02)) if rng.random() < p]
        labels.append(np.array(present * 2, np.int64))  # duplicates, as several boxes of one class
    return labels


def class_draw_counts(indices, image_labels, num_classes=3):
    """How many drawn images contain each class."""
    counts = np.zeros(num_classes)
    for i in indices:
        counts[np.unique(image_labels[i])] += 1
    return counts


# ---------------------------------------------------------------- sharding / plain sampler


def test_shard_indices_pads_like_distributed_sampler():
    indices = np.arange(10)
    shards = [shard_indices(indices, 4, r) for r in range(4)]
    # Padded to 12 with indices 0, 1; strided shares.
    assert [s.tolist() for s in shards] == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]
    torch_shards = [
        list(DistributedSampler(range(10), num_replicas=4, rank=r, shuffle=False)) for r in range(4)
    ]
    assert [s.tolist() for s in shards] == torch_shards


@pytest.mark.parametrize("num_items", [10, 11])
def test_shuffle_sampler_two_ranks_disjoint_and_cover(num_items):
    ranks = [ShuffleSampler(num_items, seed=3, num_replicas=2, rank=r) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(num_items / 2)
    assert [len(s) for s in shares] == [len(ranks[0])] * 2
    assert set(shares[0]) | set(shares[1]) == set(range(num_items))
    if num_items % 2 == 0:
        assert not set(shares[0]) & set(shares[1])
    else:  # one padding index, repeated from the beginning of the epoch's permutation
        assert len(set(shares[0]) & set(shares[1])) == 1
    # Positions: interleaving the shards gives back the padded epoch permutation.
    full = ranks[0].epoch_indices()
    interleaved = np.stack(shares, axis=1).reshape(-1)
    assert interleaved.tolist() == np.resize(full, len(interleaved)).tolist()


def test_set_epoch_reshuffles_deterministically():
    a, b = ShuffleSampler(50, seed=1), ShuffleSampler(50, seed=1)
    first = list(a)
    assert sorted(first) == list(range(50))
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(second) == list(range(50))
    b.set_epoch(1)
    assert list(b) == second
    b.set_epoch(0)
    assert list(b) == first
    assert list(ShuffleSampler(50, seed=2)) != first
    assert list(ShuffleSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_defaults_without_process_group_and_bad_rank():
    s = ShuffleSampler(7)
    assert (s.num_replicas, s.rank) == (1, 0)
    with pytest.raises(ValueError, match="rank"):
        ShuffleSampler(7, num_replicas=2, rank=2)


# ---------------------------------------------------------------- class-balanced


def test_class_balanced_equalises_classes():
    labels = imbalanced_labels()
    sampler = ClassBalancedSampler(labels, num_bins=1, num_samples=3000, seed=0)
    unlabelled = {i for i, x in enumerate(labels) if len(x) == 0}
    assert len(unlabelled) >= 20 and sampler.num_unlabelled_images == len(unlabelled)
    assert len(sampler) == 3000
    drawn = list(sampler)
    assert not set(drawn) & unlabelled  # images without labels are never drawn
    # Each draw picks one class (1000 each, stratified) and an image containing it; class-0 images
    # often contain class 1 too, so measure the class the draw was made FOR: count how often each
    # rare-class image is drawn against the uniform-over-images rate.
    class_counts = sampler.class_image_counts
    assert class_counts.tolist() == [
        len([x for x in labels if 0 in x]),
        len([x for x in labels if 1 in x]),
        len([x for x in labels if 2 in x]),
    ]
    draws = class_draw_counts(drawn, labels)
    # Class 2 appears only in its own draws (1000) plus class-0/1 draws that happen to hit it:
    # expected 1000 + 1000 * P(2 | drawn for 0) + 1000 * P(2 | drawn for 1).
    p2_given = [np.mean([2 in labels[i] for i in range(len(labels)) if c in labels[i]]) for c in (0, 1)]
    expected_2 = 1000 + 1000 * sum(p2_given)
    assert abs(draws[2] - expected_2) < 0.1 * expected_2
    # Within class 2 the images are drawn uniformly: every class-2 image is hit.
    class2_images = [i for i in range(len(labels)) if 2 in labels[i]]
    assert set(class2_images) <= set(drawn)


def test_class_balanced_stratified_class_choice_exact():
    # Disjoint single-class images make the class of every draw observable.
    labels = (
        [np.array([0])] * 900 + [np.array([1])] * 80 + [np.array([2])] * 20 + [np.array([], np.int64)] * 5
    )
    sampler = ClassBalancedSampler(labels, num_bins=1, num_samples=3001, seed=5)
    counts = class_draw_counts(list(sampler), labels)
    assert sorted(counts.tolist()) == [1000, 1000, 1001]
    # Default num_samples = labelled images.
    assert len(ClassBalancedSampler(labels)) == 1000


def test_class_balanced_frequency_bins():
    # Classes 0..3 with 400, 300, 20, 10 single-class images; 2 bins -> {3, 2} (rare) and {1, 0} (frequent).
    sizes = (400, 300, 20, 10)
    labels = [np.array([c]) for c, n in enumerate(sizes) for _ in range(n)]
    sampler = ClassBalancedSampler(labels, num_bins=2, num_samples=4000, seed=0)
    assert [b.tolist() for b in sampler.bins] == [[3, 2], [1, 0]]
    counts = class_draw_counts(list(sampler), labels, num_classes=4)
    assert counts.tolist() == [1000, 1000, 1000, 1000]  # 2000 per bin, 1000 per class in the bin
    # With bins of unequal size the rule is bin-equal, then class-equal within the bin: 3 bins of
    # 4 classes -> [3], [2], [1, 0] (array_split puts the extra class in the first bin: [3, 2], [1], [0]).
    sampler3 = ClassBalancedSampler(labels, num_bins=3, num_samples=3000, seed=0)
    assert [b.tolist() for b in sampler3.bins] == [[3, 2], [1], [0]]
    counts3 = class_draw_counts(list(sampler3), labels, num_classes=4)
    assert counts3.tolist() == [1000, 1000, 500, 500]


def test_class_balanced_within_class_uniform_and_ranks():
    labels = [np.array([0])] * 10 + [np.array([1])] * 2
    samplers = [
        ClassBalancedSampler(labels, num_samples=20001, seed=1, num_replicas=2, rank=r) for r in range(2)
    ]
    shares = [list(s) for s in samplers]
    assert len(shares[0]) == len(shares[1]) == 10001
    epoch = samplers[0].epoch_indices()
    assert np.stack(shares, 1).reshape(-1).tolist() == np.resize(epoch, 20002).tolist()
    hist = np.bincount(epoch, minlength=12)
    # Class 0: 10000 draws over 10 images -> 1000 each; class 1: ~10001 over 2 -> ~5000 each.
    assert np.all(np.abs(hist[:10] - 1000) < 150)
    assert np.all(np.abs(hist[10:] - 5000) < 300)
    samplers[0].set_epoch(1)
    assert not np.array_equal(samplers[0].epoch_indices(), epoch)


def test_class_balanced_counts_ignores_and_rejects_unlabelled():
    labels = [np.array([-1]), np.array([0, -1]), np.array([2])]
    sampler = ClassBalancedSampler(labels, seed=0)
    assert sampler.num_unlabelled_images == 1
    assert sampler.empty_classes.tolist() == [1]
    assert set(sampler) == {1, 2}
    with pytest.raises(ValueError, match="label"):
        ClassBalancedSampler([np.array([], np.int64), np.array([-1])])


# ---------------------------------------------------------------- repeat factor


def test_repeat_factors_hand_computed():
    # 10 images: class 0 in all but the last, class 1 in images 0 and 1, class 2 in image 2 only.
    labels = [np.array([0, 1]), np.array([0, 1, 1]), np.array([0, 2])] + [np.array([0])] * 6 + [np.array([])]
    t = 0.3
    sampler = RepeatFactorSampler(labels, repeat_threshold=t, seed=0)
    # f = 0.9, 0.2, 0.1 -> r_c = max(1, sqrt(t / f)) = 1, sqrt(1.5), sqrt(3)
    r_c = [1.0, math.sqrt(1.5), math.sqrt(3)]
    np.testing.assert_allclose(sampler.class_repeat_factors, r_c)
    expected = np.array([r_c[1], r_c[1], r_c[2]] + [1.0] * 7)
    np.testing.assert_allclose(sampler.repeat_factors, expected)
    # Mean count per image over many epochs equals r_i (stochastic rounding is unbiased).
    num_epochs = 2000
    totals = np.zeros(10)
    lengths = set()
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        indices = sampler.epoch_indices()
        counts = np.bincount(indices, minlength=10)
        # Each image appears floor(r_i) or ceil(r_i) times.
        assert np.all((counts == np.floor(expected)) | (counts == np.ceil(expected)))
        totals += counts
        lengths.add(len(sampler))
    np.testing.assert_allclose(totals / num_epochs, expected, atol=0.04)
    assert len(lengths) > 1  # the epoch length varies


def test_repeat_factor_ranks_share_one_draw():
    labels = imbalanced_labels(200)
    for epoch in (0, 3):
        samplers = [
            RepeatFactorSampler(labels, repeat_threshold=0.1, seed=7, num_replicas=2, rank=r)
            for r in range(2)
        ]
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        assert len(shares[0]) == len(shares[1]) == len(samplers[0])
        epoch_draw = samplers[0].epoch_indices()
        assert np.array_equal(epoch_draw, samplers[1].epoch_indices())
        assert sorted(shares[0] + shares[1]) == sorted(np.resize(epoch_draw, 2 * len(shares[0])).tolist())


# ---------------------------------------------------------------- aspect-ratio groups


def test_create_aspect_ratio_groups():
    # (h, w): w/h = 0.4, 0.5, 0.7, 1, 1.3, 2, 3
    sizes = np.array([[100, 40], [100, 50], [100, 70], [100, 100], [100, 130], [100, 200], [100, 300]])
    # k=0: [<1, >=1]
    assert create_aspect_ratio_groups(sizes, k=0).tolist() == [0, 0, 0, 1, 1, 1, 1]
    # k=1: edges 0.5, 1, 2 -> groups 0..3 (bisect_right: a ratio equal to an edge goes above it)
    assert create_aspect_ratio_groups(sizes, k=1).tolist() == [0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="image_sizes"):
        create_aspect_ratio_groups(np.zeros((3, 3)))


def reference_grouped_batches(indices, group_ids, batch_size):
    """torchvision's GroupedBatchSampler.__iter__ (references/detection/group_by_aspect_ratio.py), with
    leftover ties broken by group id."""
    buffer_per_group, samples_per_group = defaultdict(list), defaultdict(list)
    batches = []
    for idx in indices:
        g = group_ids[idx]
        buffer_per_group[g].append(idx)
        samples_per_group[g].append(idx)
        if len(buffer_per_group[g]) == batch_size:
            batches.append(buffer_per_group.pop(g))
    remaining = len(indices) // batch_size - len(batches)
    for g in sorted(buffer_per_group, key=lambda g: (-len(buffer_per_group[g]), g))[:remaining]:
        need = batch_size - len(buffer_per_group[g])
        fill = (samples_per_group[g] * (need // len(samples_per_group[g]) + 1))[:need]
        batches.append(buffer_per_group[g] + fill)
    return batches


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_grouped_batch_sampler_matches_reference_and_is_homogeneous(batch_size):
    rng = np.random.default_rng(0)
    heights = rng.integers(50, 200, size=103)
    widths = rng.integers(50, 200, size=103)
    group_ids = create_aspect_ratio_groups(np.stack([heights, widths], 1), k=1)
    for rank in range(2):
        base = ShuffleSampler(103, seed=4, num_replicas=2, rank=rank)
        sampler = GroupedBatchSampler(base, group_ids, batch_size)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == len(base) // batch_size
            for batch in batches:
                assert len(batch) == batch_size
                assert len(set(group_ids[batch])) == 1
            assert batches == reference_grouped_batches(list(base), group_ids, batch_size)


def test_grouped_batch_sampler_small_group_is_repeated_and_epoch_forwarded():
    group_ids = np.array([0, 0, 0, 0, 0, 1])
    base = ShuffleSampler(6, shuffle=False)
    batches = list(GroupedBatchSampler(base, group_ids, 4))
    assert batches == [[0, 1, 2, 3]]  # 6 // 4 = 1 batch; leftovers dropped
    batches = list(GroupedBatchSampler(ShuffleSampler(6, shuffle=False), np.array([0, 0, 0, 1, 1, 1]), 2))
    # stream 0..5: [0,1] completes, [3,4] completes, then leftovers {0: [2], 1: [5]} -> one more batch
    # from group 0 (tie on size, lower id) filled with its earliest index.
    assert batches == [[0, 1], [3, 4], [2, 0]]
    base = RepeatFactorSampler(imbalanced_labels(100), repeat_threshold=0.2, seed=0)
    grouped = GroupedBatchSampler(base, np.zeros(100, np.int64), 8)
    grouped.set_epoch(5)
    assert base.epoch == 5 and len(grouped) == len(base) // 8


@pytest.mark.parametrize("threshold", [0.0, -0.1, float("nan"), float("inf")])
def test_repeat_threshold_must_be_finite_and_positive(threshold):
    labels = [np.array([0]), np.array([1])]
    with pytest.raises(ValueError, match="repeat_threshold must be finite and > 0"):
        RepeatFactorSampler(labels, repeat_threshold=threshold)
