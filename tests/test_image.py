"""The one decode rule (research.data.image) on real files: modes, EXIF, bit depths, the pixel limit."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from research.data import image
from research.data.image import (
    INTERPOLATIONS,
    MAX_PIXELS,
    SPLITS,
    ImageTooLarge,
    decode,
    normalize,
    open_rgb,
    resize_square,
)

SIZE = 32


def px(im: Image.Image, xy) -> tuple[int, int, int]:
    return tuple(im.getpixel(xy))


def test_constants():
    assert SPLITS == ("train", "val", "test")
    assert image.IMAGENET_MEAN == (0.485, 0.456, 0.406) and image.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert MAX_PIXELS == 89_478_485  # Pillow's default bomb limit, used by scan, cache, serving and predict
    assert INTERPOLATIONS == ("bicubic", "bilinear", "nearest")


def test_rgba_alpha_is_composited_over_white(tmp_path):
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., 0] = 200
    a[:10, :, 3] = 255  # top opaque, bottom fully transparent
    a[10:, :10, 3] = 128  # bottom-left half transparent
    a[10:, 10:, 3] = 0
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    im = open_rgb(tmp_path / "x.png")
    assert im.mode == "RGB" and im.size == (20, 20)
    assert px(im, (5, 5)) == (200, 0, 0)
    assert px(im, (15, 15)) == (255, 255, 255)  # not black
    r, g, b = px(im, (5, 15))
    assert abs(r - 228) <= 1 and abs(g - 127) <= 1 and g == b  # half red over white


def test_la_and_palette_transparency(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    im = open_rgb(tmp_path / "p.png")
    assert px(im, (1, 1)) == (10, 200, 30) and px(im, (6, 6)) == (255, 255, 255)

    la = Image.merge("LA", (Image.new("L", (4, 4), 50), Image.new("L", (4, 4), 0)))
    la.save(tmp_path / "la.png")
    assert px(open_rgb(tmp_path / "la.png"), (0, 0)) == (255, 255, 255)

    p.save(tmp_path / "p.gif", transparency=0)
    assert px(open_rgb(tmp_path / "p.gif"), (6, 6)) == (255, 255, 255)


def test_16bit_grey_is_scaled_by_its_type_not_its_max(tmp_path):
    a = np.full((16, 16), 32896, np.uint16)  # 50% grey in 16 bits (128 * 257)
    a[0, 0] = 65535  # one bright pixel must not darken the rest
    for suffix in ("png", "tif"):
        Image.fromarray(a).save(tmp_path / f"g16.{suffix}")
        with Image.open(tmp_path / f"g16.{suffix}") as raw:
            assert raw.mode in ("I;16", "I")  # really a 16-bit file
        im = open_rgb(tmp_path / f"g16.{suffix}")
        assert im.mode == "RGB"
        assert px(im, (5, 5)) == (128, 128, 128) and px(im, (0, 0)) == (255, 255, 255)


def test_16bit_dark_image_stays_dark(tmp_path):
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark.png")  # 200/65535: nearly black
    assert px(open_rgb(tmp_path / "dark.png"), (0, 0)) == (1, 1, 1)


def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    a = np.full((8, 8), 0.5, np.float32)
    a[0, 0], a[0, 1], a[0, 2] = 1.0, 0.0, 3.0  # out of range clips
    Image.fromarray(a, "F").save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as raw:
        assert raw.mode == "F"
    im = open_rgb(tmp_path / "f.tif")
    assert px(im, (4, 4)) == (128, 128, 128)
    assert px(im, (0, 0)) == (255,) * 3 and px(im, (1, 0)) == (0,) * 3 and px(im, (2, 0)) == (255,) * 3


def test_cmyk_and_one_bit(tmp_path):
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = px(open_rgb(tmp_path / "c.jpg"), (4, 4))
    assert min(r, g, b) >= 250  # no ink = white paper
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.tif")
    assert px(open_rgb(tmp_path / "red.tif"), (4, 4)) == (255, 0, 0)
    one = Image.new("1", (8, 8), 1)
    one.save(tmp_path / "one.png")
    assert px(open_rgb(tmp_path / "one.png"), (0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    a[:, :20, 0] = 255
    a[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    im = open_rgb(tmp_path / "rot.jpg")
    assert im.size == (20, 40)  # portrait once turned
    top, bottom = px(im, (10, 5)), px(im, (10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # left went to the top


def test_path_bytes_and_file_sources_agree(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    ref = np.asarray(open_rgb(tmp_path / "x.png"))
    for source in (str(tmp_path / "x.png"), data, bytearray(data), io.BytesIO(data)):
        np.testing.assert_array_equal(np.asarray(open_rgb(source)), ref)
    with open(tmp_path / "x.png", "rb") as fh:
        np.testing.assert_array_equal(np.asarray(open_rgb(fh)), ref)


def big_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of width x height white pixels: tiny on disk, huge once decoded."""
    row = b"\0" + b"\xff" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    idat += z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_over_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    data = big_png(20_000, 20_000)  # 400 MP; about 60 kB on disk
    assert len(data) < 1_000_000
    (tmp_path / "big.png").write_bytes(data)
    with pytest.raises(ImageTooLarge, match=r"big.png: .*400000000 pixels.*MAX_PIXELS"):  # Pillow's check fires
        open_rgb(tmp_path / "big.png")
    # Pillow's own check switched off (a caller may do that): the refusal is then ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(tmp_path / "big.png") as im:  # header only: it really is a 20000x20000 image
        assert im.size == (20_000, 20_000)
    for source in (tmp_path / "big.png", data):
        start = time.perf_counter()
        with pytest.raises(ImageTooLarge, match=r"20000x20000 = 400,000,000 pixels.*MAX_PIXELS"):
            open_rgb(source)
        assert time.perf_counter() - start < 1.0  # decoding 400 MP would take seconds
    with pytest.raises(ImageTooLarge, match="big.png"):  # a path source is named in the message
        decode(tmp_path / "big.png", 32)
    assert issubclass(ImageTooLarge, Image.DecompressionBombError)  # scan and callers already catch this


