import numpy as np
import torch

from data.loaders import build_eval_loader, build_train_loader, iterate_batches


class RecordingDataset(torch.utils.data.Dataset):
    """Returns a 4x4 image and a target that records the index and one draw of the seeded NumPy RNG."""

    def __init__(self, n):
        self.n = n
        self.image_sizes = np.full((n, 2), 4)
        self.image_labels = [np.array([i % 3]) for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        target = {
            "image_id": index,
            "draw": float(np.random.rand()),
            "size": torch.tensor([4, 4]),
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        return torch.zeros(3, 4, 4), target


def stream(loader, start_iter, count):
    out = []
    for _, (_, targets, _) in iterate_batches(loader, start_iter):
        out.append([(t["image_id"], t["draw"]) for t in targets])
        if len(out) == count:
            return out


def test_resumed_stream_equals_uninterrupted_stream():
    loader = build_train_loader(
        RecordingDataset(10), batch_size=3, num_workers=0, size_divisibility=1, seed=7
    )
    full = stream(loader, 0, 8)  # 3 batches per epoch: crosses two epoch boundaries
    assert stream(loader, 5, 3) == full[5:]
    # every epoch reshuffles: the first two epochs do not repeat the same order
    assert [i for b in full[:3] for i, _ in b] != [i for b in full[3:6] for i, _ in b]


def test_two_ranks_see_the_same_augmented_samples_as_one_process():
    dataset = RecordingDataset(16)
    single = stream(build_train_loader(dataset, 4, 0, 1, seed=3), 0, 4)
    ranks = [
        stream(build_train_loader(dataset, 2, 0, 1, seed=3, num_replicas=2, rank=r), 0, 4) for r in (0, 1)
    ]
    for b in range(4):
        assert sorted(single[b]) == sorted(ranks[0][b] + ranks[1][b])


def test_workers_do_not_change_the_stream():
    dataset = RecordingDataset(12)
    in_process = stream(build_train_loader(dataset, 4, 0, 1, seed=1), 0, 4)
    with_workers = stream(build_train_loader(dataset, 4, 2, 1, seed=1), 0, 4)
    assert in_process == with_workers


def test_loaders_leave_torch_global_generator_alone():
    """Training draws from torch's global generator (Faster R-CNN's sampling) and resume restores it
    from the checkpoint; starting a loader's epoch or a validation pass must not draw from it."""
    dataset = RecordingDataset(10)
    before = torch.get_rng_state()
    stream(build_train_loader(dataset, batch_size=3, num_workers=0, size_divisibility=1, seed=7), 0, 7)
    for _ in build_eval_loader(dataset, batch_size=4, num_workers=0, size_divisibility=1):
        pass
    assert torch.equal(torch.get_rng_state(), before)
