import os

import pytest
import torch

import evaluate
from utils.checkpoint import (
    args_from_checkpoint,
    args_to_dict,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from utils.errors import CheckpointError


class PicklablePayload:
    pass


def test_save_is_atomic_and_loads_weights_only(tmp_path):
    path = str(tmp_path / "run" / "model_000010.pth")
    state = {"model": {"w": torch.ones(2)}, "args": {"lr": 0.1}, "iteration": 10}
    save_checkpoint(state, path)
    assert not os.path.exists(path + ".tmp")
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 10 and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_load_refuses_pickled_code(tmp_path):
    path = str(tmp_path / "evil.pth")

    # Any object beyond tensors and plain containers needs full unpickling, which weights_only refuses.
    torch.save({"model": PicklablePayload(), "args": {}}, path)
    with pytest.raises(CheckpointError, match="evil.pth' holds Python objects .* could run code") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)  # never advise turning the protection off


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_checkpoint(str(tmp_path / "nothere.pth"))
    path = str(tmp_path / "other.pth")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="other.pth"):
        load_checkpoint(path)


def test_latest_and_prune(tmp_path):
    for it in (5, 10, 15, 20):
        save_checkpoint({"model": {}, "args": {}}, str(tmp_path / f"model_{it:06d}.pth"))
    assert latest_checkpoint(str(tmp_path)).endswith("model_000020.pth")
    prune_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["model_000015.pth", "model_000020.pth"]


def test_args_merge_keeps_structure_and_takes_explicit_cli_values():
    parser = evaluate.get_args_parser()
    trained = parser.parse_args(
        ["--basenet", "resnet18", "--dataset", "shapes", "--conf_thresh", "0.2", "--input_dim", "320"]
    )
    ckpt = {"args": args_to_dict(trained)}
    cli = parser.parse_args(["--basenet", "resnet101", "--nms_thresh", "0.3", "--checkpoint", "x.pth"])
    merged = args_from_checkpoint(ckpt, cli, parser)
    assert merged.basenet == "resnet18"  # structural: the weights only fit the trained network
    assert merged.nms_thresh == 0.3  # explicit on the command line
    assert merged.conf_thresh == 0.2 and merged.input_dim == 320  # not given: the run's own values
    assert merged.checkpoint == "x.pth"
    # freezing follows the trained run (weights themselves come from the checkpoint, not this option)
    assert merged.pretrained == "imagenet" and merged.freeze_upto == 1


def test_typed_options_override_the_checkpoint_even_at_their_default(caplog):
    """A value typed on the command line wins even when it equals the parser default (evaluating on
    another machine with the default data folder); untyped options keep the run's values."""
    parser = evaluate.get_args_parser()
    trained = parser.parse_args(
        ["--data_root", "/scratch/data", "--conf_thresh", "0.01", "--basenet", "resnet18"]
    )
    assert trained.explicit_options == ["basenet", "conf_thresh", "data_root"]
    ckpt = {"args": args_to_dict(trained)}
    assert "explicit_options" not in ckpt["args"]  # how a command was typed is not an option of the run
    cli = parser.parse_args(
        ["--data_root", "datasets/", "-j", "0", "--basenet", "resnet50", "--checkpoint", "x.pth"]
    )
    assert cli.data_root == parser.get_default("data_root") == "datasets/"
    assert cli.explicit_options == ["basenet", "checkpoint", "data_root", "num_workers"]
    with caplog.at_level("WARNING"):
        merged = args_from_checkpoint(ckpt, cli, parser)
    assert merged.data_root == "datasets/" and merged.num_workers == 0
    assert merged.conf_thresh == 0.01  # not typed: the run's value
    assert merged.basenet == "resnet18"  # structural, and the typed value is reported as ignored
    assert "--basenet resnet50 ignored" in caplog.text
