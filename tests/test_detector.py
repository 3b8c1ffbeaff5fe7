import logging
import math

import pytest
import torch
import torchvision
from option_helpers import parse_options
from torch import nn

from layers.anchors import AnchorGenerator, predefined_anchor_whs, save_anchor_file
from layers.losses import FocalLoss, MultiBoxLoss
from layers.postprocess import PostProcess
from models import ARCH_BUILDERS, build_fpn_ohem, build_model, count_parameters, model_summary
from models.detector import FPNDetector


def _args(**overrides):
    """train.py's options, resolved, small enough for CPU tests (keywords: more options, by name)."""
    tiny = dict(basenet="resnet18", pretrained="none", fpn_channels=32, num_head_layers=2)
    return parse_options(num_classes=3, **{**tiny, **overrides})


@pytest.fixture(scope="module")
def focal_model():
    torch.manual_seed(0)
    return build_model(_args(loss_type="focal"))[0].eval()


@pytest.fixture(scope="module")
def mbox_model():
    torch.manual_seed(0)
    return build_model(_args())[0].eval()


def _fake_resnet18_file(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_level_sizes_and_anchor_count_at_600():
    model, _, _ = build_model(_args(fpn_channels=64, num_head_layers=1))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 600, 600))
    assert out["grid_sizes"] == [(75, 75), (38, 38), (19, 19), (10, 10), (5, 5)]
    num_anchors = 9 * (75 * 75 + 38 * 38 + 19 * 19 + 10 * 10 + 5 * 5)
    assert num_anchors == 67995
    assert out["num_anchors_per_level"] == [9 * s * s for s in (75, 38, 19, 10, 5)]
    assert out["pred_logits"].shape == (1, num_anchors, 4)  # 3 classes + background
    assert out["pred_box_deltas"].shape == (1, num_anchors, 4)
    assert torch.equal(out["anchors"], model.anchor_generator.anchors_for_input(600, 600))


@pytest.mark.parametrize("size", [(96, 160), (100, 130), (65, 65)])
def test_any_input_size(focal_model, size):
    model = focal_model
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w), return_features=True)
    expected_grids = [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32, 64, 128)]
    assert out["grid_sizes"] == expected_grids
    num_anchors = sum(9 * gh * gw for gh, gw in expected_grids)
    assert out["pred_logits"].shape == (2, num_anchors, 3)  # focal: K columns
    assert out["anchors"].shape == (num_anchors, 4)
    assert torch.equal(out["anchors"], model.anchor_generator.anchors_for_input(h, w))
    assert [tuple(f.shape) for f in out["head_features"]] == [(2, 32, gh, gw) for gh, gw in expected_grids]
    assert "head_features" not in model(torch.randn(1, 3, h, w))


