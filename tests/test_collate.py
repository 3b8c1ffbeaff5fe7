import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from data.collate import UNNAMED_SAMPLE, Collate, SkippedSample


def sample(h, w, value, name="x.jpg"):
    image = torch.full((3, h, w), float(value))
    return image, {"size": torch.tensor([h, w]), "file_name": name, "boxes": torch.zeros(0, 4)}


def test_pads_to_multiple_of_32_with_zeros_and_keeps_sizes():
    images, targets, skipped = Collate(32)([sample(100, 70, 1.0, "a"), sample(64, 130, 2.0, "b")])
    # max H 100 -> 128, max W 130 -> 160
    assert images.shape == (2, 3, 128, 160)
    assert skipped == []
    assert (images[0, :, :100, :70] == 1).all() and (images[1, :, :64, :130] == 2).all()
    mask = torch.ones(128, 160, dtype=torch.bool)
    mask[:100, :70] = False
    assert (images[0][:, mask] == 0).all()
    mask = torch.ones(128, 160, dtype=torch.bool)
    mask[:64, :130] = False
    assert (images[1][:, mask] == 0).all()
    assert [t["size"].tolist() for t in targets] == [[100, 70], [64, 130]]
    assert [t["file_name"] for t in targets] == ["a", "b"]


def test_exact_multiple_is_not_padded_further():
    images, _, _ = Collate(32)([sample(64, 96, 1.0)])
    assert images.shape == (1, 3, 64, 96)


def test_no_padding_with_divisibility_1_and_equal_sizes():
    first, second = sample(37, 53, 1.0), sample(37, 53, 3.0)
    images, _, _ = Collate(1)([first, second])
    assert images.shape == (2, 3, 37, 53)
    torch.testing.assert_close(images, torch.stack([first[0], second[0]]))


def test_skipped_samples_dropped_and_reported():
    batch = [SkippedSample("images/bad.jpg", "truncated"), sample(10, 10, 1.0, "ok"), None]
    images, targets, skipped = Collate(32)(batch)
    assert images.shape == (1, 3, 32, 32)
    assert [t["file_name"] for t in targets] == ["ok"]
    assert skipped == ["images/bad.jpg", UNNAMED_SAMPLE]
    images, targets, skipped = Collate(32)([SkippedSample("a.jpg"), SkippedSample("b.jpg")])
    assert images.shape == (0, 3, 0, 0) and targets == [] and skipped == ["a.jpg", "b.jpg"]


def test_invalid_divisibility():
    with pytest.raises(ValueError, match="size_divisibility"):
        Collate(0)


class _ToyDataset(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return SkippedSample(f"bad{i}.jpg", "corrupt") if i % 2 else sample(8 + i, 9, float(i), f"ok{i}")


def test_picklable_and_works_in_worker_processes():
    collate = pickle.loads(pickle.dumps(Collate(16)))
    marker = pickle.loads(pickle.dumps(SkippedSample("a.jpg", "why")))
    assert collate.size_divisibility == 16 and (marker.file_name, marker.reason) == ("a.jpg", "why")
    loader = DataLoader(
        _ToyDataset(), batch_size=4, num_workers=1, collate_fn=collate, multiprocessing_context="spawn"
    )
    images, targets, skipped = next(iter(loader))
    assert images.shape == (2, 3, 16, 16)
    assert [t["file_name"] for t in targets] == ["ok0", "ok2"] and skipped == ["bad1.jpg", "bad3.jpg"]
