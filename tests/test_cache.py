"""The cached input path: same pixels as the folder path, never stale, rebuilt when partial,
deterministic epochs, per-sample augmentation, samplers honoured. 32 px images, a few dozen files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from research.config import AugmentConfig, TrainConfig
from research.data import cache as cache_mod
from research.data.image import decode
from research.data.loaders import BatchAugment, build_loaders, num_batches
from research.data.versions import load_version

from .conftest import draw_image

SIZE = 32
NO_AUG = AugmentConfig(crop_scale_min=1.0, hflip=0.0, rotation=0.0, color_jitter=0.0, grayscale=0.0)
CPU = torch.device("cpu")


def make_version(root: Path, counts: dict[str, dict[str, int]], name: str = "vt", seed: int = 0) -> Path:
    """A version dir as `split` writes it: {split}/{class}/*.png + manifest.csv + version.json.

    Images have mixed sizes and modes (RGB, RGBA with transparency, palette, grayscale) so the
    decode rule is exercised.
    """
    rng = np.random.default_rng(seed)
    vdir = root / name
    rows = []
    kinds = ["square", "circle", "photo"]
    for split, per_class in counts.items():
        for ci, (cls, n) in enumerate(sorted(per_class.items())):
            (vdir / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = draw_image(kinds[(ci + i) % 3], int(rng.integers(24, 64)), rng)
                mode = ["RGB", "RGBA", "P", "L"][i % 4]
                if mode == "RGBA":
                    im = im.convert("RGBA")
                    a = np.asarray(im).copy()
                    a[: a.shape[0] // 3, :, 3] = 0  # a transparent band: must come out white
                    im = Image.fromarray(a, "RGBA")
                else:
                    im = im.convert(mode)
                rel = f"{split}/{cls}/{cls}_{i:03d}.png"
                im.save(vdir / rel)
                rows.append({"path": rel, "class": cls, "split": split, "group": f"{cls}{i}",
                             "sha256": hashlib.sha256((vdir / rel).read_bytes()).hexdigest(),
                             "source_path": rel, "augmented_from": ""})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(vdir / "manifest.csv", index=False)
    classes = sorted({r["class"] for r in rows})
    digest = hashlib.sha256("".join(sorted(r["path"] + r["sha256"] for r in rows)).encode()).hexdigest()
    (vdir / "version.json").write_text(json.dumps({
        "name": name, "recipe": "test", "seed": seed, "classes": classes,
        "counts": {s: dict(c) for s, c in counts.items()}, "source_digest": "x", "digest": digest,
        "image_mode": "RGB"}))
    return vdir


@pytest.fixture
def version(tmp_path):
    counts = {"train": {"a": 24, "b": 6, "c": 9}, "val": {"a": 5, "b": 3, "c": 3}, "test": {"a": 3, "b": 2, "c": 2}}
    return load_version(make_version(tmp_path, counts))


def cfg_for(loader="cached", augment=NO_AUG, **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "vt", "image_size": SIZE, "batch_size": 8, "loader": loader, "augment": augment, **kw})


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


def test_decode_rule_composites_alpha_on_white(tmp_path):
    a = np.zeros((40, 20, 4), np.uint8)
    a[..., 0] = 200
    a[:20, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    px = decode(tmp_path / "x.png", SIZE)
    assert px.shape == (SIZE, SIZE, 3) and px.dtype == np.uint8
    assert (px[-4:] == 255).all()  # transparent -> white paper, not black
    assert abs(int(px[2, 2, 0]) - 200) <= 1 and px[2, 2, 1] <= 1


def test_cache_invalidates_on_digest_and_size(version, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "INLINE_BELOW", 0)  # exercise the process pool once
    root = tmp_path / "cache"
    first = cache_mod.ensure_cache(version, SIZE, root, workers=2, progress=False)
    assert first.built and first.dir.name == f"{version.digest[:16]}-{SIZE}px-bicubic"
    assert not cache_mod.ensure_cache(version, SIZE, root, progress=False).built  # served
    other_size = cache_mod.ensure_cache(version, 40, root, progress=False)
    assert other_size.built and other_size.dir != first.dir and other_size.arrays["train"].shape[1] == 40
    info = json.loads((version.dir / "version.json").read_text())
    info["digest"] = "f" * 64
    (version.dir / "version.json").write_text(json.dumps(info))
    changed = cache_mod.ensure_cache(load_version(version.dir), SIZE, root, progress=False)
    assert changed.built and changed.dir != first.dir
    # the same images under the same rule: the rebuilt arrays equal the first ones
    np.testing.assert_array_equal(changed.arrays["train"], first.arrays["train"])


def test_interpolation_is_part_of_the_cache_key(version, tmp_path):
    root = tmp_path / "cache"
    bicubic = cache_mod.ensure_cache(version, SIZE, root, progress=False)
    bilinear = cache_mod.ensure_cache(version, SIZE, root, progress=False, interpolation="bilinear")
    assert bilinear.built and bilinear.dir != bicubic.dir and bilinear.meta["interpolation"] == "bilinear"
    assert not cache_mod.ensure_cache(version, SIZE, root, progress=False).built  # the bicubic one is untouched
    path = cache_mod.split_items(version, "train")[0][0]
    np.testing.assert_array_equal(bilinear.arrays["train"][0], decode(path, SIZE, "bilinear"))
    # a meta that claims another interpolation is not served
    expected = cache_mod._expected(version, SIZE, "nearest")
    assert "interpolation" in cache_mod.check(bicubic.dir, expected)
    with pytest.raises(Exception, match="interpolation"):
        cache_mod.ensure_cache(version, SIZE, root, progress=False, interpolation="lanczos")


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "stale_meta"])
def test_partial_cache_is_rebuilt(version, tmp_path, damage):
    root = tmp_path / "cache"
    good = cache_mod.ensure_cache(version, SIZE, root, progress=False)
    reference = np.array(good.arrays["train"])
    if damage == "truncate":  # killed mid-copy: the array is shorter than meta says
        with open(good.dir / "train.u8", "r+b") as fh:
            fh.truncate(SIZE * SIZE * 3 * 5)
    elif damage == "no_meta":  # killed before meta.json (written last) existed
        (good.dir / "meta.json").unlink()
    else:
        meta = json.loads((good.dir / "meta.json").read_text())
        meta["size"] = 999
        (good.dir / "meta.json").write_text(json.dumps(meta))
    assert cache_mod.check(good.dir, cache_mod._expected(version, SIZE)) is not None
    again = cache_mod.ensure_cache(version, SIZE, root, progress=False)
    assert again.built
    np.testing.assert_array_equal(again.arrays["train"], reference)


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

    natural = np.bincount(cache_mod.split_items(version, "train")[1], minlength=3) / 39
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
