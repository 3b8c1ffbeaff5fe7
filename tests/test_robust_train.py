"""Nothing lost, nothing silent in training (issue 14), the checks that train: non-finite weights, run
folders, failed saves, checkpoints that do not fit, and evaluation with skipped images. Option checks at
start, checkpoint files, locks and shards: tests/test_robust_checks.py."""

import argparse
import errno
import glob
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from tiny_shapes import MODEL_OPTS, TRAIN_OPTS, make_tiny_shapes

import evaluate
import train
import training
from utils.checkpoint import load_checkpoint, non_finite_tensors
from utils.errors import CheckpointError, UserError
from utils.options import run_name
from utils.run_folder import LOCK_FILE


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def train_argv(data_root, save_root, *extra, name="r"):
    argv = MODEL_OPTS + TRAIN_OPTS + ["--data_root", str(data_root), "--save_root", str(save_root)]
    return argv + (["--run_name", name] if name else []) + list(extra)


def run_train(data_root, save_root, *extra, name="r"):
    return train.main(train.get_args_parser().parse_args(train_argv(data_root, save_root, *extra, name=name)))


SHORT = ("--max_iter", "4", "--step_values", "3", "--save_step", "2")


@pytest.fixture(scope="module")
def short_run(data_root, tmp_path_factory):
    """4 iterations, checkpoints at 2 and 4, validated at the end."""
    save_root = tmp_path_factory.mktemp("runs")
    summary = run_train(data_root, save_root, *SHORT)
    return summary, os.path.join(str(save_root), "r")


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("content", ["text", "list", "object"])
def test_pretrained_file_that_is_not_a_state_dict(content, data_root, tmp_path):
    path = tmp_path / "weights.pth"
    if content == "text":
        path.write_text("hello")
    elif content == "list":
        torch.save([torch.ones(1)], path)
    else:
        torch.save({"w": argparse.Namespace(a=1)}, path)
    argv = train_argv(data_root, tmp_path / "runs", "--max_iter", "1", "--step_values", "")
    argv[argv.index("--pretrained") + 1] = str(path)
    with pytest.raises(CheckpointError, match=r"--pretrained weights file .*weights.pth'") as info:
        train.main(train.get_args_parser().parse_args(argv))
    assert "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("script", ["evaluate", "demo", "extract_features"])
def test_inference_scripts_refuse_a_non_finite_checkpoint(script, short_run, data_root, tmp_path):
    _, run_dir = short_run
    state = torch.load(os.path.join(run_dir, "model_000004.pth"), weights_only=True)
    key = next(k for k in state["model"] if k.startswith("head.cls_pred"))
    state["model"][key][0] = float("nan")
    path = str(tmp_path / "diverged.pth")
    torch.save(state, path)
    module = importlib.import_module(script)
    argv = ["--checkpoint", path, "--data_root", data_root, "--save_path", str(tmp_path / "out")]
    if script == "demo":
        argv += ["--images", os.path.join(data_root, "shapes", "images", "val")]
    with pytest.raises(CheckpointError, match=f"diverged.pth' has non-finite .*{key}"):
        module.main(module.get_args_parser().parse_args(argv))


def test_checkpoint_whose_options_do_not_fit_its_weights(short_run, data_root, tmp_path):
    _, run_dir = short_run
    state = torch.load(os.path.join(run_dir, "model_000004.pth"), weights_only=True)
    state["args"]["fpn_channels"] = 32
    path = str(tmp_path / "edited.pth")
    torch.save(state, path)
    argv = ["--checkpoint", path, "--data_root", data_root, "--save_path", str(tmp_path)]
    with pytest.raises(CheckpointError, match=r"edited.pth': its weights do not fit .*--fpn_channels"):
        evaluate.main(evaluate.get_args_parser().parse_args(argv))


