"""--ema (utils/ema.py) and --tta flip (layers/tta.py): hand-computed averages, resume, the flip merge."""

import json
import math
import shutil

import pytest
import torch
from tiny_shapes import MODEL_OPTS, TRAIN_OPTS, make_tiny_shapes
from torch import nn

import evaluate
import train
from layers.box_coder import BoxCoder
from layers.postprocess import PostProcess
from layers.tta import FlipTTA, merge_flip_outputs
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint
from utils.ema import ModelEMA


def test_ema_follows_the_ramped_decay_by_hand():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    decay, tau = 0.9, 2.0
    ema = ModelEMA(model, decay, tau)
    expected = None
    for step in range(1, 5):
        with torch.no_grad():
            model[0].weight.fill_(float(step))
            model[1].num_batches_tracked.fill_(10 * step)
        ema.update(model)
        d = decay * (1 - math.exp(-step / tau))
        # the first update copies; every later one is e = d * e + (1 - d) * w
        expected = float(step) if expected is None else d * expected + (1 - d) * step
        assert ema.module[0].weight.flatten().tolist() == pytest.approx([expected] * 2, rel=1e-6)
        assert int(ema.module[1].num_batches_tracked) == 10 * step  # integer buffers follow the model
    assert ema.updates == 4
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_load_continues_exactly():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    a = ModelEMA(model, 0.8, 1.0)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        a.update(model)
    b = ModelEMA(nn.Linear(3, 2), 0.8, 1.0)
    b.load(a.module.state_dict(), a.updates)
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update(model)
    b.update(model)
    torch.testing.assert_close(a.module.weight, b.module.weight, rtol=0, atol=0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def _train(data_root, save_root, *extra):
    argv = (
        MODEL_OPTS + TRAIN_OPTS + ["--data_root", data_root, "--save_root", str(save_root), "--run_name", "r"]
    )
    return train.main(train.get_args_parser().parse_args(argv + ["--ema", "--ema_tau", "3", *extra]))


def test_ema_is_checkpointed_validated_resumed_and_evaluated(data_root, tmp_path):
    summary = _train(data_root, tmp_path / "a")
    run_dir = tmp_path / "a" / "r"
    state = load_checkpoint(str(run_dir / "model_000012.pth"))
    assert state["ema_updates"] == 12 and state["model_ema"].keys() == state["model"].keys()
    differs = [k for k in state["model"] if not torch.equal(state["model"][k], state["model_ema"][k])]
    assert differs, "EMA weights equal the trained ones"
    assert "val_ema_voc_map_area" in summary and "val_voc_map_area" in summary
    last = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
    assert "val_ema_voc_map_area" in last

    # Resume from iteration 6: the EMA at 12 is bit for bit the uninterrupted one.
    (tmp_path / "b" / "r").mkdir(parents=True)
    shutil.copy(run_dir / "model_000006.pth", tmp_path / "b" / "r")
    _train(data_root, tmp_path / "b", "--resume", "auto")
    resumed = load_checkpoint(str(tmp_path / "b" / "r" / "model_000012.pth"))
    for key in state["model_ema"]:
        torch.testing.assert_close(resumed["model_ema"][key], state["model_ema"][key], rtol=0, atol=0)

    # Inference runs the EMA weights by default, the trained ones with --eval_weights raw.
    parser = evaluate.get_args_parser()
    for choice, key in (("auto", "model_ema"), ("raw", "model"), ("ema", "model_ema")):
        cli = parser.parse_args(["--checkpoint", str(run_dir / "model_000012.pth"), "--eval_weights", choice])
        model, _, _, _ = build_model_from_checkpoint(cli.checkpoint, cli, parser, torch.device("cpu"))
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], state[key][k]) for k in differs), choice


def test_eval_weights_ema_without_ema_is_an_error(data_root, tmp_path):
    argv = (
        MODEL_OPTS + TRAIN_OPTS + ["--data_root", data_root, "--save_root", str(tmp_path), "--run_name", "r"]
    )
    train.main(
        train.get_args_parser().parse_args(argv + ["--max_iter", "2", "--step_values", "1", "--no_val"])
    )
    parser = evaluate.get_args_parser()
    cli = parser.parse_args(
        ["--checkpoint", str(tmp_path / "r" / "model_000002.pth"), "--eval_weights", "ema"]
    )
    with pytest.raises(ValueError, match="has no EMA weights"):
        build_model_from_checkpoint(cli.checkpoint, cli, parser, torch.device("cpu"))


