import logging
import struct

import pytest

from utils.logger import (
    ImageProgress,
    MetricLogger,
    Progress,
    ScalarSinks,
    format_value,
    iterate_with_progress,
    tensorboard_tag,
)


def test_format_value_keeps_four_significant_digits():
    assert [format_value(v) for v in (0.012345, 1.23456, 1234.56, 123456.0, 2.5e-05, 3.0)] == [
        "0.01235",
        "1.235",
        "1235",
        "1.235e+05",
        "2.5e-05",
        "3",
    ]
    meters = MetricLogger()
    meters.update(loss=0.000123456, images_per_s=123.456)
    assert str(meters) == "loss 0.0001235  images_per_s 123.5"


def test_tensorboard_tags_are_grouped():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("lr") == "train/lr"
    assert tensorboard_tag("val_map50_area") == "val/map50_area"
    assert tensorboard_tag("val/coco_ap") == "val/coco_ap"


def read_event_tags(directory):
    """Scalar tags of tensorboardX event files (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    tags = []
    for path in directory.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            tags += [(v.tag, v.simple_value, event.step) for v in event.summary.value]
    return tags


def test_scalar_sinks_write_grouped_tensorboard_tags(tmp_path):
    sinks = ScalarSinks(str(tmp_path), tensorboard=True)
    sinks.add_scalars({"loss": 1.5, "lr": 0.01}, 10)
    sinks.add_scalars({"val_map50_area": 0.25}, 10)
    sinks.close()
    assert sorted(read_event_tags(tmp_path)) == [
        ("train/loss", 1.5, 10),
        ("train/lr", pytest.approx(0.01), 10),
        ("val/map50_area", 0.25, 10),
    ]


def test_bar_routes_log_records_through_tqdm_and_restores_handlers():
    from tqdm.contrib.logging import _TqdmLoggingHandler

    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(10, use_bar=True)
        assert any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)
        assert handler not in root.handlers  # the console handler would print into the bar
        progress.update(1, "loss 1.0")
        progress.close()
        assert handler in root.handlers
        assert not any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)
    finally:
        root.removeHandler(handler)


def test_plain_lines_show_images_per_second_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger="utils.logger"):
        progress = ImageProgress(10, desc="validation", log_every_s=0.0, use_bar=False)
        progress.update(4)
        progress.update(6)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("validation 4/10 images  ") and "images/s  eta " in lines[0]
    assert lines[1].startswith("validation 10/10 images") and lines[1].split("eta ")[1].startswith("0:00:00")


def test_plain_lines_are_periodic(caplog):
    with caplog.at_level(logging.INFO, logger="utils.logger"):
        progress = ImageProgress(100, log_every_s=3600.0, use_bar=False)
        for _ in range(10):
            progress.update(10)
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == [
        "inference 100/100 images"
    ]  # the end only


def test_iterate_with_progress_counts_skipped_images_too(caplog):
    batches = [(None, [1, 2], []), (None, [3], ["bad.jpg"])]

    class Loader(list):
        dataset = range(4)

    with caplog.at_level(logging.INFO, logger="utils.logger"):
        assert list(iterate_with_progress(Loader(batches))) == batches
    assert caplog.records[-1].getMessage().startswith("inference 4/4 images")
