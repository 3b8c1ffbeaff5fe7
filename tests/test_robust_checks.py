"""Nothing lost, nothing silent (issue 14), the checks that need no training run: options at start,
run names, checkpoint files (failed saves, fsync, corrupt or non-finite files), run-folder locks and
option changes, evaluation shards and the DDP timeout. The checks that train: tests/test_robust_train.py."""

import argparse
import errno
import importlib
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from utils import distributed as dist_utils
from utils.checkpoint import (
    args_to_dict,
    load_checkpoint,
    load_newest_checkpoint,
    non_finite_tensors,
    save_checkpoint,
)
from utils.errors import CheckpointError, UserError
from utils.options import run_name
from utils.run_folder import LOCK_FILE, RunLock, check_run_folder, report_resume_auto

BAD_OPTION = (SystemExit, ValueError)  # "Bad options: ..." (SystemExit) or a UserError


# ----------------------------------------------------------------------------- options at start


def float_options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.type is float or getattr(a.type, "__name__", "") == "float_list"]


@pytest.mark.parametrize("script", ["train", "evaluate", "demo", "extract_features"])
def test_every_float_option_must_be_finite(script, tmp_path):
    """Each float option of each script, set to nan (inf for the others), fails at start naming it."""
    module = importlib.import_module(script)
    parser = module.get_args_parser()
    actions = float_options(parser)
    assert len(actions) >= 15 if script == "train" else len(actions) >= 12
    for action in actions:
        option = action.option_strings[-1]
        for value in ("nan", "inf", "-inf"):
            argv = ["--save_root", str(tmp_path / "runs"), "--checkpoint", str(tmp_path / "c.pth")]
            argv = [f"{option}={value if action.type is float else f'1,{value}'}"] + argv
            if script == "train":
                argv = argv[:-2]
            if script == "demo":
                argv += ["--images", str(tmp_path)]
            with pytest.raises(BAD_OPTION, match=f"--{action.dest} must be a finite number"):
                module.main(parser.parse_args(argv))
    assert not os.path.exists(tmp_path / "runs")  # failed before anything was written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--negative_threshold", "-1"], r"--negative_threshold must be in \[0, --positive_threshold\]"),
        (["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
        (["--weight_decay=-1e-4"], "--weight_decay must be >= 0"),
        (["--gamma", "0"], r"--gamma .* must be in \(0, 1\]"),
        (["--warmup_factor", "2"], r"--warmup_factor must be in \[0, 1\]"),
        (["--clip_grad", "-1"], "--clip_grad must be >= 0"),
        (["--focal_alpha", "1.5"], r"--focal_alpha must be in \[0, 1\]"),
        (["--focal_gamma", "-2"], "--focal_gamma must be >= 0"),
        (["--smooth_l1_beta", "-1"], "--smooth_l1_beta must be >= 0"),
        (["--repeat_threshold", "0"], r"--repeat_threshold must be in \(0, 1\]"),
        (["--fpn_channels", "0"], "--fpn_channels must be >= 1"),
        (["--neg_pos_ratio", "0"], "--neg_pos_ratio must be >= 1"),
        (["--num_bins", "0"], "--num_bins must be >= 1"),
        (["--keep_checkpoints", "-1"], "--keep_checkpoints must be >= 0"),
        (["--dist_timeout", "0"], "--dist_timeout must be > 0"),
    ],
)
def test_out_of_range_options_fail_at_start(argv, message, tmp_path):
    with pytest.raises(BAD_OPTION, match=message):
        train.main(train.get_args_parser().parse_args(argv + ["--save_root", str(tmp_path)]))
    assert os.listdir(tmp_path) == []


def test_bad_options_are_reported_together_and_nan_once(tmp_path):
    argv = ["--lr", "nan", "--gamma", "nan", "--negative_threshold", "nan", "--momentum", "-1"]
    with pytest.raises(BAD_OPTION) as info:
        train.main(train.get_args_parser().parse_args(argv + ["--save_root", str(tmp_path)]))
    text = str(info.value)
    for option in ("--lr", "--gamma", "--negative_threshold"):
        assert text.count(f"{option} ") == 1 and f"{option} must be a finite number, got nan" in text
    assert "--momentum must be in [0, 1), got -1.0" in text