@pytest.mark.parametrize(
    "option, value, shown",
    [
        ("--fpn_channels", "32", "--fpn_channels 16 -> 32"),
        ("--basenet", "resnet34", "--basenet resnet18 -> resnet34"),
    ],
)
def test_resume_with_a_checkpoint_of_another_model_names_the_option(
    option, value, shown, short_run, data_root, tmp_path
):
    _, run_dir = short_run
    argv = train_argv(data_root, tmp_path, *SHORT, "--resume", os.path.join(run_dir, "model_000002.pth"))
    argv[argv.index(option) + 1] = value
    with pytest.raises(
        CheckpointError, match=f"model_000002.pth' was trained with other model options .*{shown}"
    ):
        train.main(train.get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_non_finite_weights_are_never_saved_and_the_message_is_true(where, data_root, tmp_path, monkeypatch):
    """The loss stays finite but a step makes the weights (or SGD's momentum) NaN at iteration 3: the
    run stops before saving it, says model_000002.pth is intact, and it is."""
    real = training.train_one_iter

    def step_then_diverge(model, criterion, images, targets, optimizer, iteration, *args):
        terms = real(model, criterion, images, targets, optimizer, iteration, *args)
        if iteration == 2:
            with torch.no_grad():
                param = next(p for p in model.parameters() if p.requires_grad)
                target = param if where == "weights" else optimizer.state[param]["momentum_buffer"]
                target.view(-1)[0] = float("nan")
        return terms

    monkeypatch.setattr(training, "train_one_iter", step_then_diverge)
    with pytest.raises(
        SystemExit,
        match=r"non-finite weights or optimizer state at iteration 3 .*model_000002.pth, is intact",
    ):
        run_train(data_root, tmp_path, "--max_iter", "4", "--step_values", "", "--save_step", "1")
    run_dir = tmp_path / "r"
    assert sorted(os.listdir(run_dir)) == [
        "args.json",
        "metrics.jsonl",
        "model_000001.pth",
        "model_000002.pth",
        "train.log",
    ]
    state = load_checkpoint(str(run_dir / "model_000002.pth"))  # loads: finite model and optimizer
    assert state["iteration"] == 2 and not non_finite_tensors([state["model"], state["optimizer"]])


def test_full_disk_while_training_stops_with_a_message_and_keeps_the_last_checkpoint(
    data_root, tmp_path, monkeypatch
):
    real_save, calls = torch.save, []

    def full_on_second(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second)
    with pytest.raises(CheckpointError, match=r"model_000002.pth': the disk is full"):
        run_train(data_root, tmp_path, "--max_iter", "3", "--step_values", "", "--save_step", "1", "--no_val")
    monkeypatch.setattr(torch, "save", real_save)
    files = sorted(os.listdir(tmp_path / "r"))
    assert "model_000002.pth.tmp" not in files and "model_000002.pth" not in files and LOCK_FILE not in files
    assert load_checkpoint(str(tmp_path / "r" / "model_000001.pth"))["iteration"] == 1
    # ... and the run goes on from there once there is space again.
    summary = run_train(
        data_root,
        tmp_path,
        "--max_iter",
        "3",
        "--step_values",
        "",
        "--save_step",
        "1",
        "--no_val",
        "--resume",
        "auto",
    )
    assert summary["iteration"] == 3


# ----------------------------------------------------------------------------- run folders


def test_a_folder_of_a_run_with_other_options_is_refused(short_run, data_root, tmp_path):
    _, run_dir = short_run
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    before = {p: open(p, "rb").read() for p in glob.glob(str(copy / "*"))}
    message = r"other options \(args.json: --lr 0.01 -> 0.02; --momentum 0.9 -> 0.8, .*--run_name NAME"
    with pytest.raises(UserError, match=message):
        run_train(data_root, tmp_path, *SHORT, "--lr", "0.02", "--momentum", "0.8", "--log_step", "1")
    with pytest.raises(UserError, match=r"--fpn_channels 16 -> 32.*or repeat its options to resume it"):
        run_train(data_root, tmp_path, *SHORT, "--fpn_channels", "32", "--resume", "auto")
    # Same options, without --resume: starting afresh would overwrite its checkpoints.
    with pytest.raises(
        UserError, match=r"already holds checkpoints \(model_000004.pth the newest\): pass --resume auto"
    ):
        run_train(data_root, tmp_path, *SHORT)
    assert {p: open(p, "rb").read() for p in glob.glob(str(copy / "*"))} == before  # nothing touched


def test_train_refuses_a_folder_locked_by_a_live_run(data_root, tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / LOCK_FILE).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"in use by process {live.pid}"):
            run_train(data_root, tmp_path, *SHORT)
        assert sorted(os.listdir(tmp_path / "r")) == [LOCK_FILE]  # nothing written
    finally:
        live.kill()
        live.wait()


