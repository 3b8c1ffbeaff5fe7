"""End-to-end: train on a tiny shapes set, checkpoint, resume, evaluate, demo and extract features."""

import glob
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tiny_shapes import MODEL_OPTS, TRAIN_OPTS, make_tiny_shapes

import demo
import evaluate
import extract_features
import train
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint
from utils.errors import UserError
from utils.options import run_name


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def run_train(data_root, save_root, *extra):
    argv = (
        MODEL_OPTS
        + TRAIN_OPTS
        + ["--data_root", data_root, "--save_root", str(save_root), "--run_name", "r", *extra]
    )
    return train.main(train.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    save_root = tmp_path_factory.mktemp("runs")
    summary = run_train(data_root, save_root)
    return summary, os.path.join(str(save_root), "r")


def test_training_writes_checkpoints_logs_and_validates(trained_run):
    summary, run_dir = trained_run
    assert summary["iteration"] == 12
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "model_*.pth"))) == [
        "model_000006.pth",
        "model_000012.pth",
    ]
    state = load_checkpoint(os.path.join(run_dir, "model_000012.pth"))
    assert state["iteration"] == 12 and state["class_names"] == ["circle", "square", "triangle"]
    assert state["args"]["basenet"] == "resnet18" and len(state["anchors"]) == 5
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    loss_records = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in loss_records] == [3, 6, 9, 12]
    assert all(np.isfinite(r["loss_cls"]) and np.isfinite(r["loss_box"]) for r in loss_records)
    assert "val_voc_map_area" in records[-1] and 0.0 <= records[-1]["val_voc_map_area"] <= 1.0
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["max_iter"] == 12


