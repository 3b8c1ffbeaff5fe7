import os

import pytest
import torch
import torchvision
from torch import nn

from models.backbone import ResNetBackbone, imagenet_weights_path

# (C3, C4, C5) channels per network, from the torchvision definitions.
CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "resnet152": [512, 1024, 2048],
}


@pytest.mark.parametrize("name", list(CHANNELS))
def test_levels_channels_and_strides(name):
    backbone = ResNetBackbone(name, pretrained="none", freeze_upto=0, freeze_bn=False).eval()
    assert backbone.out_channels == CHANNELS[name]
    assert backbone.strides == [8, 16, 32]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    expected = [(1, c, 64 // s, 64 // s) for c, s in zip(CHANNELS[name], (8, 16, 32))]
    assert [tuple(f.shape) for f in features] == expected


def test_non_square_and_odd_sizes_round_up():
    backbone = ResNetBackbone("resnet18", pretrained="none", freeze_upto=0, freeze_bn=False).eval()
    with torch.no_grad():
        for h, w in ((96, 160), (100, 130), (75, 33)):
            sizes = [tuple(f.shape[-2:]) for f in backbone(torch.randn(2, 3, h, w))]
            assert sizes == [(-(-h // s), -(-w // s)) for s in (8, 16, 32)]


def test_return_levels_with_c2():
    backbone = ResNetBackbone("resnet50", pretrained="none", return_levels=(2, 3, 4, 5), freeze_upto=0).eval()
    assert backbone.out_channels == [256, 512, 1024, 2048]
    assert backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    # Only what is used is kept: C2..C3 need no layer3/layer4.
    short = ResNetBackbone("resnet18", pretrained="none", return_levels=(2, 3))
    assert short.layer3 is None and short.layer4 is None
    with pytest.raises(ValueError, match="return_levels"):
        ResNetBackbone("resnet18", pretrained="none", return_levels=(5, 3))


def _fake_weights(tmp_path, name="resnet18", prefix=""):
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, name)(weights=None)
    # Non-trivial batch-norm statistics, so that "unchanged" is a real check.
    for m in resnet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    state_dict = {prefix + k: v for k, v in resnet.state_dict().items()}
    path = str(tmp_path / f"{name}.pth")
    torch.save(state_dict, path)
    return path, resnet.state_dict()


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_from_path_gives_the_file_weights(tmp_path, prefix):
    path, reference = _fake_weights(tmp_path, prefix=prefix)
    backbone = ResNetBackbone("resnet18", pretrained=path)
    own = backbone.state_dict()
    mapping = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    compared = 0
    for key, value in own.items():
        ref_key = key
        for ours, theirs in mapping.items():
            ref_key = ref_key.replace(ours, theirs)
        assert torch.equal(value, reference[ref_key]), key
        compared += 1
    assert compared == len([k for k in reference if not k.startswith("fc.")])


def test_wrong_file_is_a_clear_error(tmp_path):
    path, _ = _fake_weights(tmp_path, name="resnet34")
    with pytest.raises(ValueError, match=r"resnet34\.pth.*does not fit a torchvision resnet18.*unexpected"):
        ResNetBackbone("resnet18", pretrained=path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ResNetBackbone("resnet18", pretrained=str(tmp_path / "nowhere.pth"))


def test_missing_imagenet_weights_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = os.path.join(str(tmp_path / "hub"), "checkpoints", "resnet18-f37072fd.pth")
    assert imagenet_weights_path("resnet18") == expected
    with pytest.raises(FileNotFoundError) as info:
        ResNetBackbone("resnet18", pretrained="imagenet")
    message = str(info.value)
    assert expected in message and "--pretrained PATH" in message and "--pretrained none" in message

    # Once the file is in the cache it is used (no download).
    path, reference = _fake_weights(tmp_path)
    os.makedirs(os.path.dirname(expected))
    os.rename(path, expected)
    backbone = ResNetBackbone("resnet18", pretrained="imagenet")
    assert backbone.weights_path == expected
    assert torch.equal(backbone.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])


def _bn_modules(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_frozen_bn_and_stages_survive_train_mode_and_an_sgd_step(tmp_path):
    path, _ = _fake_weights(tmp_path)
    backbone = ResNetBackbone("resnet18", pretrained=path, freeze_upto=1, freeze_bn=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    assert all(not m.training for m in _bn_modules(backbone).values())
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        loss = sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64)))
        loss.backward()
        optimizer.step()
    bn_prefixes = tuple(n + "." for n in _bn_modules(backbone))
    for key, value in backbone.state_dict().items():
        frozen = key.startswith(("stem.", "layer1.") + bn_prefixes)
        if frozen:
            assert torch.equal(value, before[key]), f"{key} changed"
        else:
            assert not torch.equal(value, before[key]), f"{key} did not train"
    for name, param in backbone.named_parameters():
        assert param.requires_grad == (
            not name.startswith(("stem.", "layer1.")) and ".bn" not in name and "downsample.1" not in name
        ), name


def test_train_bn_with_pretrained_weights_updates_statistics_outside_frozen_stages(tmp_path):
    path, _ = _fake_weights(tmp_path)
    backbone = ResNetBackbone("resnet18", pretrained=path, freeze_upto=2, freeze_bn=False).train()
    bns = _bn_modules(backbone)
    assert bns["layer3.0.bn1"].training and bns["layer3.0.bn1"].weight.requires_grad
    # Batch norm inside a frozen stage stays frozen even when batch norm is trained elsewhere.
    assert not bns["layer2.0.bn1"].training and not bns["layer2.0.bn1"].weight.requires_grad
    assert not bns["stem.1"].training
    mean_l2 = bns["layer2.0.bn1"].running_mean.clone()
    mean_l3 = bns["layer3.0.bn1"].running_mean.clone()
    with torch.no_grad():
        backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(bns["layer2.0.bn1"].running_mean, mean_l2)
    assert not torch.equal(bns["layer3.0.bn1"].running_mean, mean_l3)


def test_from_scratch_trains_everything():
    backbone = ResNetBackbone("resnet18", pretrained="none", freeze_upto=0, freeze_bn=False).train()
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(m.training for m in _bn_modules(backbone).values())
    # eval() still reaches batch norm.
    backbone.eval()
    assert all(not m.training for m in _bn_modules(backbone).values())


def test_bn_mode_eval_keeps_statistics_and_trains_affine_params_and_every_conv(tmp_path):
    """The original's policy (set_bn_eval on the base net, every parameter in the optimizer): running
    statistics fixed, BN weight and bias and all convs, the stem's included, trained."""
    path, _ = _fake_weights(tmp_path)
    backbone = ResNetBackbone("resnet18", pretrained=path, freeze_upto=0, bn_mode="eval")
    assert backbone.bn_mode == "eval" and not backbone.freeze_bn
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    assert all(not m.training for m in _bn_modules(backbone).values())
    assert all(p.requires_grad for p in backbone.parameters())
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    loss = sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64)))
    loss.backward()
    optimizer.step()
    for key, value in backbone.state_dict().items():
        statistic = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(value, before[key]) == statistic, key
    assert "stem.0.weight" in before and "stem.1.weight" in before  # the stem conv and its BN trained
    with pytest.raises(ValueError, match="bn_mode"):
        ResNetBackbone("resnet18", pretrained="none", bn_mode="sync")