def test_resume_auto_after_an_option_change_reports_in_training(short_run, data_root, tmp_path):
    """A derived run name changes with --lr: --resume auto starts afresh and names the old folder."""
    _, run_dir = short_run
    old = tmp_path / os.path.basename(
        run_name(train.get_args_parser().parse_args(train_argv(data_root, tmp_path, *SHORT, name=None)))
    )
    shutil.copytree(run_dir, old)
    extra = ["--max_iter", "1", "--step_values", "", "--lr", "0.02", "--no_val", "--resume", "auto"]
    summary = run_train(data_root, tmp_path, *extra, name=None)
    assert summary["iteration"] == 1
    log = open(
        os.path.join(summary["run_dir"], "train.log")
    ).read()  # (setup_logging replaces caplog's handler)
    assert f"no checkpoint in {summary['run_dir']}; starting from iteration 0. Not used" in log
    assert f"{old.name} (model_000004.pth; differs: --lr 0.01 -> 0.02" in log


def test_resume_auto_passes_over_a_corrupt_newest_checkpoint_and_stays_bit_exact(
    short_run, data_root, tmp_path
):
    _, run_dir = short_run
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    open(copy / "model_000004.pth", "wb").write(b"\0" * 100)
    summary = run_train(data_root, tmp_path, *SHORT, "--resume", "auto")
    log = open(copy / "train.log").read()
    assert summary["iteration"] == 4 and "passing over model_000004.pth" in log
    assert f"resuming from {copy / 'model_000002.pth'}, the newest of 2 checkpoints that loads" in log
    resumed = load_checkpoint(str(copy / "model_000004.pth"))["model"]
    original = load_checkpoint(os.path.join(run_dir, "model_000004.pth"))["model"]
    for key in original:
        torch.testing.assert_close(resumed[key], original[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- evaluation


def test_skipped_images_leave_the_ground_truth_too(short_run, data_root, tmp_path, capsys):
    """One corrupt val image with --skip_bad_images: the metrics equal those of the split without it
    (an annotation file with that image removed), and the output and metrics file say so."""
    _, run_dir = short_run
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    with open(root / "shapes" / "annotations" / "val.json") as f:
        val = json.load(f)
    bad = val["images"][1]
    assert any(a["image_id"] == bad["id"] for a in val["annotations"])  # it has boxes that would be missed
    (root / "shapes" / bad["file_name"]).write_bytes(b"not an image")
    without = {**val, "images": [im for im in val["images"] if im["id"] != bad["id"]]}
    without["annotations"] = [a for a in val["annotations"] if a["image_id"] != bad["id"]]
    (root / "shapes" / "annotations" / "val_without.json").write_text(json.dumps(without))
    checkpoint = os.path.join(run_dir, "model_000004.pth")

    def run(*extra, out):
        argv = [
            "--checkpoint",
            checkpoint,
            "--data_root",
            str(root),
            "--metric",
            "all",
            "--save_path",
            str(out),
            "--conf_thresh",
            "0.0",  # a 4-iteration model: keep its low scores
        ]
        return next(iter(evaluate.main(evaluate.get_args_parser().parse_args(argv + list(extra))).values()))

    skipped = run("--skip_bad_images", out=tmp_path / "skip")
    assert "1 images skipped; metrics over 5 images" in capsys.readouterr().out
    reference = run("--val_sets", "val_without", out=tmp_path / "ref")
    assert reference["coco_AP50"] > 0  # the comparison is not 0 == 0
    for key in ("voc_map_area", "voc_map_07_11pt", "coco_AP", "coco_AP50"):
        assert skipped[key] == pytest.approx(reference[key], abs=1e-12), key
    (metrics_file,) = glob.glob(str(tmp_path / "skip" / "metrics_*.json"))
    written = json.load(open(metrics_file))
    assert written["skipped_images"] == 1 and written["num_images"] == 5
    assert reference["skipped_images"] == 0 and reference["num_images"] == 5