def test_missing_images_fail_at_start_or_are_counted(data_root, tmp_path):
    """A missing val image stops training before the first iteration, not at the first validation."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    missing = sorted(glob.glob(str(root / "shapes" / "images" / "val" / "*.png")))[2]
    os.remove(missing)
    with pytest.raises(
        UserError, match=r"1 of 6 images of shapes/val do not exist, e\.g\. .*" + os.path.basename(missing)
    ):
        run_train(str(root), tmp_path / "runs")
    assert not os.path.exists(tmp_path / "runs" / "r" / "metrics.jsonl")  # no iteration ran
    summary = run_train(
        str(root), tmp_path / "runs", "--skip_bad_images", "--max_iter", "2", "--step_values", "1"
    )
    assert summary["iteration"] == 2
    with open(tmp_path / "runs" / "r" / "train.log") as f:
        assert "1 of 6 images of shapes/val do not exist" in f.read()


def test_resume_reaches_the_same_weights(trained_run, data_root, tmp_path):
    _, run_dir = trained_run
    resumed_dir = tmp_path / "r"
    resumed_dir.mkdir()
    shutil.copy(os.path.join(run_dir, "model_000006.pth"), resumed_dir)
    summary = run_train(data_root, tmp_path, "--resume", "auto")
    assert summary["iteration"] == 12
    uninterrupted = load_checkpoint(os.path.join(run_dir, "model_000012.pth"))["model"]
    resumed = load_checkpoint(str(resumed_dir / "model_000012.pth"))["model"]
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


def test_evaluate_voc_and_coco_paths(trained_run, data_root, tmp_path):
    _, run_dir = trained_run
    argv = [
        "--checkpoint",
        os.path.join(run_dir, "model_000012.pth"),
        "--data_root",
        data_root,
        "--metric",
        "all",
        "--save_path",
        str(tmp_path),
    ]
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    headline = next(iter(summary.values()))
    assert {"voc_map_07_11pt", "voc_map_area", "coco_AP", "coco_AP50"} <= headline.keys()
    # Validation at iteration 12 scored the same weights: the same numbers, under val_ + the same keys.
    validated = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
    assert validated["iteration"] == 12 and {"val_voc_map_07_11pt", "val_voc_map_area"} <= validated.keys()
    for key in (k for k in validated if k.startswith("val_")):
        assert validated[key] == pytest.approx(headline[key[len("val_") :]], abs=1e-9), key
    results_file = glob.glob(str(tmp_path / "detections_*.json"))[0]
    results = json.load(open(results_file))
    assert results and {r["category_id"] for r in results} <= {1, 2, 3}
    # Scoring the written results file again, without the model, gives the same numbers.
    again = evaluate.main(
        evaluate.get_args_parser().parse_args(
            ["--detections", results_file, "--data_root", data_root, "--val_sets", "val", "--metric", "all"]
        )
    )
    assert again["detections"]["voc_map_area"] == pytest.approx(headline["voc_map_area"])
    assert again["detections"]["coco_AP"] == pytest.approx(headline["coco_AP"])
    # ... and equal to pycocotools run directly on the split's annotation file and the results file.
    gt = COCO(os.path.join(data_root, "shapes", "annotations", "val.json"))
    direct = COCOeval(gt, gt.loadRes(results_file), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert 0 < direct.stats[1]  # the trained model finds something, so the comparison is not 0 == 0
    assert again["detections"]["coco_AP"] == pytest.approx(direct.stats[0], abs=1e-9)
    assert again["detections"]["coco_AP50"] == pytest.approx(direct.stats[1], abs=1e-9)
    assert again["detections"]["coco_AP75"] == pytest.approx(direct.stats[2], abs=1e-9)


def test_evaluate_several_iterations_of_a_run(trained_run, data_root, tmp_path):
    _, run_dir = trained_run
    argv = [
        "--run_dir",
        run_dir,
        "--eval_iters",
        "6,12",
        "--data_root",
        data_root,
        "--save_path",
        str(tmp_path),
    ]
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    assert [os.path.basename(p) for p in summary] == ["model_000006.pth", "model_000012.pth"]


def test_evaluate_finds_the_run_folder_from_the_training_options(trained_run, data_root, tmp_path):
    """As in the original: evaluate.py with train.py's command line (no --checkpoint, no --run_dir)
    evaluates --eval_iters of the run folder train.py derives from those options."""
    _, run_dir = trained_run
    save_root = tmp_path / "runs"
    train_argv = MODEL_OPTS + TRAIN_OPTS + ["--data_root", data_root, "--save_root", str(save_root)]
    derived = os.path.join(str(save_root), run_name(train.get_args_parser().parse_args(train_argv)))
    # The original's parts, then the options beyond them that differ from their defaults (RUN_NAME_EXTRAS).
    assert (
        os.path.basename(derived)
        == "shapes_fpn_ohem_resnet18_pre1x3_mbox_sh0_sq64_bs4_lr0.01_fpn16_hl1_ptnone"
    )
    with pytest.raises(SystemExit, match="the run folder derived from the options, .*does not exist"):
        evaluate.main(evaluate.get_args_parser().parse_args(train_argv + ["--eval_iters", "12"]))
    shutil.copytree(run_dir, derived)
    argv = train_argv + ["--eval_iters", "6,12", "--save_path", str(tmp_path)]
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    assert [os.path.basename(p) for p in summary] == ["model_000006.pth", "model_000012.pth"]
    by_checkpoint = evaluate.main(
        evaluate.get_args_parser().parse_args(
            ["--checkpoint", os.path.join(run_dir, "model_000012.pth"), "--data_root", data_root]
            + ["--save_path", str(tmp_path / "direct")]
        )
    )
    assert list(summary.values())[1] == next(iter(by_checkpoint.values()))
    # Without --eval_iters: the newest checkpoint.
    newest = evaluate.main(evaluate.get_args_parser().parse_args(train_argv + ["--save_path", str(tmp_path)]))
    assert [os.path.basename(p) for p in newest] == ["model_000012.pth"]


def test_a_val_split_with_other_classes_is_refused(trained_run, data_root, tmp_path):
    """Labels are positions in the training class list: a split whose categories are in another order
    would be scored as the wrong classes, so train.py and evaluate.py refuse it at start."""
    _, run_dir = trained_run
    root = str(tmp_path / "data")
    shutil.copytree(data_root, root)
    annotations = os.path.join(root, "shapes", "annotations")
    with open(os.path.join(annotations, "val.json")) as f:
        val = json.load(f)
    val["categories"] = val["categories"][::-1]
    with open(os.path.join(annotations, "val_reordered.json"), "w") as f:
        json.dump(val, f)
    message = r"val_reordered.json has other classes \(name, id\) than .*label 0: \('triangle', 3\) here"
    with pytest.raises(SystemExit, match=message):
        evaluate.main(
            evaluate.get_args_parser().parse_args(
                ["--checkpoint", os.path.join(run_dir, "model_000012.pth"), "--data_root", root]
                + ["--val_sets", "val_reordered", "--save_path", str(tmp_path)]
            )
        )
    with pytest.raises(SystemExit, match=message):
        run_train(
            root, tmp_path / "runs", "--val_sets", "val_reordered", "--max_iter", "1", "--step_values", ""
        )


@pytest.mark.parametrize("script", ["evaluate", "demo", "extract_features"])
def test_inference_scripts_run_in_bf16_with_amp(script, trained_run, data_root, tmp_path, monkeypatch):
    """--amp makes each inference script run the model under bf16 autocast on the CPU, and the results
    stay close to fp32's."""
    import engine

    entered = []
    original = engine.autocast_context

    def spy(device, amp_dtype):
        entered.append((device.type, amp_dtype))
        return original(device, amp_dtype)

    monkeypatch.setattr(engine, "autocast_context", spy)
    _, run_dir = trained_run
    module = {"evaluate": evaluate, "demo": demo, "extract_features": extract_features}[script]
    argv = ["--checkpoint", os.path.join(run_dir, "model_000012.pth"), "--data_root", data_root]
    if script == "demo":
        argv += ["--images", os.path.join(data_root, "shapes", "images", "val"), "--score_thresh", "0"]

    def run(*extra, out):
        return module.main(module.get_args_parser().parse_args(argv + ["--save_path", str(out), *extra]))

    fp32, bf16 = run(out=tmp_path / "fp32"), run("--amp", out=tmp_path / "bf16")
    assert entered and set(entered[: len(entered) // 2]) == {("cpu", None)}
    assert set(entered[len(entered) // 2 :]) == {("cpu", torch.bfloat16)}
    if script == "evaluate":
        (fp32,), (bf16,) = fp32.values(), bf16.values()
        assert bf16["voc_map_area"] == pytest.approx(fp32["voc_map_area"], abs=0.05)
    elif script == "demo":
        top = lambda records: [max(d["score"] for d in r["detections"]) for r in records]
        assert top(bf16) == pytest.approx(top(fp32), abs=0.02)
    else:
        for name in os.listdir(tmp_path / "fp32"):
            a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("fp32", "bf16"))
            assert b.dtype == torch.float32 and b.shape == a.shape
            assert b[0, 0] == pytest.approx(float(a[0, 0]), abs=0.02)  # top objectness


def test_demo_draws_boxes(trained_run, data_root, tmp_path):
    _, run_dir = trained_run
    images = sorted(glob.glob(os.path.join(data_root, "shapes", "images", "val", "*.png")))[:2]
    argv = [
        "--checkpoint",
        os.path.join(run_dir, "model_000012.pth"),
        "--images",
        *images,
        "--save_path",
        str(tmp_path),
        "--score_thresh",
        "0.0",
        "--topk",
        "5",
    ]
    records = demo.main(demo.get_args_parser().parse_args(argv))
    assert len(records) == 2
    for record, image_path in zip(records, images):
        drawn = cv2.imread(record["output"])
        original = cv2.imread(image_path)
        assert drawn.shape == original.shape
        assert 1 <= len(record["detections"]) <= 5
        # Boxes were drawn: the output differs from the input image.
        assert np.abs(drawn.astype(int) - original.astype(int)).sum() > 0


def test_extract_features_shapes_and_layout(trained_run, data_root, tmp_path):
    _, run_dir = trained_run
    argv = [
        "--checkpoint",
        os.path.join(run_dir, "model_000012.pth"),
        "--data_root",
        data_root,
        "--save_path",
        str(tmp_path),
        "--num_nodes",
        "10",
        "--conf_thresh",
        "0.0",
    ]
    summary = extract_features.main(extract_features.get_args_parser().parse_args(argv))
    assert summary["num_images"] == 6
    num_classes_with_bg, channels = 4, 16
    files = sorted(glob.glob(str(tmp_path / "*.pth")))
    assert len(files) == 6
    table = torch.load(files[0], weights_only=True)
    assert table.shape == (10, 1 + 4 + num_classes_with_bg + 9 * channels)
    live = table[table[:, 0] > 0]
    assert len(live) > 0
    probs = live[:, 5 : 5 + num_classes_with_bg]
    torch.testing.assert_close(probs.sum(1), torch.ones(len(live)))  # softmax over K+1
    torch.testing.assert_close(live[:, 0], 1 - probs[:, 0])  # objectness = 1 - P(background)
    boxes = live[:, 1:5]
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] >= boxes[:, :2]).all()


def test_bf16_channels_last_training_and_inference(data_root, tmp_path):
    """--amp on the CPU (bf16 autocast) with --channels_last: trains, stores NHWC weights that load
    anywhere, and the NHWC model predicts what the same weights predict in NCHW."""
    # 96 px: at 64 px P6 is 1x1, where oneDNN's bf16 gradient of the P7 conv is wrong (train.py refuses it).
    with pytest.raises(SystemExit, match="--amp on the CPU needs inputs larger than 64 px"):
        run_train(data_root, tmp_path, "--amp")
    summary = run_train(
        data_root,
        tmp_path,
        "--amp",
        "--channels_last",
        "--input_dim",
        "96",
        "--max_iter",
        "4",
        "--step_values",
        "3",
    )
    assert summary["iteration"] == 4 and np.isfinite(summary["final_loss"])
    path = str(tmp_path / "r" / "model_000004.pth")
    state = load_checkpoint(path)
    assert state["args"]["amp"] and state["args"]["channels_last"]
    assert state["model"]["backbone.stem.0.weight"].is_contiguous(memory_format=torch.channels_last)

    parser = evaluate.get_args_parser()
    model, _post, _args, _ = build_model_from_checkpoint(
        path, parser.parse_args(["--checkpoint", path, "--data_root", data_root]), parser, torch.device("cpu")
    )
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nhwc = model(images)
        model.to(memory_format=torch.contiguous_format)
        assert all(w.is_contiguous() for w in convs)
        nchw = model(images)
    for key in ("pred_logits", "pred_box_deltas"):
        torch.testing.assert_close(nhwc[key], nchw[key], rtol=1e-4, atol=1e-4)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_root, tmp_path, monkeypatch):
    real_build = train.build_model

    def build_with_nan_at_iteration_8(*args, **kwargs):
        model, criterion, post = real_build(*args, **kwargs)
        calls = {"n": 0}

        class NanAfter(torch.nn.Module):
            def forward(self, outputs, targets):
                calls["n"] += 1
                losses = criterion(outputs, targets)
                if calls["n"] >= 8:
                    losses["loss_box"] = losses["loss_box"] * float("nan")
                return losses

        return model, NanAfter(), post

    monkeypatch.setattr(train, "build_model", build_with_nan_at_iteration_8)
    with pytest.raises(SystemExit, match=r"non-finite loss at iteration 8: .*loss_box=nan"):
        run_train(data_root, tmp_path)
    run_dir = tmp_path / "r"
    assert [os.path.basename(p) for p in sorted(glob.glob(str(run_dir / "model_*.pth")))] == [
        "model_000006.pth"
    ]
    state = load_checkpoint(str(run_dir / "model_000006.pth"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_evaluate_keeps_every_metric_and_draws(trained_run, data_root, tmp_path):
    """The metrics file holds per-class AP, COCO's 12 numbers and arrays (here from faster-coco-eval,
    checked against pycocotools), inference speed; --plot draws PR curves; training drew its curves."""
    from metrics.coco import COCO_STAT_NAMES, evaluate_coco
    from metrics.voc import evaluate_voc

    _, run_dir = trained_run
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 10_000  # written at the end of training
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert all(r["data_time"] >= 0 and r["compute_time"] > 0 for r in records if "loss" in r)
    argv = MODEL_OPTS + ["--checkpoint", os.path.join(run_dir, "model_000012.pth"), "--data_root", data_root]
    argv += ["--metric", "all", "--coco_backend", "faster", "--plot", "--save_path", str(tmp_path)]
    headline = next(iter(evaluate.main(evaluate.get_args_parser().parse_args(argv)).values()))
    (metrics_path,) = glob.glob(str(tmp_path / "metrics_*.json"))
    saved = json.load(open(metrics_path))
    assert {k: saved[k] for k in headline} == headline and "voc_map_area" in saved
    assert saved["inference"]["num_images"] == 6 and saved["inference"]["images_per_s"] > 0
    (results_path,) = glob.glob(str(tmp_path / "detections_*.json"))
    gt_path = os.path.join(data_root, "shapes", "annotations", "val.json")
    gt, results = json.load(open(gt_path)), json.load(open(results_path))
    voc = evaluate_voc(gt, results)
    assert saved["voc"]["ap_area"] == voc["ap_area"] and saved["voc"]["ap_07_11pt"] == voc["ap_07_11pt"]
    assert (
        saved["voc"]["pr_curves"] == voc["pr_curves"]
        and saved["voc"]["num_gt_difficult"] == voc["num_gt_difficult"]
    )
    reference = evaluate_coco(gt, results, backend="pycocotools")
    assert saved["coco"]["backend"] == "faster"
    np.testing.assert_allclose(
        [saved["coco"][n] for n in COCO_STAT_NAMES], [reference[n] for n in COCO_STAT_NAMES], atol=1e-12
    )
    assert saved["coco"]["ap_per_class"].keys() == {"circle", "square", "triangle"}
    assert np.array(saved["coco"]["precision"]).shape == (10, 101, 3)
    (png,) = glob.glob(str(tmp_path / "pr_*.png"))
    assert os.path.getsize(png) > 10_000
