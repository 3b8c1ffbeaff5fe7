"""data/image_check.py: every image's header at start, and train.py stopping before its first iteration."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from tiny_shapes import MODEL_OPTS, TRAIN_OPTS, make_tiny_shapes

import train
from data import image_check
from data.dataset import DetectionDataset
from data.image_check import MISSING, UNREADABLE, WRONG_SIZE, check_dataset_images, find_image_problems
from utils.errors import UserError

CATEGORIES = [{"id": 1, "name": "cat"}]


def _image(root, name, h, w):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "images", name))
    return f"images/{name}"


def _split(root, split, images):
    """``images``: (file_name, annotated height, annotated width); one box per image."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    coco = {
        "images": [
            {"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, h, w) in enumerate(images)
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}
            for i in range(len(images))
        ],
        "categories": CATEGORIES,
    }
    with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
        json.dump(coco, f)


@pytest.fixture
def bad_set(tmp_path):
    """Six images: good, missing, cut, empty, 20 x 30 shown as 30 x 20 (EXIF), 10 x 16 said 16 x 16."""
    root = str(tmp_path / "toy")
    good = _image(root, "good.jpg", 20, 30)
    cut = _image(root, "cut.jpg", 20, 30)
    with open(os.path.join(root, cut), "rb") as f:
        data = f.read()
    with open(os.path.join(root, cut), "wb") as f:
        f.write(data[: len(data) // 2])
    open(os.path.join(root, "images", "empty.png"), "wb").close()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 30 x 20 (h x w) where the file stores 20 x 30
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(
        os.path.join(root, "images", "turned.jpg"), exif=exif
    )
    small = _image(root, "small.png", 10, 16)
    _split(
        root,
        "train",
        [
            (good, 20, 30),
            ("images/gone.jpg", 20, 30),
            (cut, 20, 30),
            ("images/empty.png", 8, 8),
            ("images/turned.jpg", 20, 30),
            (small, 16, 16),
        ],
    )
    return root


EXPECTED = [
    ("gone.jpg", MISSING),
    ("cut.jpg", UNREADABLE),
    ("empty.png", UNREADABLE),
    ("turned.jpg", WRONG_SIZE),
    ("small.png", WRONG_SIZE),
]


def test_every_kind_of_bad_image_found_in_dataset_order(bad_set):
    dataset = DetectionDataset(bad_set, ["train"], None)
    problems = find_image_problems(dataset)
    assert [(os.path.basename(p.path), p.kind) for p in problems] == EXPECTED
    reasons = {os.path.basename(p.path): p.reason for p in problems}
    assert "truncated JPEG" in reasons["cut.jpg"] and "empty" in reasons["empty.png"]
    assert reasons["turned.jpg"] == (
        "the file is 20 x 30 (w x h), train.json say 30 x 20 (transposed: the annotations were made "
        "without applying the EXIF orientation)"
    )
    assert reasons["small.png"] == "the file is 16 x 10 (w x h), train.json say 16 x 16"
    # What the check finds is exactly what loading raises on.
    for i in range(len(dataset)):
        fails = any(p.path == dataset.image_path(i) for p in problems)
        if fails:
            with pytest.raises(UserError):
                dataset.load_image(i)
        else:
            dataset.load_image(i)
    assert [p.kind for p in find_image_problems(dataset, "exist")] == [MISSING]
    assert find_image_problems(dataset, "none") == []
    with pytest.raises(UserError, match="--check_images must be one of headers, exist, none"):
        find_image_problems(dataset, "all")


def test_one_error_lists_the_kinds_or_a_counted_warning(bad_set, caplog):
    dataset = DetectionDataset(bad_set, ["train"], None)
    with caplog.at_level(logging.WARNING, logger="data.image_check"):
        with pytest.raises(UserError) as e:
            check_dataset_images([dataset], skip_bad_images=False)
    message = str(e.value)
    assert "1 of 6 images of toy/train do not exist, e.g. " in message and "gone.jpg" in message
    assert (
        "2 of 6 images of toy/train cannot be read, e.g. " in message and "cut.jpg (truncated JPEG" in message
    )
    assert "2 of 6 images of toy/train are not of the size their annotations give" in message
    assert "--skip_bad_images" in message
    assert sum("toy/train: " in r.message for r in caplog.records) == 5  # every file in the log
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.image_check"):
        counts = check_dataset_images([dataset], skip_bad_images=True)
    assert counts == {"toy/train": 5}
    assert "they will be skipped and counted (--skip_bad_images)" in caplog.text


def test_header_reads_in_processes_give_the_same_answer(bad_set, monkeypatch):
    dataset = DetectionDataset(bad_set, ["train"], None)
    monkeypatch.setattr(image_check, "MIN_IMAGES_FOR_POOL", 1)
    monkeypatch.setattr(image_check, "_CHUNK", 2)
    problems = find_image_problems(dataset, num_workers=2)
    assert [(os.path.basename(p.path), p.kind) for p in problems] == EXPECTED


def _sharded_worker(rank, world_size, root, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        read = []
        original = image_check.read_image_sizes

        def spy(paths, num_workers=0):
            read.extend(os.path.basename(p) for p in paths)
            return original(paths, num_workers)

        image_check.read_image_sizes = spy
        problems = find_image_problems(DetectionDataset(root, ["train"], None))
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"read": read, "problems": [[os.path.basename(p.path), p.kind] for p in problems]}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_share_the_header_reads_and_all_see_every_problem(bad_set, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = (2, bad_set, str(tmp_path / "init"), str(out_dir))
    mp.start_processes(_sharded_worker, args=args, nprocs=2, start_method="fork")  # fork: no re-import
    results = [json.load(open(out_dir / f"{r}.json")) for r in range(2)]
    present = ["good.jpg", "cut.jpg", "empty.png", "turned.jpg", "small.png"]  # gone.jpg: from the listing
    assert results[0]["read"] == present[0::2] and results[1]["read"] == present[1::2]
    for r in results:
        assert [tuple(p) for p in r["problems"]] == EXPECTED


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def _train(data_root, save_root, *extra):
    argv = (
        MODEL_OPTS + TRAIN_OPTS + ["--data_root", data_root, "--save_root", str(save_root), "--run_name", "r"]
    )
    argv += ["--max_iter", "1", "--step_values", "1", *extra]
    return train.main(train.get_args_parser().parse_args(argv))


def test_train_stops_at_start_on_a_corrupt_val_image(shapes_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    val_image = root / "shapes" / "images" / "val" / "000003.png"
    data = val_image.read_bytes()
    val_image.write_bytes(data[: len(data) // 2])  # a cut download: its header still reads
    with pytest.raises(UserError, match=r"1 of 6 images of shapes/val cannot be read, e\.g\. .*000003\.png"):
        _train(str(root), tmp_path / "runs")
    assert not os.path.exists(tmp_path / "runs" / "r" / "metrics.jsonl")  # no iteration ran
    summary = _train(str(root), tmp_path / "runs", "--skip_bad_images")
    assert summary["iteration"] == 1
    with open(tmp_path / "runs" / "r" / "train.log") as f:
        log = f.read()
    assert "1 of 6 images of shapes/val cannot be read" in log and "skipped and counted" in log


def test_train_passes_check_images_and_workers_through(shapes_root, tmp_path, monkeypatch):
    seen = {}

    def fake_check(datasets, skip_bad_images, mode, num_workers):
        seen.update(splits=[d.splits for d in datasets], skip=skip_bad_images, mode=mode, workers=num_workers)
        raise KeyboardInterrupt  # stop before the model is built

    monkeypatch.setattr(train, "check_dataset_images", fake_check)
    with pytest.raises(KeyboardInterrupt):
        _train(shapes_root, tmp_path / "runs", "--check_images", "exist", "-j", "3")
    assert seen == {"splits": [["train"], ["val"]], "skip": False, "mode": "exist", "workers": 3}
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--check_images", "all"])
