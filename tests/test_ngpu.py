"""--ngpu N: the original's multi-GPU option, relaunched under torchrun with the total batch kept."""

import os
import sys

import pytest
from option_helpers import parser_of

from utils import launch
from utils.errors import UserError
from utils.options import resolve_defaults

# ---------------------------------------------------------------- --ngpu


def test_torchrun_command_keeps_the_total_batch():
    command = launch.torchrun_command("train.py", ["--dataset=coco", "--ngpu=2", "--batch_size=24"], 2, 24)
    assert command[0] == sys.executable
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train.py",
        "--dataset=coco",
        "--ngpu=2",
        "--batch_size=24",
        "--ngpu",
        "1",
        "--batch_size",
        "12",
    ]
    with pytest.raises(UserError, match="--batch_size 25 does not split evenly over --ngpu 2"):
        launch.torchrun_command("train.py", [], 2, 25)


def test_ngpu_relaunches_under_torchrun(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda path, command: calls.append((path, command)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    argv = ["--device", "cpu", "--ngpu", "3", "--batch_size", "6"]
    args = parser_of("train").parse_args(argv)
    launch.relaunch_with_torchrun(args, argv=argv, script="train.py")
    assert calls == [(sys.executable, launch.torchrun_command("train.py", argv, 3, 6))]
    assert "starting 3 processes of --batch_size 2 each (total 6" in capsys.readouterr().err
    # --ngpu 1 (the default) and torchrun's own processes run on.
    launch.relaunch_with_torchrun(parser_of("train").parse_args([]), argv=[], script="train.py")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    launch.relaunch_with_torchrun(args, argv=argv, script="train.py")
    assert len(calls) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--ngpu 3 under torchrun with 2 processes per node"):
        launch.relaunch_with_torchrun(args, argv=argv, script="train.py")


def test_ngpu_needs_the_gpus(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    args = parser_of("train").parse_args(["--ngpu", "2"])
    with pytest.raises(UserError, match="--ngpu 2 needs 2 GPUs, 0 visible"):
        launch.relaunch_with_torchrun(args, argv=[], script="train.py")


def test_other_scripts_warn_that_ngpu_is_ignored(monkeypatch, caplog):
    from utils.options import check_common_args

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = resolve_defaults(parser_of("evaluate").parse_args(["--ngpu", "2"]))
    with caplog.at_level("WARNING"):
        check_common_args(args)
    assert "--ngpu 2 ignored" in caplog.text


@pytest.mark.slow
def test_ngpu_trains_under_torchrun_end_to_end(tmp_path):
    """`train.py --ngpu 2 --batch_size 4` on the CPU: two gloo processes of batch 2 (the same total batch),
    in the run folder named for the total batch, each process's options saying batch 2."""
    import subprocess

    import torch
    from tiny_shapes import MODEL_OPTS, ROOT, make_tiny_shapes

    data_root = make_tiny_shapes(str(tmp_path / "data"))
    argv = MODEL_OPTS + ["--data_root", data_root, "--lr", "0.01", "--max_iter", "2", "--step_values", ""]
    argv += ["--warmup_iters", "0", "--save_step", "2", "--log_step", "1", "--no_val"]
    argv += ["--save_root", str(tmp_path / "runs"), "--ngpu=2", "--batch_size=4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *argv],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--ngpu 2: starting 2 processes of --batch_size 2 each (total 4" in done.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir()]
    assert "_bs4_" in run_dir.name
    checkpoint = torch.load(run_dir / "model_000002.pth", weights_only=True)
    assert (checkpoint["args"]["batch_size"], checkpoint["args"]["ngpu"]) == (2, 1)
    assert len(checkpoint["rng_states"]) == 2  # saved by two processes