def test_run_name_tells_runs_with_other_options_apart():
    parser = train.get_args_parser()
    base = run_name(parser.parse_args([]))
    assert base == "shapes_fpn_ohem_resnet50_pre3x3_mbox_sh0_sq600_bs24_lr0.0005"  # defaults: original's
    variants = [
        ["--fpn_channels", "128"],
        ["--num_head_layers", "2"],
        ["--optimizer", "adamw"],
        ["--augment", "flip"],
        ["--p6_from", "p5"],
        ["--sampler", "class_balanced"],
        ["--pretrained", "none"],
    ]
    names = [run_name(parser.parse_args(v)) for v in variants]
    assert names[0] == base + "_fpn128" and names[2] == base + "_adamw" and names[6] == base + "_ptnone"
    assert len(set(names + [base])) == len(variants) + 1


# ----------------------------------------------------------------------------- checkpoints


def test_save_refuses_non_finite_state_and_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "model_000001.pth")
    save_checkpoint({"model": {"w": torch.ones(3)}, "args": {}}, path)
    before = open(path, "rb").read()
    for bad in ({"model": {"w": torch.tensor([1.0, float("nan")])}}, {"optimizer": {"state": {0: {
        "momentum_buffer": torch.tensor([float("inf")])}}}, "model": {"w": torch.ones(3)}}):  # fmt: skip
        with pytest.raises(CheckpointError, match="non-finite"):
            save_checkpoint({**bad, "args": {}}, path)
        assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["model_000001.pth"]
    assert non_finite_tensors({"a": {"b": [torch.zeros(1), torch.tensor([float("nan")])]}}) == ["a.b.1"]
    assert non_finite_tensors({"i": torch.tensor([1]), "s": "x"}) == []


