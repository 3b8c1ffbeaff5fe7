"""--compile (utils/compile.py): the same outputs and the same checkpoints as the eager model.

The fast tests trace with dynamo and run the captured graphs with its "eager" backend (``torch.compile``
patched to it): graph capture, in-place compilation, state-dict keys, EMA and checkpoints are all
exercised, and the results must be bit-identical to eager execution. The slow ones compile with inductor
(the default backend; minutes on 2 CPU cores) and compare to 1e-4.
"""

import json
import os

import pytest
import torch
from tiny_shapes import MODEL_OPTS, make_tiny_shapes

import evaluate
import train
from models import build_model
from models.predictor import Detector
from utils.checkpoint import load_checkpoint
from utils.compile import NETWORK_PARTS, compile_network, is_compiled
from utils.options import check_common_args, get_common_parser, resolve_defaults

TINY_MODEL = ["--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", "16"]
TINY_MODEL += ["--num_head_layers", "1", "--input_dim", "64", "--num_scales", "1"]


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's "eager" backend: the graphs are captured, then run op by op."""
    torch._dynamo.reset()
    real_compile = torch.compile

    def compile_eager(fn, *args, mode=None, backend=None, **kwargs):
        return real_compile(fn, *args, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eager)
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def tiny_model(seed=0):
    args = resolve_defaults(get_common_parser().parse_args(TINY_MODEL))
    args.num_classes = 3
    torch.manual_seed(seed)
    model, _, _ = build_model(args, load_pretrained=False)
    return model


def test_compile_mode_needs_compile_and_a_known_mode():
    args = resolve_defaults(get_common_parser().parse_args(TINY_MODEL + ["--compile_mode", "max-autotune"]))
    with pytest.raises(SystemExit, match="--compile_mode max-autotune needs --compile"):
        check_common_args(args)
    with pytest.raises(SystemExit):  # argparse's choices
        get_common_parser().parse_args(["--compile", "--compile_mode", "fastest"])
    with pytest.raises(ValueError, match="compile mode"):
        compile_network(tiny_model(), "fastest")


def test_compile_network_in_place_keeps_modules_keys_and_outputs(eager_backend):
    model, reference = tiny_model(), tiny_model()
    keys, params = list(model.state_dict()), list(model.parameters())
    assert compile_network(model) == list(NETWORK_PARTS)
    assert all(is_compiled(getattr(model, name)) for name in NETWORK_PARTS)
    assert not is_compiled(model) and not is_compiled(model.anchor_generator)
    # The same parameter objects (the optimizer and EMA hold them) and keys without "_orig_mod.".
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    images = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(reference, mode)()
        with torch.set_grad_enabled(mode == "train"):
            out, ref = model(images), reference(images)
        for key in ("pred_logits", "pred_box_deltas", "anchors"):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 6  # three parts, train and eval: the parts were traced
    assert not counters["graph_break"]


def train_run(data_root, save_root, name, *extra):
    argv = MODEL_OPTS + ["--data_root", data_root, "--save_root", str(save_root), "--run_name", name]
    argv += ["--batch_size", "4", "--lr", "0.01", "--max_iter", "2", "--step_values", "", "--warmup_iters"]
    argv += ["0", "--save_step", "2", "--log_step", "1", "--no_val", *extra]
    summary = train.main(train.get_args_parser().parse_args(argv))
    state = load_checkpoint(os.path.join(summary["run_dir"], "model_000002.pth"))
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return state, losses


def test_train_compile_writes_the_eager_checkpoint(data_root, tmp_path, eager_backend):
    """train.py --compile --ema: the checkpoint's keys (model and EMA) and values are the eager run's."""
    eager, eager_losses = train_run(data_root, tmp_path, "eager", "--ema")
    compiled, compiled_losses = train_run(data_root, tmp_path, "compiled", "--ema", "--compile")
    assert compiled["args"]["compile"] and not eager["args"]["compile"]
    assert not any("_orig_mod" in key for key in compiled["model"])
    for weights in ("model", "model_ema"):
        assert list(compiled[weights]) == list(eager[weights])
        for key in eager[weights]:
            torch.testing.assert_close(compiled[weights][key], eager[weights][key], rtol=0, atol=0)
    assert compiled_losses == eager_losses
    # Resuming the compiled run's checkpoint without --compile (and the reverse) is allowed.
    train_run(data_root, tmp_path, "compiled", "--ema", "--resume", "auto", "--max_iter", "3")


def test_detector_and_evaluate_compile_give_the_eager_detections(data_root, tmp_path, eager_backend):
    """Detector.from_checkpoint(compile=True) and evaluate.py --compile: compiled parts, same results;
    a checkpoint trained with --compile does not make inference compile."""
    train_run(data_root, tmp_path, "r", "--compile")
    checkpoint = str(tmp_path / "r" / "model_000002.pth")
    image = torch.rand(3, 64, 64)
    eager = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0)
    compiled = Detector.from_checkpoint(checkpoint, device="cpu", conf_thresh=0.0, compile=True)
    assert not is_compiled(eager.model.backbone) and is_compiled(compiled.model.backbone)
    expected, got = eager(image), compiled(image)
    assert len(expected["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    argv = MODEL_OPTS + ["--data_root", data_root, "--checkpoint", checkpoint, "--conf_thresh", "0.01"]
    metrics = [
        evaluate.main(
            evaluate.get_args_parser().parse_args(argv + extra + ["--save_path", str(tmp_path / n)])
        )
        for n, extra in (("eager", []), ("compiled", ["--compile"]))
    ]
    assert metrics[0][checkpoint] == metrics[1][checkpoint]


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager_to_1e4():
    """Inductor (C++ kernels on the CPU, about 2 minutes to compile here): eval outputs to 1e-4."""
    torch._dynamo.reset()
    model, reference = tiny_model().eval(), tiny_model().eval()
    compile_network(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, ref = model(images), reference(images)
    for key in ("pred_logits", "pred_box_deltas"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_train_inductor_compile_checkpoint_keys_equal_eager(data_root, tmp_path):
    """train.py --compile with inductor: the same checkpoint keys as the eager run, the compiled weights
    load into an eager model, and the first iteration's loss (same initial weights) agrees to 1e-4."""
    torch._dynamo.reset()
    eager, eager_losses = train_run(data_root, tmp_path, "eager")
    compiled, compiled_losses = train_run(data_root, tmp_path, "compiled", "--compile")
    assert list(compiled["model"]) == list(eager["model"])
    for key, value in compiled["model"].items():
        assert value.shape == eager["model"][key].shape and bool(torch.isfinite(value.float()).all())
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-4)
    args = resolve_defaults(get_common_parser().parse_args(TINY_MODEL))
    args.num_classes = len(compiled["class_names"])
    fresh, _, _ = build_model(args, load_pretrained=False)
    fresh.load_state_dict(compiled["model"], strict=True)
