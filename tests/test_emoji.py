"""The embedded dataset builder on a small subset: files, labels.csv, determinism, photo share."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from PIL import Image

from research.data.emoji import LABEL_COLUMNS, PHOTOS, STYLES, build_dataset, load_classmap, photo_path
from tests.conftest import needs_npm_styles

CLASSES = ["animal-reptile", "sky-weather"]


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "emoji"
    build_dataset(out, seed=0, workers=2, classes=CLASSES, limit_per_class=6, progress=False)
    return out


def test_classmap_has_the_twenty_classes_and_no_skin_tones():
    classmap = load_classmap()
    assert len(classmap) == 20 and "sky-weather" in classmap
    sizes = sorted(len(v) for v in classmap.values())
    assert 6 <= sizes[-1] / sizes[0] <= 10  # the real imbalance, about 8x
    assert not any(tone in seq for seqs in classmap.values() for seq in seqs
                   for tone in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"))


@needs_npm_styles
def test_files_and_labels(built):
    with (built / "labels.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == LABEL_COLUMNS
    attribution = (built / "ATTRIBUTION.md").read_text()
    assert attribution.count("CC BY") >= 3 and "Microsoft" in attribution and "Mozilla" in attribution
    for style in STYLES.values():  # every npm style names its package, version and pinned digest
        assert style.npm is None or f"`{style.npm.name}` {style.npm.version}" in attribution
        assert style.npm is None or style.npm.sha256 in attribution
    assert sorted(p.name for p in built.iterdir() if p.is_dir()) == CLASSES
    on_disk = {p.relative_to(built).as_posix() for p in built.rglob("*.png")}
    assert on_disk == {r["path"] for r in rows}
    for cls in CLASSES:
        drawings = [r for r in rows if r["class"] == cls and r["is_photo"] == "0"]
        photos = [r for r in rows if r["class"] == cls and r["is_photo"] == "1"]
        assert {"openmoji", "twemoji", "noto", "fluent-flat", "fluent-hc"} <= {r["style"] for r in drawings}
        assert {r["style"] for r in drawings} <= set(STYLES)
        assert len(drawings) <= 6 * len(STYLES) and len({r["emoji"] for r in drawings}) == 6
        # one group per family and emoji: Fluent's flat and high-contrast renderings of a drawing share it
        assert all(r["family"] == STYLES[r["style"]].family for r in drawings)
        assert all(r["group"] == f"{r['family']}:{r['emoji']}" for r in drawings)
        flat = {r["emoji"] for r in drawings if r["style"] == "fluent-flat"}
        assert flat == {r["emoji"] for r in drawings if r["style"] == "fluent-hc"}
        assert 1 <= len(photos) and len(photos) / (len(photos) + len(drawings)) <= 0.10
        assert all(r["group"].startswith("photo:") and r["style"] == r["family"] == "photo" and r["emoji"] == ""
                   for r in photos)
    sizes = set()
    for r in rows[::3]:
        with Image.open(built / r["path"]) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            assert 72 <= img.width <= 512 and 72 <= img.height <= 512
            assert 0.65 <= img.width / img.height <= 1.45
            sizes.add(img.size)
    assert len(sizes) > len(rows[::3]) // 2  # canvases vary


@needs_npm_styles
def test_same_seed_same_bytes_different_seed_differs(built, tmp_path):
    again = tmp_path / "again"
    build_dataset(again, seed=0, workers=1, classes=CLASSES, limit_per_class=6, progress=False)
    assert _files(again) == _files(built)  # and independent of the worker count
    other = tmp_path / "other"
    build_dataset(other, seed=1, workers=1, classes=CLASSES[:1], limit_per_class=2, progress=False)
    first = {k: v for k, v in _files(built).items() if k in _files(other)}
    assert first and first != {k: _files(other)[k] for k in first}


@needs_npm_styles
def test_rebuild_replaces_a_previous_build_but_not_a_foreign_folder(built, tmp_path):
    from research.errors import ConfigError

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="not a previous build"):
        build_dataset(foreign, classes=CLASSES[:1], limit_per_class=1, progress=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    out = tmp_path / "twice"
    build_dataset(out, classes=CLASSES[:1], limit_per_class=2, progress=False, workers=1)
    build_dataset(out, classes=CLASSES[:1], limit_per_class=1, progress=False, workers=1)
    assert len(list(out.rglob("*.png"))) <= len(STYLES) + 1 and not out.with_name("twice.partial").exists()


def test_unknown_class_names_the_valid_ones(tmp_path):
    from research.errors import ConfigError

    with pytest.raises(ConfigError, match="animal-mammal"):
        build_dataset(tmp_path / "x", classes=["sky & weather"], progress=False)


def test_every_photo_ships_offline():
    for name in PHOTOS:
        with Image.open(photo_path(name)) as img:
            assert min(img.size) >= 300, name


@needs_npm_styles
def test_a_build_of_fewer_styles_is_another_dataset(built, tmp_path):
    """--styles: only those styles, named in labels.csv; the same drawings as the full build's, byte for byte."""
    out = tmp_path / "three"
    rows = build_dataset(out, seed=0, workers=1, classes=CLASSES, limit_per_class=6, progress=False,
                         styles=["noto", "openmoji", "twemoji"])
    assert {r["style"] for r in rows} == {"openmoji", "twemoji", "noto", "photo"}
    full = _files(built)
    drawings = {k: v for k, v in _files(out).items() if k.endswith(".png") and "/photo_" not in k}
    assert drawings and all(full[k] == v for k, v in drawings.items())


def test_unknown_style_names_the_valid_ones(tmp_path):
    from research.errors import ConfigError

    with pytest.raises(ConfigError, match="fluent-hc"):
        build_dataset(tmp_path / "x", styles=["fluent"], progress=False)


@needs_npm_styles
def test_the_monochrome_styles_draw_in_one_dark_ink(built):
    """Fluent's high-contrast set is line art in currentColor: rendered in one dark ink, as Noto's glyphs are:
    every pixel is a blend of the paper and that ink; the flat colour rendering of the same emoji is not."""
    import numpy as np

    def off_the_line(path: Path) -> float:
        """Share of pixels more than 12 levels away from the paper-to-ink line."""
        with Image.open(path) as img:
            px = np.asarray(img.convert("RGB"), float).reshape(-1, 3)
        values, counts = np.unique(px, axis=0, return_counts=True)
        paper, ink = values[counts.argmax()], px[px.sum(1).argmin()]
        d = ink - paper
        a = np.clip((px - paper) @ d / (d @ d), 0, 1)
        return float((np.linalg.norm(px - paper - a[:, None] * d, axis=1) > 12).mean())

    for style in ("fluent-hc", "noto"):
        assert all(off_the_line(p) < 0.01 for p in built.rglob(f"*/{style}_*.png")), style
    assert max(off_the_line(p) for p in built.rglob("*/fluent-flat_*.png")) > 0.05
