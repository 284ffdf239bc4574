"""Model factory: the VGG16_v2 head matches the spec, every name builds, pretrained fails offline fast."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from research.errors import ConfigError
from research.models import build_model, weights_source


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at empty folders (so no test can find or fetch weights)."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_vgg16_v2_head_matches_the_spec():
    model = build_model("vgg16_v2", num_classes=20)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size == (7, 7)
    head = list(model.classifier)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in linears]
    assert shapes == [(25088, 4096), (4096, 4096), (4096, 1024), (1024, 1024), (1024, 512), (512, 20)]
    # Linear, ReLU, Dropout(0.5) between every pair of Linear layers; the last Linear ends the head
    assert len(head) == 16 and head[-1] is linears[-1]
    for i in range(5):
        linear, relu, drop = head[3 * i : 3 * i + 3]
        assert isinstance(linear, nn.Linear) and isinstance(relu, nn.ReLU)
        assert isinstance(drop, nn.Dropout) and drop.p == 0.5
    # VGG16 trunk: 13 convs, no batch norm
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.features)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 20) and torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 3), (2, 3)])
def test_folded_first_linear_is_pool_then_linear(hw):
    """Below 128 px VGGv2 folds the 7x7 pool into the first Linear: same outputs, same gradients."""
    from research.models import folded_first_linear

    torch.manual_seed(0)
    linear = nn.Linear(8 * 49, 16).double()
    x = torch.randn(5, 8, *hw, dtype=torch.float64)
    reference = linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, (7, 7)), 1))
    reference.square().sum().backward()
    grads = [p.grad.clone() for p in linear.parameters()]
    linear.zero_grad()
    out = folded_first_linear(linear, x)
    out.square().sum().backward()
    torch.testing.assert_close(out, reference)
    for p, g in zip(linear.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_v2_forward_at_32px_equals_the_pooled_head():
    torch.manual_seed(0)
    model = build_model("vgg16_v2", num_classes=6).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["vgg16_bn_v2", "resnet18", "timm:resnet18"])
def test_models_build_and_forward(name):
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    if name == "vgg16_bn_v2":
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
        widths = [m.out_features for m in model.classifier if isinstance(m, nn.Linear)]
        assert widths == [4096, 4096, 1024, 1024, 512, 5]


def test_torchvision_heads_are_replaced():
    # build on the meta device: only the layer shapes matter here, not 130M initialised weights
    with torch.device("meta"):
        assert build_model("vgg16", 7).classifier[-1].out_features == 7
        assert build_model("resnet50", 7).head.out_features == 7
        assert build_model("resnet101", 7).head.out_features == 7


def test_unknown_model_lists_the_choices():
    with pytest.raises(ConfigError, match="vgg16_v2.*resnet101.*timm:<name>"):
        build_model("vgg19", 20)
    with pytest.raises(ConfigError, match="timm has no model"):
        build_model("timm:not_a_real_net", 20)


@pytest.mark.parametrize("name", ["resnet18", "vgg16_v2", "vgg16_bn_v2", "timm:resnet18"])
def test_pretrained_without_cached_weights_fails_clearly(name, empty_caches):
    with pytest.raises(ConfigError, match="(?s)(not in the local cache|not found offline).*drop --pretrained"):
        build_model(name, 20, pretrained=True)


def test_pretrained_loads_from_the_local_torch_cache(empty_caches, monkeypatch):
    """A resnet18 state dict placed where torchvision's cache keeps it is loaded, head replaced, its digest checked
    against the file's name (torch hub names end in the sha256's first hex digits) and recorded."""
    from research import pretrained

    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    path = empty_caches / "torch" / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    path.parent.mkdir(parents=True)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), path)
    with pytest.raises(ConfigError, match="sha256 mismatch"):  # not the file torchvision's URL names
        build_model("resnet18", 3, pretrained=True)
    digest = pretrained._sha256(path)
    monkeypatch.setattr(pretrained, "expected_cache_digest", lambda p: digest[:8])
    model = build_model("resnet18", 3, pretrained=True)
    assert weights_source(model).sha256 == digest
    assert torch.equal(model.trunk.conv1.weight, source.conv1.weight)
    assert model.head.out_features == 3


def test_head_dropout_is_configurable_where_the_model_has_one():
    with torch.device("meta"):
        v2 = build_model("vgg16_bn_v2", 5, dropout=0.1)
        assert [m.p for m in v2.classifier if isinstance(m, nn.Dropout)] == [0.1] * 5
        assert [m.p for m in build_model("vgg16_v2", 5).classifier if isinstance(m, nn.Dropout)] == [0.5] * 5
        assert all(m.p == 0.2 for m in build_model("vgg16", 5, dropout=0.2).classifier if isinstance(m, nn.Dropout))
        assert build_model("timm:resnet18", 5, dropout=0.3).head[0].p == 0.3
        assert build_model("resnet18", 5, dropout=0.3).head[0].p == 0.3
        assert isinstance(build_model("resnet18", 5).head, nn.Linear)  # no dropout unless asked (torchvision's)


def test_every_config_model_name_has_a_builder():
    from research.config import MODELS
    from research.models import BUILDERS

    assert set(BUILDERS) == set(MODELS)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "timm:mobilenetv3_small_050"])
def test_the_seeds_v2_head_goes_on_any_trunk(name):
    from research.models import V2_HIDDEN

    model = build_model(name, num_classes=4, head="v2").eval()
    widths = [m.out_features for m in model.head if isinstance(m, nn.Linear)]
    assert widths == [*V2_HIDDEN, 4]
    assert model.head[0].in_features == model.num_features
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError, match="vgg16_v2"):
        build_model("vgg16", 4, head="v2")


def test_preprocessing_comes_from_the_model():
    """timm's pretrained config for timm models, torchvision's weights meta for torchvision ones."""
    from research.models import preprocessing

    lite = preprocessing(build_model("efficientnet_lite0", 3))
    assert (lite.image_size, lite.mean, lite.std, lite.interpolation) == (224, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert preprocessing(build_model("efficientnet_lite2", 3)).image_size == 260
    with torch.device("meta"):
        resnet = preprocessing(build_model("resnet18", 3), image_size=64)
    assert resnet.image_size == 64 and resnet.interpolation == "bilinear"
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.std == pytest.approx((0.229, 0.224, 0.225))


def test_a_frozen_trunk_keeps_its_batch_norm_statistics():
    from research.models import set_trunk_frozen, train_mode

    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    set_trunk_frozen(model, True)
    train_mode(model)
    before = model.trunk.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.trunk.bn1.running_mean, before) and model.head.training
    assert all(not p.requires_grad for p in model.trunk.parameters())
    set_trunk_frozen(model, False)
    train_mode(model)
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not torch.equal(model.trunk.bn1.running_mean, before)


@pytest.mark.parametrize("name", ["timm:tf_efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_pretrained_offline_through_either_name(name, empty_caches):
    """With empty caches the ImageNet trunk comes from the installed package, by alias or by timm name."""
    from research.pretrained import imagenet_state_dict

    model = build_model(name, 5, pretrained=True)
    reference = imagenet_state_dict("tf_efficientnet_lite" + name[-1])
    assert torch.equal(model.trunk.conv_stem.weight, reference["conv_stem.weight"])
    assert torch.equal(model.trunk.blocks[2][0].bn1.running_var, reference["blocks.2.0.bn1.running_var"])
    assert model.head.out_features == 5
