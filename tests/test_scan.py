"""scan on a hand-made tree holding every bad kind of file: each is a row with a reason, none is fatal."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from research.data.scan import COLUMNS, inventory_digest, scan


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def bad_tree(tmp_path) -> Path:
    """Two classes; every kind of trouble the issue lists, plus good files in many formats."""
    root = tmp_path / "tree"
    for d in ("a/nested/deeper", "a/.ipynb_checkpoints", "b", "c d ü"):
        (root / d).mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8), "RGB")
    png, jpg = encoded(rgb, "PNG"), encoded(rgb, "JPEG")
    files = {
        "a/good.png": png,
        "a/truncated.png": png[: len(png) // 2],
        "a/truncated.jpg": jpg[: len(jpg) // 2],
        "a/corrupt.png": png[:60] + bytes(200) + png[260:],
        "a/zero.png": b"",
        "a/random.jpg": np.random.default_rng(1).bytes(500),
        "a/notes.txt": b"just some text\n",
        "a/bomb.png": bomb_png(),
        "a/.DS_Store": b"\0\0\0\1Bud1",
        "a/.ipynb_checkpoints/copy.png": png,
        "a/nested/deeper/deep.png": png,
        "b/mode_P.png": encoded(rgb.convert("P"), "PNG"),
        "b/mode_LA.png": encoded(rgb.convert("LA"), "PNG"),
        "b/mode_RGBA.png": encoded(rgb.convert("RGBA"), "PNG"),
        "b/mode_CMYK.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "b/mode_I16.tif": encoded(rgb.convert("L").convert("I;16"), "TIFF"),
        "b/mode_1.png": encoded(rgb.convert("1"), "PNG"),
        "b/anim.gif": encoded(rgb, "GIF"),
        "b/x.bmp": encoded(rgb, "BMP"),
        "b/x.webp": encoded(rgb, "WEBP"),
        "b/rotated.jpg": encoded(rgb, "JPEG", exif=_exif_rotated()),
        "c d ü/猫 with spaces.png": png,
        "labels.csv": b"path,class\n",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    with open(os.path.join(os.fsencode(root / "b"), b"latin1-\xe9t\xe9.png"), "wb") as f:  # a non-UTF-8 name
        f.write(png)
    os.mkfifo(root / "b/pipe")  # reading it would block forever
    os.symlink("..", root / "a/nested/loop")  # a folder link back to an ancestor
    os.symlink("selfloop", root / "b/selfloop")  # a link to itself
    os.symlink("missing.png", root / "b/broken.png")
    os.symlink("../a/good.png", root / "b/linked.png")  # a link to a file is read like the file
    return root


def _exif_rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return exif


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file plus the target of every link, without following folder links."""
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files + dirs:
            p = Path(folder) / name
            if p.is_symlink():
                out[str(p)] = "link->" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not p.is_dir():
                out[str(p)] = "special file"
    return out


def test_every_bad_kind_is_a_row_with_a_reason(bad_tree):
    before = tree_hashes(bad_tree)
    df = scan(bad_tree, progress=False)
    assert list(df.columns) == COLUMNS
    rows = df.set_index("path")
    error = rows["error"].to_dict()
    expect = {
        "a/truncated.png": "truncated", "a/truncated.jpg": "truncated", "a/corrupt.png": "corrupt",
        "a/zero.png": "zero-byte", "a/random.jpg": "not an image", "a/notes.txt": "not an image",
        "a/bomb.png": "decompression bomb", "a/.DS_Store": "hidden", "a/.ipynb_checkpoints/copy.png": "hidden",
        "a/nested/loop": "symlink loop", "b/selfloop": "symlink loop", "b/broken.png": "broken symlink",
        "labels.csv": "not in a class folder",
        "b/latin1-\\xe9t\\xe9.png": "not valid UTF-8", "b/pipe": "not a regular file",
    }
    for path, reason in expect.items():
        assert reason in error[path], (path, error[path])
        assert not rows.loc[path, "ok"]
    good = ["a/good.png", "a/nested/deeper/deep.png", "b/anim.gif", "b/x.bmp", "b/x.webp", "b/linked.png",
            "b/rotated.jpg", "c d ü/猫 with spaces.png"]
    assert rows.loc[good, "ok"].all() and (rows.loc[good, "error"] == "").all()
    modes = {p: rows.loc[p, "mode"] for p in rows.index if p.startswith("b/mode_")}
    assert modes == {"b/mode_P.png": "P", "b/mode_LA.png": "LA", "b/mode_RGBA.png": "RGBA",
                     "b/mode_CMYK.jpg": "CMYK", "b/mode_I16.tif": "I;16", "b/mode_1.png": "1"}
    assert rows.loc[list(modes), "ok"].all()
    # classes are the first folder; nested files belong to it; root files have none
    assert rows.loc["a/nested/deeper/deep.png", "class"] == "a"
    assert rows.loc["c d ü/猫 with spaces.png", "class"] == "c d ü"
    assert rows.loc["labels.csv", "class"] == ""
    # sizes as stored (EXIF orientation is reported, not applied)
    assert tuple(rows.loc["b/rotated.jpg", ["width", "height"]]) == (48, 40)
    assert df.attrs["exif_rotated"] == ["b/rotated.jpg"]
    assert rows.loc["a/good.png", "sha256"] == hashlib.sha256((bad_tree / "a/good.png").read_bytes()).hexdigest()
    assert tree_hashes(bad_tree) == before  # the source tree is byte-identical after the scan


def test_parallel_scan_equals_serial_and_digest_is_order_free(make_tree):
    root = make_tree({"x": ("square", 250), "y": ("photo", 200)}, size=32)
    serial = scan(root, workers=1, progress=False)
    parallel = scan(root, workers=2, progress=False)  # over the inline threshold: uses the pool
    assert serial.equals(parallel)
    assert inventory_digest(serial) == inventory_digest(serial.sample(frac=1, random_state=0))
    (root / "x" / "x_000.png").write_bytes(b"changed")
    assert inventory_digest(scan(root, progress=False)) != inventory_digest(serial)


def test_scan_of_a_missing_folder_names_it(tmp_path):
    from research.errors import ConfigError

    with pytest.raises(ConfigError, match="nope"):
        scan(tmp_path / "nope")


def test_scan_cli_writes_the_inventory(bad_tree, tmp_path):
    out = tmp_path / "inv.csv"
    res = subprocess.run([sys.executable, "-m", "research", "data", "scan", str(bad_tree), "--out", str(out)],
                         capture_output=True, text=True, env=os.environ | {"COLUMNS": "160"})
    assert res.returncode == 0, res.stderr
    assert "decompression bomb" in res.stdout and "inventory digest" in res.stdout
    import pandas as pd

    assert list(pd.read_csv(out, keep_default_na=False).columns) == COLUMNS


def test_help_works():
    for argv in (["--help"], ["data", "--help"], ["data", "scan", "--help"], ["data", "build", "--help"]):
        res = subprocess.run([sys.executable, "-m", "research", *argv], capture_output=True, text=True)
        assert res.returncode == 0 and "usage" in res.stdout, (argv, res.stderr)