def test_image_at_the_limit_is_fine(tmp_path):
    side = int(MAX_PIXELS**0.5)
    image.check_pixels(side, side)
    with pytest.raises(ImageTooLarge):
        image.check_pixels(side + 1, side + 1)


def test_sizes_pillow_finds_while_decoding_are_held_to_the_same_limit():
    """100 MP is over MAX_PIXELS but under twice Pillow's limit, where Pillow alone only warns. An ICO whose
    directory claims 16x16 shows the real size only while Pillow decodes the PNG inside: it must refuse there."""
    png = big_png(10_000, 10_000)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    for data in (png, ico):
        with pytest.raises(Image.DecompressionBombError, match="100000000 pixels"):
            Image.open(io.BytesIO(data))  # Pillow itself refuses, for the ICO while reading the PNG inside
        with pytest.raises(ImageTooLarge, match="MAX_PIXELS"):
            open_rgb(data)
    assert 2 * Image.MAX_IMAGE_PIXELS == MAX_PIXELS  # Pillow raises above exactly our limit


def test_decode_shape_dtype_and_interpolations(tmp_path):
    checker = (np.indices((64, 48)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([checker] * 3, -1)).save(tmp_path / "c.png")
    out = {}
    for name in INTERPOLATIONS:
        out[name] = decode(tmp_path / "c.png", 16, name)
        assert out[name].shape == (16, 16, 3) and out[name].dtype == np.uint8 and out[name].flags.c_contiguous
    np.testing.assert_array_equal(out["bicubic"], decode(tmp_path / "c.png", 16))  # bicubic is the default
    assert set(np.unique(out["nearest"])) <= {0, 255}  # nearest picks pixels
    assert np.abs(out["bilinear"].astype(int) - 128).max() < 10  # antialiased: the checkerboard averages to grey
    assert np.abs(out["bicubic"].astype(int) - 128).max() < 10
    with pytest.raises(ValueError, match="bicubic, bilinear, nearest"):
        decode(tmp_path / "c.png", 16, "lanczos")


def test_resize_square_squashes_and_keeps_same_size():
    im = Image.new("RGB", (40, 10), (1, 2, 3))
    assert resize_square(im, 20).size == (20, 20)
    assert resize_square(im.resize((20, 20)), 20).size == (20, 20)


def test_normalize_numerics():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    mean, std = image.IMAGENET_MEAN, image.IMAGENET_STD
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize(x[0], mean, std), y[0])  # CHW too
    torch.testing.assert_close(normalize(x, torch.tensor(mean), list(std)), y)
    ends = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    half = normalize(ends, (0.5,) * 3, (0.5,) * 3)  # timm's efficientnet-lite: 0..255 -> [-1, 1]
    torch.testing.assert_close(half, torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    assert normalize(x, mean, std, dtype=torch.float64).dtype == torch.float64
    chl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalize(chl, mean, std), y)


def test_normalize_caches_its_tensors_and_checks_input():
    x = torch.zeros((1, 3, 2, 2), dtype=torch.uint8)
    normalize(x, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    hits = image._affine.cache_info().hits
    normalize(x, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert image._affine.cache_info().hits == hits + 1
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float(), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with pytest.raises(ValueError, match="channels"):
        normalize(x, (0.5,), (0.5,))


def test_decode_rule_composites_alpha_on_white(tmp_path):
    a = np.zeros((40, 20, 4), np.uint8)
    a[..., 0] = 200
    a[:20, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    px = decode(tmp_path / "x.png", SIZE)
    assert px.shape == (SIZE, SIZE, 3) and px.dtype == np.uint8
    assert (px[-4:] == 255).all()  # transparent -> white paper, not black
    assert abs(int(px[2, 2, 0]) - 200) <= 1 and px[2, 2, 1] <= 1
