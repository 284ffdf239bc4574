"""The cache of decoded images: never stale, rebuilt when partial, the interpolation in its key.
32 px images, a few dozen files (the `version` fixture, tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from research.data.image import decode
from research.data.versions import load_version
from research.inputs import decoded

SIZE = 32


def test_cache_invalidates_on_digest_and_size(version, tmp_path, monkeypatch):
    monkeypatch.setattr(decoded, "INLINE_BELOW", 0)  # exercise the process pool once
    root = tmp_path / "cache"
    first = decoded.ensure_cache(version, SIZE, root, workers=2, progress=False)
    assert first.built and first.dir.name == f"{version.digest[:16]}-{SIZE}px-bicubic"
    assert not decoded.ensure_cache(version, SIZE, root, progress=False).built  # served
    other_size = decoded.ensure_cache(version, 40, root, progress=False)
    assert other_size.built and other_size.dir != first.dir and other_size.arrays["train"].shape[1] == 40
    info = json.loads((version.dir / "version.json").read_text())
    info["digest"] = "f" * 64
    (version.dir / "version.json").write_text(json.dumps(info))
    changed = decoded.ensure_cache(load_version(version.dir), SIZE, root, progress=False)
    assert changed.built and changed.dir != first.dir
    # the same images under the same rule: the rebuilt arrays equal the first ones
    np.testing.assert_array_equal(changed.arrays["train"], first.arrays["train"])


def test_interpolation_is_part_of_the_cache_key(version, tmp_path):
    root = tmp_path / "cache"
    bicubic = decoded.ensure_cache(version, SIZE, root, progress=False)
    bilinear = decoded.ensure_cache(version, SIZE, root, progress=False, interpolation="bilinear")
    assert bilinear.built and bilinear.dir != bicubic.dir and bilinear.meta["interpolation"] == "bilinear"
    assert not decoded.ensure_cache(version, SIZE, root, progress=False).built  # the bicubic one is untouched
    path = decoded.split_items(version, "train")[0][0]
    np.testing.assert_array_equal(bilinear.arrays["train"][0], decode(path, SIZE, "bilinear"))
    # a meta that claims another interpolation is not served
    expected = decoded._expected(version, SIZE, "nearest")
    assert "interpolation" in decoded.check(bicubic.dir, expected)
    with pytest.raises(Exception, match="interpolation"):
        decoded.ensure_cache(version, SIZE, root, progress=False, interpolation="lanczos")


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "stale_meta"])
def test_partial_cache_is_rebuilt(version, tmp_path, damage):
    root = tmp_path / "cache"
    good = decoded.ensure_cache(version, SIZE, root, progress=False)
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
    assert decoded.check(good.dir, decoded._expected(version, SIZE)) is not None
    again = decoded.ensure_cache(version, SIZE, root, progress=False)
    assert again.built
    np.testing.assert_array_equal(again.arrays["train"], reference)
