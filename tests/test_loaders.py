import numpy as np
import pytest
import torch
from tiny_shapes import MODEL_OPTS, TRAIN_OPTS, make_tiny_shapes

import train
from data.dataset import build_dataset
from data.loaders import build_eval_loader, build_train_loader, iterate_batches, loader_options
from utils.errors import UserError
from utils.options import check_common_args, resolve_defaults


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


# * --pin_memory, --persistent_workers, --prefetch_factor


def parse(*argv):
    return train.get_args_parser().parse_args(list(argv))


def test_loader_options_default_to_todays_loaders():
    """No option given: pinned exactly when CUDA is used, fresh workers every epoch, 2 batches ahead."""
    args = parse()
    assert loader_options(args, torch.device("cpu")) == {
        "pin_memory": False,
        "persistent_workers": False,
        "prefetch_factor": None,
    }
    assert loader_options(args, torch.device("cuda"))["pin_memory"] is True
    for loader in (
        build_train_loader(RecordingDataset(6), 2, args.num_workers, 1, seed=0),
        build_eval_loader(RecordingDataset(6), 2, args.num_workers, 1),
    ):
        assert loader.pin_memory == torch.cuda.is_available()
        assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, False, 2)


@pytest.mark.parametrize("build", ["train", "eval"])
def test_loader_options_reach_the_dataloader(build):
    args = parse("-j", "1", "--pin_memory", "on", "--persistent_workers", "--prefetch_factor", "5")
    options = loader_options(args, torch.device("cpu"))
    if build == "train":
        loader = build_train_loader(RecordingDataset(6), 2, args.num_workers, 1, seed=0, **options)
    else:
        loader = build_eval_loader(RecordingDataset(6), 2, args.num_workers, 1, **options)
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (
        1,
        True,
        True,
        5,
    )
    off = loader_options(parse("--pin_memory", "off"), torch.device("cuda"))
    assert off["pin_memory"] is False


def test_train_py_builds_its_loaders_with_the_options(tmp_path, monkeypatch):
    """train.py hands the options to both of its loaders (stopped once they are built)."""
    root = make_tiny_shapes(str(tmp_path / "data"))
    built = {}

    class Built(Exception):
        pass

    def spy_train(*a, **kw):
        built["train"] = build_train_loader(*a, **kw)
        return built["train"]

    def spy_eval(*a, **kw):
        built["eval"] = build_eval_loader(*a, **kw)
        raise Built

    monkeypatch.setattr(train, "build_train_loader", spy_train)
    monkeypatch.setattr(train, "build_eval_loader", spy_eval)
    argv = MODEL_OPTS + TRAIN_OPTS + ["--data_root", root, "--save_root", str(tmp_path / "runs")]
    argv += ["-j", "2", "--pin_memory", "on", "--persistent_workers", "--prefetch_factor", "3"]
    with pytest.raises(Built):
        train.main(parse(*argv))
    for loader in built.values():
        assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (
            2,
            True,
            True,
            3,
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-j", "0", "--persistent_workers"], "--persistent_workers needs worker processes: give -j"),
        (["-j", "0", "--prefetch_factor", "2"], "--prefetch_factor needs worker processes: give -j"),
        (["--prefetch_factor", "0"], "--prefetch_factor must be >= 1, got 0"),
    ],
)
def test_bad_loader_options_fail_at_start(argv, message):
    args = resolve_defaults(parse(*argv))
    with pytest.raises(SystemExit, match=message):
        check_common_args(args)


def test_unknown_pin_memory_mode_fails_at_parse(capsys):
    with pytest.raises(SystemExit):
        parse("--pin_memory", "yes")
    assert "--pin_memory: invalid choice: 'yes'" in capsys.readouterr().err


def test_builders_refuse_worker_options_without_workers():
    with pytest.raises(UserError, match="need num_workers > 0"):
        build_train_loader(RecordingDataset(6), 2, 0, 1, seed=0, persistent_workers=True)
    with pytest.raises(UserError, match="need num_workers > 0"):
        build_eval_loader(RecordingDataset(6), 2, 0, 1, prefetch_factor=2)


def test_checkpoint_worker_options_meeting_j0_are_left_out():
    """evaluate.py merges a checkpoint's options with a typed -j 0: the worker options do not apply."""
    args = parse("-j", "2", "--persistent_workers", "--prefetch_factor", "3")
    args.num_workers = 0
    options = loader_options(args, torch.device("cpu"))
    assert (options["persistent_workers"], options["prefetch_factor"]) == (False, None)


def test_persistent_workers_give_the_same_stream():
    """ResumableBatchSampler runs in the main process, so persistent workers see set_epoch's epoch and
    skip: two epochs (and a resume in the middle of one) equal those of fresh workers."""
    dataset = RecordingDataset(10)  # 3 batches of 3 per epoch
    fresh = stream(build_train_loader(dataset, 3, 2, 1, seed=5), 0, 6)
    persistent = build_train_loader(dataset, 3, 2, 1, seed=5, persistent_workers=True, prefetch_factor=3)
    assert stream(persistent, 0, 6) == fresh
    assert stream(persistent, 4, 2) == fresh[4:]  # the same workers, resumed in epoch 1
    assert [i for b in fresh[:3] for i, _ in b] != [i for b in fresh[3:] for i, _ in b]


def test_persistent_workers_give_the_same_augmented_batches(tmp_path):
    """The real training set (SSD augmentation): two epochs of images and boxes, bit for bit."""
    root = make_tiny_shapes(str(tmp_path))
    dataset = build_dataset(parse("--data_root", root, "--input_dim", "64"), "train", train=True)

    def two_epochs(persistent):
        loader = build_train_loader(dataset, 4, 2, 1, seed=11, persistent_workers=persistent)
        batches = []
        for epoch, (images, targets, _) in iterate_batches(loader, 0):
            if epoch == 2:
                return batches
            batches.append((images, [(t["image_id"], t["boxes"], t["labels"]) for t in targets]))

    fresh, persistent = two_epochs(False), two_epochs(True)
    assert len(fresh) == len(persistent) == 8  # 16 images, batches of 4, two epochs
    for (images_f, targets_f), (images_p, targets_p) in zip(fresh, persistent):
        assert torch.equal(images_f, images_p)
        for (id_f, boxes_f, labels_f), (id_p, boxes_p, labels_p) in zip(targets_f, targets_p):
            assert id_f == id_p and torch.equal(boxes_f, boxes_p) and torch.equal(labels_f, labels_p)
    # epoch 1 is not epoch 0 again: the comparison covers two different epochs
    assert not torch.equal(fresh[0][0], fresh[4][0])