def test_batched_equals_single_on_a_padded_batch(mbox_model):
    model = mbox_model
    torch.manual_seed(1)
    # Two images with different valid sizes, zero-padded to a multiple of 32 as Collate does.
    batch = torch.zeros(2, 3, 64, 96)
    batch[0, :, :64, :90] = torch.randn(3, 64, 90)
    batch[1, :, :50, :96] = torch.randn(3, 50, 96)
    with torch.no_grad():
        together = model(batch)
        for i in range(2):
            alone = model(batch[i : i + 1])
            torch.testing.assert_close(
                together["pred_logits"][i : i + 1], alone["pred_logits"], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                together["pred_box_deltas"][i : i + 1], alone["pred_box_deltas"], atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("pretrained", ["none", "file"])
def test_gradients_reach_every_trainable_parameter(tmp_path, pretrained):
    path = _fake_resnet18_file(tmp_path) if pretrained == "file" else "none"
    model, _, _ = build_model(_args(pretrained=path, shared_heads=1))
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    (out["pred_logits"].sum() + out["pred_box_deltas"].sum()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if pretrained == "none":
        assert not frozen  # from scratch nothing is frozen, whatever --freeze_upto / --freeze_bn say
    else:
        assert {n for n in frozen if not n.startswith(("backbone.stem.", "backbone.layer1."))} == {
            n
            for n, _ in model.named_parameters()
            if n.startswith("backbone.layer")
            and (".bn" in n or "downsample.1" in n)
            and not n.startswith("backbone.layer1.")
        }
        assert all(n.startswith("backbone.") for n in frozen)


def test_resume_builds_the_same_freezing_without_reading_weights(tmp_path):
    args = _args(pretrained=str(tmp_path / "not_there.pth"), freeze_upto=2)
    model, _, _ = build_model(args, load_pretrained=False)
    assert not model.backbone.layer2[0].conv1.weight.requires_grad
    assert model.backbone.layer3[0].conv1.weight.requires_grad
    assert not model.backbone.layer3[0].bn1.weight.requires_grad  # frozen batch norm
    with pytest.raises(FileNotFoundError, match="not_there.pth"):
        build_model(args)


def test_loss_type_selects_criterion_postprocess_and_columns():
    model, criterion, post = build_model(_args(loss_type="mbox"))
    assert isinstance(criterion, MultiBoxLoss) and isinstance(post, PostProcess)
    assert model.head.num_classes == 4 and model.head.score_type == "softmax"
    model, criterion, post = build_model(_args(loss_type="focal"))
    assert isinstance(criterion, FocalLoss)
    assert model.head.num_classes == 3 and model.head.score_type == "sigmoid"
    assert torch.allclose(model.head.cls_pred.bias, torch.full_like(model.head.cls_pred.bias, -math.log(99)))


def test_anchor_sources(tmp_path, caplog):
    model, _, _ = build_model(_args(num_scales=2, aspect_ratios=[1.0]))
    assert model.anchor_generator.num_anchors_per_location == 2
    assert model.head.cls_pred.out_channels == 2 * 4

    whs = [
        torch.tensor([[s, s], [s, 2 * s], [2 * s, s], [3 * s, s]], dtype=torch.float32)
        for s in (20, 40, 80, 160, 320)
    ]
    path = str(tmp_path / "anchors.json")
    save_anchor_file(path, whs, resize_mode="square", input_dim=600)
    model, _, _ = build_model(_args(anchor_type="kmeans", anchor_file=path))
    assert model.anchor_generator.num_anchors_per_location == 4
    torch.testing.assert_close(model.anchor_generator.anchor_whs, torch.stack(whs))

    # Anchors fitted at another input size still load, with a warning naming the option.
    with caplog.at_level(logging.WARNING, logger="models"):
        build_model(_args(anchor_type="kmeans", anchor_file=path, resize_mode="square", input_dim=512))
    assert "input_dim=600" in caplog.text and "512" in caplog.text

    # A checkpoint's anchors win over the options.
    from_checkpoint = predefined_anchor_whs(1, [1.0, 2.0])
    model, _, _ = build_model(
        _args(anchor_type="kmeans", anchor_file=path), anchor_whs_per_level=from_checkpoint
    )
    assert model.anchor_generator.num_anchors_per_location == 2
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape[1] == out["anchors"].shape[0] == 2 * (64 + 16 + 4 + 1 + 1)


def test_state_dict_keys_do_not_depend_on_freezing(tmp_path):
    frozen, _, _ = build_model(_args(pretrained=_fake_resnet18_file(tmp_path)))
    scratch, _, _ = build_model(_args())
    assert frozen.state_dict().keys() == scratch.state_dict().keys()
    scratch.load_state_dict(frozen.state_dict())  # strict: a resumed run can load either


def test_losses_and_detections_end_to_end():
    torch.manual_seed(0)
    for loss_type in ("mbox", "focal"):
        model, criterion, post = build_model(_args(loss_type=loss_type))
        model.train()
        images = torch.randn(2, 3, 64, 128)
        targets = [
            {
                "boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 120.0, 60.0]]),
                "labels": torch.tensor([0, 2]),
                "difficult": torch.zeros(2, dtype=torch.bool),
                "iscrowd": torch.zeros(2, dtype=torch.bool),
                "size": torch.tensor([64, 128]),
                "orig_size": torch.tensor([64, 128]),
                "scale": torch.tensor([1.0, 1.0]),
            },
            {
                "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64),
                "difficult": torch.zeros(0, dtype=torch.bool),
                "iscrowd": torch.zeros(0, dtype=torch.bool),
                "size": torch.tensor([60, 128]),
                "orig_size": torch.tensor([120, 256]),
                "scale": torch.tensor([0.5, 0.5]),
            },
        ]
        losses = criterion(model(images), targets)
        assert set(losses) == {"loss_cls", "loss_box"}
        total = sum(losses.values())
        assert torch.isfinite(total) and total > 0
        total.backward()
        model.eval()
        with torch.no_grad():
            detections = post(model(images), targets)
        assert len(detections) == 2
        # Untrained heads start at foreground probability 0.01 (< conf_thresh 0.05): nothing is detected.
        assert all(len(d["boxes"]) == 0 for d in detections)


def test_arch_dispatch_and_summary(mbox_model):
    assert ARCH_BUILDERS["fpn_ohem"] is build_fpn_ohem and "faster_rcnn_fpn" in ARCH_BUILDERS
    unknown = _args()
    unknown.arch = "yolo"  # not a choice of the parser: a checkpoint's options, say
    with pytest.raises(ValueError, match="--arch"):
        build_model(unknown)
    model = mbox_model
    trainable, frozen = count_parameters(model)
    assert frozen == 0 and trainable == sum(p.numel() for p in model.parameters())
    summary = model_summary(model)
    assert "backbone" in summary and "head" in summary and "total" in summary


def test_mismatched_parts_are_rejected(mbox_model):
    model = mbox_model
    with pytest.raises(ValueError, match="anchors per location"):
        FPNDetector(model.backbone, model.fpn, model.head, AnchorGenerator(predefined_anchor_whs(1, [1.0])))
    with pytest.raises(ValueError, match=r"anchor grids"):
        bad = FPNDetector(
            model.backbone,
            model.fpn,
            model.head,
            AnchorGenerator(predefined_anchor_whs(), strides=(4, 8, 16, 32, 64)),
        )
        bad.eval()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="levels"):
        FPNDetector(
            model.backbone,
            model.fpn,
            model.head,
            AnchorGenerator(predefined_anchor_whs()[:4], strides=(8, 16, 32, 64)),
        )


def test_frozen_bn_stays_frozen_in_the_detector_after_train_and_a_step(tmp_path):
    model, _, _ = build_model(_args(pretrained=_fake_resnet18_file(tmp_path)))
    model.train()
    bns = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    before = {n: (m.running_mean.clone(), m.weight.detach().clone()) for n, m in bns.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    (out["pred_logits"].square().mean() + out["pred_box_deltas"].square().mean()).backward()
    optimizer.step()
    for n, m in bns.items():
        assert not m.training
        assert torch.equal(m.running_mean, before[n][0]) and torch.equal(m.weight, before[n][1]), n


def _parsed(*argv):
    import evaluate
    from utils.options import resolve_defaults

    parser = evaluate.get_args_parser()
    return parser, resolve_defaults(parser.parse_args(list(argv)))


def test_shared_heads_options_build_the_original_heads():
    common = ["--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", "32"]
    for argv, shared, bias in [
        ([], 0, True),
        (["--shared_heads", "1"], 3, True),  # the SH head: 3 shared + 1 per branch
        (["--shared_heads", "7"], 3, True),  # any value > 0, as the original
        (["--num_shared_layers", "2"], 2, True),
        (["--num_shared_layers", "4"], 4, True),
        (["--shared_heads", "1", "--num_head_layers", "2"], 1, True),
        (["--fpn_variant", "original", "--shared_heads", "1"], 3, False),
        (["--fpn_variant", "original", "--bias_heads", "1"], 0, True),
    ]:
        _, args = _parsed(*common, *argv)
        args.num_classes = 3
        model, _, _ = build_model(args)
        head = model.head
        assert head.shared_layers == shared and head.num_layers == args.num_head_layers, argv
        assert (head.cls_tower[0].bias is not None) == bias if len(head.cls_tower) else True, argv
        assert model.fpn.variant == args.fpn_variant


def test_fpn_variant_original_implies_the_originals_training_policy(tmp_path):
    _, args = _parsed("--fpn_variant", "original")
    assert (args.bias_heads, args.bn_mode, args.freeze_upto, args.num_shared_layers) == (0, "eval", 0, 0)
    _, typed = _parsed("--fpn_variant", "original", "--freeze_upto", "1", "--bn_mode", "frozen")
    assert (typed.freeze_upto, typed.bn_mode) == (1, "frozen")  # typed values win
    _, ours = _parsed()
    assert (ours.bias_heads, ours.bn_mode, ours.freeze_upto, ours.fpn_variant) == (1, "frozen", 1, "ours")
    with pytest.raises(SystemExit, match="--train_bn contradicts --bn_mode frozen"):
        _parsed("--train_bn", "--bn_mode", "frozen")
    # Built with loaded weights: nothing frozen, BN statistics in eval mode, its affine params trainable.
    model, _, _ = build_model(_args(pretrained=_fake_resnet18_file(tmp_path), fpn_variant="original"))
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.bn_mode == "eval" and not model.backbone.stem[1].training
    assert model.fpn.variant == "original" and len(model.fpn.output_convs) == 2
    out = model(torch.randn(1, 3, 64, 64))
    (out["pred_logits"].square().mean() + out["pred_box_deltas"].square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_checkpoint_of_the_old_option_layout_keeps_its_head(tmp_path):
    """Before --num_shared_layers, --shared_heads k meant k shared tower layers. A checkpoint written then
    (no num_shared_layers, fpn_variant, bias_heads or bn_mode in its args) loads with that meaning."""
    from utils.checkpoint import args_to_dict, build_model_from_checkpoint, save_checkpoint

    parser, trained = _parsed("--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", "32",
                              "--num_shared_layers", "2", "--num_head_layers", "4")  # fmt: skip
    trained.num_classes = 3
    torch.manual_seed(0)
    model, _, _ = build_model(trained)
    old_args = args_to_dict(trained)
    for key in ("num_shared_layers", "fpn_variant", "bias_heads", "bn_mode"):
        del old_args[key]
    old_args["shared_heads"] = 2  # the old meaning: 2 shared layers of 4
    path = str(tmp_path / "model_000010.pth")
    save_checkpoint({"model": model.state_dict(), "args": old_args, "iteration": 10}, path)

    _, cli = _parsed("--checkpoint", path)
    loaded, _, args, _ = build_model_from_checkpoint(path, cli, parser, torch.device("cpu"))
    assert loaded.head.shared_layers == 2 and args.num_shared_layers == 2 and args.shared_heads == 0
    assert args.fpn_variant == "ours" and args.bias_heads == 1 and args.bn_mode == "frozen"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["pred_logits"], model.eval()(images)["pred_logits"])
    # 3 of 4 shared was the SH head already: it becomes --shared_heads 1.
    from utils.checkpoint import upgrade_saved_args

    assert upgrade_saved_args({"shared_heads": 3, "num_head_layers": 4})["shared_heads"] == 1
    assert upgrade_saved_args({"shared_heads": 1, "num_head_layers": 2})["num_shared_layers"] == 1