class _RandomHeadModel(nn.Module):
    """A stand-in detector whose outputs depend on the image content (so flip matters)."""

    def __init__(self, num_columns=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_columns + 4, 3, padding=1)
        self.num_columns = num_columns

    def forward(self, images, targets=None, return_features=False):
        n, _, h, w = images.shape
        out = self.conv(images)  # [N, C + 4, H, W]; one anchor per pixel, two "levels" (rows split)
        out = out.permute(0, 2, 3, 1).reshape(n, h * w, -1)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cx, cy = xs.reshape(-1).float() + 0.5, ys.reshape(-1).float() + 0.5
        anchors = torch.stack([cx - 2, cy - 3, cx + 2, cy + 3], dim=1)
        return {
            "pred_logits": out[..., : self.num_columns] * 3,
            "pred_box_deltas": out[..., self.num_columns :],
            "anchors": anchors,
            "num_anchors_per_level": [h * w // 2, h * w - h * w // 2],
        }


def test_flip_merge_equals_the_union_of_both_passes():
    """With NMS off (threshold 1) and no top-k cut, flip TTA gives exactly the detections of the image
    plus the mirrored detections of its flip."""
    model = _RandomHeadModel().eval()
    images = torch.randn(2, 3, 8, 10)
    targets = [{"size": torch.tensor([8, 10])} for _ in range(2)]
    post = PostProcess(
        BoxCoder(), "softmax", conf_thresh=0.2, pre_nms_topk=10_000, nms_thresh=1.0, max_detections=10_000
    )
    with torch.no_grad():
        merged = post(FlipTTA(model)(images), targets)
        plain = post(model(images), targets)
        flipped = post(model(images.flip(-1)), targets)
    for m, p, f in zip(merged, plain, flipped):
        mirrored = f["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor(
            [10.0, 0, 10, 0]
        )
        union = torch.cat(
            [
                torch.cat([p["boxes"], p["scores"][:, None], p["labels"][:, None].float()], 1),
                torch.cat([mirrored, f["scores"][:, None], f["labels"][:, None].float()], 1),
            ]
        )
        got = torch.cat([m["boxes"], m["scores"][:, None], m["labels"][:, None].float()], 1)
        assert got.shape == union.shape and got.shape[0] > 0
        key = lambda t: t[torch.argsort(t[:, 4] * 1000 + t[:, 0], descending=True)]  # noqa: E731
        torch.testing.assert_close(key(got), key(union), atol=1e-4, rtol=0)


def test_merge_flip_outputs_orders_levels_and_mirrors_anchors():
    anchors = torch.tensor([[0.0, 0, 2, 2], [1, 1, 5, 3], [4, 0, 10, 6]])
    out = {
        "pred_logits": torch.zeros(1, 3, 2),
        "pred_box_deltas": torch.ones(1, 3, 4),
        "anchors": anchors,
        "num_anchors_per_level": [2, 1],
    }
    flip = {
        "pred_logits": torch.ones(1, 3, 2),
        "pred_box_deltas": torch.ones(1, 3, 4),
        "anchors": anchors,
        "num_anchors_per_level": [2, 1],
    }
    merged = merge_flip_outputs(out, flip, image_width=10)
    assert merged["num_anchors_per_level"] == [4, 2]
    expected = torch.tensor(
        [[0.0, 0, 2, 2], [1, 1, 5, 3], [8, 0, 10, 2], [5, 1, 9, 3], [4, 0, 10, 6], [0, 0, 6, 6]]
    )
    torch.testing.assert_close(merged["anchors"], expected)
    assert merged["pred_logits"][0, :, 0].tolist() == [0, 0, 1, 1, 0, 1]
    assert merged["pred_box_deltas"][0, :, 0].tolist() == [1, 1, -1, -1, 1, -1]


def test_tta_refused_for_faster_rcnn():
    args = train.get_args_parser().parse_args(["--arch", "faster_rcnn_fpn", "--tta", "flip"])
    from utils.options import check_common_args, resolve_defaults

    with pytest.raises(SystemExit, match="--tta flip applies to --arch fpn_ohem only"):
        check_common_args(resolve_defaults(args))


def test_evaluate_with_tta_flip(data_root, tmp_path):
    argv = (
        MODEL_OPTS + TRAIN_OPTS + ["--data_root", data_root, "--save_root", str(tmp_path), "--run_name", "r"]
    )
    train.main(
        train.get_args_parser().parse_args(argv + ["--max_iter", "4", "--step_values", "3", "--no_val"])
    )
    ckpt = str(tmp_path / "r" / "model_000004.pth")
    common = ["--checkpoint", ckpt, "--data_root", data_root, "--conf_thresh", "0.0"]
    plain = evaluate.main(
        evaluate.get_args_parser().parse_args(common + ["--save_path", str(tmp_path / "p")])
    )
    flip = evaluate.main(
        evaluate.get_args_parser().parse_args(common + ["--tta", "flip", "--save_path", str(tmp_path / "f")])
    )
    dets_plain = json.load(open(tmp_path / "p" / "detections_model_000004_shapes_val.json"))
    dets_flip = json.load(open(tmp_path / "f" / "detections_model_000004_shapes_val.json"))
    assert dets_plain and dets_flip and dets_plain != dets_flip  # --tta flip reached the model
    assert plain.keys() == flip.keys()
