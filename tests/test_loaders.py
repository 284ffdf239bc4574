"""The loaders (research.inputs.loaders): the cached path gives the same pixels as the folder path,
deterministic epochs, per-sample augmentation, samplers honoured. 32 px images, a few dozen files
(the `version` fixture, tests/conftest.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from research.config import AugmentConfig, TrainConfig
from research.inputs import decoded
from research.inputs.loaders import BatchAugment, build_loaders, num_batches
from tests.conftest import draw_image

SIZE = 32
NO_AUG = AugmentConfig(crop_scale_min=1.0, hflip=0.0, rotation=0.0, color_jitter=0.0, grayscale=0.0)
CPU = torch.device("cpu")


def cfg_for(loader="cached", augment=NO_AUG, **kw) -> TrainConfig:
    fields = {"dataset": "vt", "image_size": SIZE, "batch_size": 8, "loader": loader, "augment": augment}
    return TrainConfig(**(fields | kw))


def collect(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def test_cached_and_folder_give_the_same_images(version, tmp_path):
    cached = build_loaders(version, cfg_for("cached"), CPU, cache_root=tmp_path / "cache")
    folder = build_loaders(version, cfg_for("folder"), CPU, cache_root=tmp_path / "cache")
    assert cached.classes == folder.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(cached.train_labels, folder.train_labels)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for split in ("val", "test"):
        xc, yc = collect(getattr(cached, split))
        xf, yf = collect(getattr(folder, split))
        assert torch.equal(yc, yf) and yc.dtype == torch.long
        assert ((xc - xf) * std).abs().mean() < 2 / 255  # in 0..1 pixel units
    # training batches without augmentation: same indices, same pixels (crop is the identity)
    for (xc, yc), (xf, yf) in zip(cached.train.epoch(3), folder.train.epoch(3)):
        assert torch.equal(yc, yf)
        assert ((xc - xf) * std).abs().mean() < 2 / 255



@pytest.mark.parametrize("loader", ["cached", "folder"])
def test_epoch_is_deterministic_across_builds(version, tmp_path, loader):
    aug = AugmentConfig(rotation=10, color_jitter=0.3, grayscale=0.2, mixup=0.2, cutmix=0.5)
    cfg = cfg_for(loader, aug, seed=7, sampler="sqrt")
    one = build_loaders(version, cfg, CPU, cache_root=tmp_path / "cache")
    torch.manual_seed(123)  # the global RNG must not matter
    two = build_loaders(version, cfg, CPU, cache_root=tmp_path / "cache")
    torch.manual_seed(999)
    b1, b2 = list(one.train.epoch(2)), list(two.train.epoch(2))
    assert len(b1) == len(b2) == len(one.train)
    for (x1, y1), (x2, y2) in zip(b1, b2):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert y1.shape == (x1.shape[0], 3) and y1.dtype == torch.float32  # soft targets under mixup/cutmix
    torch.testing.assert_close(y1.sum(1), torch.ones(x1.shape[0]))
    other = list(one.train.epoch(3))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(b1, other))


def test_weighted_sampler_is_honoured(version, tmp_path):
    def class_share(sampler):
        loaders = build_loaders(version, cfg_for(sampler=sampler), CPU, cache_root=tmp_path / "cache")
        seen = torch.cat([y for e in range(6) for _, y in loaders.train.epoch(e)])
        return np.bincount(seen.numpy(), minlength=3) / len(seen)

    natural = np.bincount(decoded.split_items(version, "train")[1], minlength=3) / 39
    shuffle, weighted = class_share("shuffle"), class_share("weighted")
    assert np.abs(shuffle - natural).max() < 0.03  # every image once per epoch (minus a dropped single)
    assert np.abs(weighted - 1 / 3).max() < 0.1  # 24:6:9 drawn about evenly
    assert weighted[0] < natural[0] - 0.2


def test_last_batch_of_one_is_dropped(version, tmp_path):
    assert num_batches(39, 19) == 2 and num_batches(39, 38) == 1 and num_batches(39, 13) == 3
    loaders = build_loaders(version, cfg_for(batch_size=19), CPU, cache_root=tmp_path / "cache")
    sizes = [len(y) for _, y in loaders.train.epoch(0)]
    assert sizes == [19, 19] and len(loaders.train) == 2  # 39 = 19 + 19 + 1: the single is dropped
    assert sum(len(y) for _, y in loaders.val) == 11  # evaluation keeps everything


def test_batch_augment_draws_per_sample_params_and_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    aug = BatchAugment(AugmentConfig(crop_scale_min=0.3, hflip=0.5, color_jitter=0.0), SIZE, CPU)
    img = torch.from_numpy(np.array(draw_image("photo", SIZE, np.random.default_rng(1)))).permute(2, 0, 1)
    batch = img.unsqueeze(0).repeat(16, 1, 1, 1)
    out = aug(batch, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (16, 3, SIZE, SIZE)
    assert len({round(float(o.sum()), 2) for o in out}) == 16  # one image, 16 different views
    # each sample is torchvision's resized_crop (+ flip) with that sample's box
    p = aug.params(16, torch.Generator().manual_seed(0))
    for k in range(16):
        top, left, h, w = (int(p[key][k]) for key in ("top", "left", "h", "w"))
        ref = TF.resized_crop(img.float(), top, left, h, w, [SIZE, SIZE], antialias=False)
        if p["flip"][k]:
            ref = TF.horizontal_flip(ref)
        ref = aug.normalize(ref.unsqueeze(0))[0]
        assert (out[k] - ref).abs().mean() * 0.226 < 1 / 255


def test_channels_last_and_dtypes(version, tmp_path):
    loaders = build_loaders(version, cfg_for(channels_last=True, augment=AugmentConfig()), CPU,
                            cache_root=tmp_path / "cache")
    x, y = next(iter(loaders.train.epoch(0)))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    assert y.dtype == torch.long and x.shape == (8, 3, SIZE, SIZE)
    xv, _ = next(iter(loaders.val))
    assert xv.is_contiguous(memory_format=torch.channels_last)
    assert -2.2 < float(xv.min()) and float(xv.max()) < 2.7  # ImageNet-normalised


def test_rotation_matches_torchvision_rotate():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    aug = BatchAugment(AugmentConfig(crop_scale_min=1.0, hflip=0.0, rotation=30.0, color_jitter=0.0), SIZE, CPU)
    img = torch.from_numpy(np.array(draw_image("square", SIZE, np.random.default_rng(3)))).permute(2, 0, 1)
    full = torch.full((1,), float(SIZE))
    p = aug.params(1, torch.Generator().manual_seed(0))
    p.update(top=torch.zeros(1), left=torch.zeros(1), h=full, w=full, angle=torch.tensor([20.0]))
    out = aug.apply(img.unsqueeze(0), p)
    ref = aug.normalize(TF.rotate(img.float(), 20.0, interpolation=InterpolationMode.BILINEAR, fill=255.0)[None])
    assert (out - ref).abs().mean() * 0.226 < 4 / 255  # same direction, white corners


def stroke_on_paper(size: int = 32) -> torch.Tensor:
    """uint8 [1, 3, S, S]: a dark red vertical stroke, 2 px wide, on white paper."""
    img = torch.full((1, 3, size, size), 255, dtype=torch.uint8)
    img[:, 0, :, 15:17], img[:, 1:, :, 15:17] = 120, 10
    return img


def style_only(**style) -> BatchAugment:
    from research.config import AugmentConfig

    return BatchAugment(AugmentConfig(crop_scale_min=1.0, hflip=0.0, color_jitter=0.0, **style), 32,
                        torch.device("cpu"), mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


def test_style_augmentations_change_pen_and_paper_not_the_drawing():
    img = stroke_on_paper()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = style_only()
    assert not {"hue", "line", "paper"} & set(plain.params(1, g()))  # off: nothing drawn, old streams unchanged
    same = plain(img, g())
    dark = lambda x: int((x.amin(1) < 128).sum())  # noqa: E731
    thick, thin = style_only(line_weight=1.0), style_only(line_weight=1.0)
    p_thick = thick.params(1, g()) | {"line": torch.tensor([1])}
    p_thin = thin.params(1, g()) | {"line": torch.tensor([-1])}
    assert dark(thick.apply(img, p_thick)) > dark(same) > dark(thin.apply(img, p_thin))  # 4, 2 and 0 px wide

    paper = style_only(background=1.0)
    out = paper(img, g())
    chosen = paper.params(1, g())["paper"][0]
    torch.testing.assert_close(out[0, :, 0, 0], chosen, atol=1e-3, rtol=0)  # the paper took the drawn colour
    torch.testing.assert_close(out[0, :, :, 15:17], same[0, :, :, 15:17])  # the stroke did not

    hue = style_only(hue=1.0)
    p = hue.params(1, g()) | {"hue": torch.tensor([math.pi / 2])}
    turned = hue.apply(img, p)
    assert not torch.allclose(turned[0, :, 0, 15], same[0, :, 0, 15], atol=5)  # another colour of stroke...
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1)
    assert float((turned[0, :, 0, 15:16] * luma).sum()) == pytest.approx(float((same[0, :, 0, 15:16] * luma).sum()),
                                                                            abs=1.0)  # ...of the same lightness
