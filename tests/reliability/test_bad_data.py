"""Fault 1: a class-per-folder tree holding every kind of bad file goes through the whole pipeline.

scan -> eda -> clean -> split -> a 1-epoch train, called as the stage functions. Nothing crashes;
every bad file is reported with its reason (scan's rows, eda's summary, clean's unreadable.csv);
the odd-but-valid images (palette, alpha, CMYK, 16-bit, EXIF-rotated, unicode and spaces in names)
are kept and trained on; the class with one image is refused by the split with a message naming it
and the fix, and excluded the documented way; the source tree is byte-identical afterwards
(contents, names, modes, mtimes and symlink targets of every entry).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from research import configfile
from research.config import TrainConfig
from research.errors import ConfigError
from tests.conftest import draw_image
from tests.reliability import tiny_train_config, tree_fingerprint

pytestmark = pytest.mark.slow

# bad file (path under the root) -> a phrase its reason must hold
BAD = {
    "circles/corrupt.png": "corrupt image",
    "circles/truncated.png": "truncated image",
    "squares/truncated.jpg": "truncated image",
    "squares/zero-byte.png": "zero-byte file",
    "squares/random-bytes.jpg": "not an image",
    "circles/notes.txt": "not an image",
    "squares/bomb 40000x40000.png": "decompression bomb",
    "circles/loop": "symlink loop",
    "squares/self-loop": "symlink loop",
}
ODD_BUT_GOOD = ["circles/palette.png", "circles/alpha.png", "squares/cmyk.jpg", "squares/16-bit.png",
                "stripes café/exif rotated.jpg", "stripes café/ünïcödé 画 name.png"]
LONELY = "lonely"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A 100-byte PNG whose header claims width x height 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_bad_tree(root: Path) -> Path:
    rng = np.random.default_rng(7)
    kinds = {"circles": "circle", "squares": "square", "stripes café": "stripe"}
    for cls, kind in kinds.items():
        (root / cls).mkdir(parents=True)
        for i in range(12):
            draw_image(kind, 48, rng).save(root / cls / f"{cls.split()[0]} {i:02d}.png")
    (root / "empty").mkdir()
    (root / LONELY).mkdir()
    draw_image("circle", 48, rng).save(root / LONELY / "only one.png")

    # odd but valid images: every one a distinct drawing
    draw_image("circle", 48, rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / ODD_BUT_GOOD[0])
    rgba = draw_image("circle", 48, rng).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.asarray(rgba)[..., 0] > 200, 0, 255).astype(np.uint8)))
    rgba.save(root / ODD_BUT_GOOD[1])
    draw_image("square", 48, rng).convert("CMYK").save(root / ODD_BUT_GOOD[2], "JPEG", quality=90)
    grey16 = (np.asarray(draw_image("square", 48, rng).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(root / ODD_BUT_GOOD[3])  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    draw_image("stripe", 48, rng).save(root / ODD_BUT_GOOD[4], "JPEG", exif=exif.tobytes(), quality=90)
    draw_image("stripe", 48, rng).save(root / ODD_BUT_GOOD[5])

    # bad files
    good_png = encoded(draw_image("circle", 48, rng), "PNG")
    idat = good_png.index(b"IDAT")
    corrupt = bytearray(good_png)
    corrupt[idat + 20 : idat + 40] = bytes(b ^ 0xFF for b in corrupt[idat + 20 : idat + 40])
    (root / "circles/corrupt.png").write_bytes(bytes(corrupt))
    (root / "circles/truncated.png").write_bytes(good_png[: len(good_png) // 2])
    jpeg = encoded(draw_image("square", 48, rng), "JPEG", quality=95)
    (root / "squares/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "squares/zero-byte.png").write_bytes(b"")
    (root / "squares/random-bytes.jpg").write_bytes(rng.bytes(2048))
    (root / "circles/notes.txt").write_text("drawn by hand, scanned at 300 dpi\n")
    (root / "squares/bomb 40000x40000.png").write_bytes(bomb_png())
    os.symlink(".", root / "circles/loop")  # a folder link to its own parent: a walk that follows it never ends
    os.symlink("self-loop", root / "squares/self-loop")  # ELOOP
    return root


def test_bad_tree_through_the_pipeline(mlflow_store, tmp_path, monkeypatch):
    from research.data.clean import clean
    from research.data.scan import scan
    from research.data.split import build_version, load_recipe
    from research.eda import run_eda
    from research.train import train

    src = make_bad_tree(tmp_path / "src")
    before = tree_fingerprint(src)
    monkeypatch.chdir(tmp_path)  # data/cache and any other relative output land in tmp

    # scan: one row per file, never raises; each bad file with its reason
    inv = scan(src, workers=1, progress=False).set_index("path")
    for path, reason in BAD.items():
        assert not inv.at[path, "ok"], path
        assert reason in inv.at[path, "error"], (path, inv.at[path, "error"])
    for path in ODD_BUT_GOOD + [f"{LONELY}/only one.png"]:
        assert inv.at[path, "ok"], (path, inv.at[path, "error"])
    assert set(inv.loc[ODD_BUT_GOOD[:4], "mode"]) == {"P", "RGBA", "CMYK", "I;16"}
    assert inv.attrs["exif_rotated"] == [ODD_BUT_GOOD[4]]
    assert set(inv.index[~inv["ok"]]) == set(BAD)
    good = set(inv.index[inv["ok"]])

    # eda: the summary lists the same files with the same reasons
    _, summary = run_eda(src, out=tmp_path / "eda", log=True, progress=False)
    assert {u["path"]: u["error"] for u in summary["unreadable"]} == inv.loc[list(BAD), "error"].to_dict()
    assert summary["n_images"] == len(good)

    # clean: unreadable.csv has every bad file and its reason; every readable image is kept or quarantined
    info = clean(src, out=tmp_path / "clean", log=True, progress=False, workers=1)
    unreadable = pd.read_csv(tmp_path / "clean/unreadable.csv", keep_default_na=False)
    assert dict(zip(unreadable["path"], unreadable["error"])) == inv.loc[list(BAD), "error"].to_dict()
    kept = pd.read_csv(tmp_path / "clean/manifest.csv", keep_default_na=False)
    quarantined = pd.read_csv(tmp_path / "clean/quarantine.csv", keep_default_na=False)
    assert set(kept["path"]) | set(quarantined["path"]) == good
    assert info["n_unreadable"] == len(BAD)

    # split: a class with one image cannot have train/val/test; the error names it and the fix
    with pytest.raises(ConfigError) as err:
        build_version(tmp_path / "clean", "bad", out_root=tmp_path / "versions", progress=False)
    message = str(err.value)
    assert repr(LONELY) in message and f"--exclude-class {LONELY!r}" in message, message
    assert not (tmp_path / "versions/bad").exists()  # a refused build leaves nothing half-written
    version = build_version(tmp_path / "clean", "bad", recipe=load_recipe("v1", {"exclude_classes": [LONELY]}),
                            out_root=tmp_path / "versions", progress=False)
    vinfo = json.loads((version / "version.json").read_text())
    assert vinfo["classes"] == sorted(["circles", "squares", "stripes café"])
    manifest = pd.read_csv(version / "manifest.csv", keep_default_na=False)
    kept_odd = [p for p in ODD_BUT_GOOD if p in set(kept["path"])]
    written = {Path(s).relative_to(src.resolve()).as_posix() for s in manifest["source_path"]}
    assert set(kept_odd) <= written
    for path in manifest["path"]:  # every file of a version decodes to RGB
        with Image.open(version / path) as im:
            assert im.mode == "RGB", path

    # train: one epoch on the version made from the bad tree
    cfg = configfile.from_dict(TrainConfig, tiny_train_config(version, tmp_path / "ckpt", batch_size=8))
    result = train(cfg)
    assert result.status == "FINISHED" and result.epochs_run == 1
    assert mlflow.MlflowClient().get_run(result.run_id).info.status == "FINISHED"

    # the source tree: byte-identical, nothing added, removed, renamed, re-moded or touched
    assert tree_fingerprint(src) == before
    print(f"\n{len(inv)} files scanned, {len(BAD)} bad, {len(good)} readable; clean kept {len(kept)}, "
          f"quarantined {len(quarantined)}; version {vinfo['counts']}; train val F1 {result.best_val_f1:.3f}")
    for path in BAD:
        print(f"  {path}: {inv.at[path, 'error']}")