def test_full_disk_during_save_leaves_no_tmp_and_says_so(tmp_path, monkeypatch):
    path = str(tmp_path / "model_000002.pth")
    save_checkpoint({"model": {"w": torch.ones(3)}, "args": {}}, str(tmp_path / "model_000001.pth"))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # what a real full disk leaves: a partial file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"model_000002.pth': the disk is full .*earlier checkpoints"):
        save_checkpoint({"model": {"w": torch.ones(3)}, "args": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["model_000001.pth"]
    assert torch.equal(load_checkpoint(str(tmp_path / "model_000001.pth"))["model"]["w"], torch.ones(3))


def test_save_fsyncs_the_file_before_the_rename_and_then_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", b)), real_replace(a, b)))
    path = str(tmp_path / "model_000001.pth")
    save_checkpoint({"model": {"w": torch.ones(3)}, "args": {}}, path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert events == [("fsync", path + ".tmp"), ("replace", path), ("fsync", str(tmp_path))]


def test_loading_a_non_finite_or_corrupt_checkpoint_names_it(tmp_path):
    path = str(tmp_path / "nan.pth")
    torch.save({"model": {"head.w": torch.tensor([float("nan")])}, "args": {}}, path)
    with pytest.raises(CheckpointError, match=r"nan.pth' has non-finite .* e.g. model.head.w"):
        load_checkpoint(path)
    open(tmp_path / "text.pth", "w").write("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="text.pth' is not a") as info:
        load_checkpoint(str(tmp_path / "text.pth"))
    assert "weights_only" not in str(info.value)


def test_resume_auto_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    for it in (2, 4, 6):
        save_checkpoint(
            {"model": {"w": torch.full((2,), float(it))}, "args": {}}, str(tmp_path / f"model_{it:06d}.pth")
        )
    data = open(tmp_path / "model_000006.pth", "rb").read()
    open(tmp_path / "model_000006.pth", "wb").write(data[: len(data) // 2])  # truncated outside our save
    with caplog.at_level(logging.WARNING):
        path, state = load_newest_checkpoint(str(tmp_path))
    assert path.endswith("model_000004.pth") and torch.equal(state["model"]["w"], torch.full((2,), 4.0))
    assert "passing over model_000006.pth" in caplog.text and "truncated or corrupt" in caplog.text
    assert load_newest_checkpoint(str(tmp_path / "empty")) == (None, None)
    for it in (2, 4):
        open(tmp_path / f"model_{it:06d}.pth", "w").write("x")
    with pytest.raises(CheckpointError, match="no checkpoint of .* loads"):
        load_newest_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- run folders


def test_options_that_do_not_change_the_weights_may_differ(tmp_path):
    saved = {"lr": 0.01, "num_workers": 2, "log_step": 20, "max_iter": 10, "device": "cuda"}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    check_run_folder(
        str(tmp_path), {**saved, "num_workers": 0, "log_step": 1, "device": "cpu"}, resuming=False
    )
    check_run_folder(str(tmp_path), {**saved, "max_iter": 20}, resuming=True)  # extending a run
    with pytest.raises(UserError, match="--max_iter 10 -> 20"):
        check_run_folder(str(tmp_path), {**saved, "max_iter": 20}, resuming=False)


def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path, caplog):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        lock_path = tmp_path / LOCK_FILE
        lock_path.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"is in use by process {live.pid} on this host"):
            RunLock().acquire(str(tmp_path))
        lock_path.write_text(json.dumps({"pid": live.pid, "host": "elsewhere"}))
        with pytest.raises(
            UserError, match="on host elsewhere .*if that process is gone, delete the lock file"
        ):
            RunLock().acquire(str(tmp_path))
        lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        lock = RunLock()
        with caplog.at_level(logging.WARNING):
            lock.acquire(str(tmp_path))
        assert f"its process {dead.pid} on {socket.gethostname()} is no longer running" in caplog.text
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            RunLock().acquire(str(tmp_path))  # a second run while this one holds it
        lock.release()
        assert not lock_path.exists()
    finally:
        live.kill()
        live.wait()


def test_resume_auto_without_a_checkpoint_says_so_and_names_the_other_folders(tmp_path, caplog):
    base = {"dataset": "shapes", "arch": "fpn_ohem", "basenet": "resnet18", "lr": 0.01, "fpn_channels": 16}
    for name, changes in (("a", {"fpn_channels": 32}), ("b", {}), ("c", {"basenet": "resnet50"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps({**base, **changes}))
    save_checkpoint({"model": {}, "args": {}}, str(tmp_path / "a" / "model_000100.pth"))
    with caplog.at_level(logging.WARNING):
        message = report_resume_auto(str(tmp_path / "new"), str(tmp_path), base)
    assert "\n" not in message and message in caplog.text
    assert message.startswith(
        f"--resume auto: no checkpoint in {tmp_path / 'new'}; starting from iteration 0"
    )
    assert "a (model_000100.pth; differs: --fpn_channels 32 -> 16); b (no checkpoint)" in message
    assert " c " not in message and "c (" not in message  # another backbone: not a candidate
    alone = report_resume_auto(str(tmp_path / "c"), str(tmp_path), {**base, "basenet": "resnet50"})
    assert alone == f"--resume auto: no checkpoint in {tmp_path / 'c'}; starting from iteration 0"


# ----------------------------------------------------------------------------- evaluation


def test_shard_range_blocks_cover_the_dataset_in_order():
    for n in (0, 1, 5, 6, 7, 100):
        for world in (1, 2, 3, 8):
            blocks = [dist_utils.shard_range(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(dist_utils.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_utils.dist, "init_process_group", lambda **kw: seen.update(kw))
    dist_utils.init_distributed(torch.device("cpu"), timeout_minutes=90)
    assert seen == {"backend": "gloo", "timeout": __import__("datetime").timedelta(minutes=90)}
    parser = train.get_args_parser()
    assert (
        parser.parse_args([]).dist_timeout == 30
        and parser.parse_args(["--dist_timeout", "5"]).dist_timeout == 5
    )
    assert "dist_timeout" in args_to_dict(parser.parse_args([]))
