"""bench/loss_memory.py's CPU peak-memory measurement against hand-computed allocations, and the split
bench_components modules wired together."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_components  # noqa: E402
import loss_memory  # noqa: E402

MIB = 2**20


def test_peak_counts_what_is_live_at_once():
    def fn():
        a = torch.ones(MIB // 4)  # 1 MiB
        b = torch.ones(2 * MIB // 4)  # 2 MiB: 3 MiB live
        del a  # 2 MiB live
        c = torch.ones(MIB // 4)  # 3 MiB live again, not 4
        d = torch.ones(8 * MIB // 4)  # 11 MiB live: the peak
        del b, c, d
        return torch.ones(MIB // 4)  # 1 MiB

    peak = loss_memory.peak_allocated_bytes_cpu(fn)
    assert 11 * MIB <= peak < 11 * MIB + 4096, peak


def test_peak_leaves_out_what_existed_before_the_call():
    existing = torch.ones(16 * MIB // 4)
    peak = loss_memory.peak_allocated_bytes_cpu(lambda: existing.mul(2))  # one 16 MiB output
    assert 16 * MIB <= peak < 16 * MIB + 4096, peak
    assert loss_memory.peak_allocated_bytes_cpu(lambda: existing.mul_(2)) < 4096  # in place: nothing new


def test_peak_memory_reports_each_side_on_cpu():
    args = argparse.Namespace(batch_size=1, input_dim=256, num_classes=21, seed=0)
    report = loss_memory.peak_memory(args, torch.device("cpu"))
    assert set(report) == {f"peak_mb_loss_{side}" for side in loss_memory.SIDES}
    # every side allocates at least the logits' gradient (1 image, 256 px: 12,276 anchors, 21 columns,
    # float32: 0.98 MiB) and, on this small batch, well under a gigabyte (the process's RSS is more)
    num_anchors = loss_memory.loss_inputs(1, 256, 21, 0, torch.device("cpu"))[0].shape[0]
    assert all(num_anchors * 21 * 4 / MIB - 0.05 <= value < 200 for value in report.values()), report


def test_parser_and_memory_option():
    args = bench_components.get_args_parser().parse_args(["--memory", "--threads", "1"])
    assert args.memory and args.threads == 1
