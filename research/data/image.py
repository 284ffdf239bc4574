"""The one image rule of the repo: split names, ImageNet statistics, the pixel limit, decoding and normalizing.

Every path that turns a file into pixels (scan, clean features, the offline augmentation, the cache, the
ImageFolder loader, serving, predict) goes through `open_rgb` and `resize_square`, so a drawing reads the
same everywhere. torch is imported only inside `normalize`: the scan CLI imports this module and must
start fast. It imports nothing of the project, so every module may import it (the trainer's config reads the
pixel limit here).
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")

# torchvision's ImageNet statistics (RGB, in [0, 1]) that its pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's own default limit (about 89.5 MP): more pixels than this and decoding could exhaust memory.
# Checked on the header by `open_rgb` and `scan`, so a caller who sets Image.MAX_IMAGE_PIXELS=None does not
# switch it off. Pillow raises only above 2 x MAX_IMAGE_PIXELS (between 1x and 2x it merely warns), also for
# sizes found while decoding (an ICO's embedded PNG, GIF frames that grow the canvas): half our limit makes
# every check Pillow makes refuse above exactly MAX_PIXELS, and its warnings at half of it mean nothing here.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS / 2
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

WHITE = (255, 255, 255)  # the drawings' paper: transparent pixels land on it
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

Source = str | Path | bytes | bytearray | memoryview | BinaryIO


class ImageTooLarge(Image.DecompressionBombError):
    """A header claims more than MAX_PIXELS pixels; the pixels were not decoded."""


def check_pixels(width: int, height: int, name: str = "image") -> None:
    """Raise ImageTooLarge when width x height exceeds MAX_PIXELS (a decompression bomb or a mistake)."""
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{name}: header claims {width}x{height} = {width * height:,} pixels "
                            f"(> MAX_PIXELS = {MAX_PIXELS:,}); refused without decoding")


def _source_name(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey -> 8-bit, scaled by the type's range, never the image's own max.

    I;16 and I (how Pillow opens 16-bit PNG/TIFF) divide by 257 (65535 -> 255), so one bright pixel cannot
    darken a grey image; F is taken as [0, 1] (float TIFFs) -> 0..255. A 16-bit colour key becomes alpha.
    """
    arr = np.asarray(im)
    if im.mode == "F":
        out = np.clip(np.nan_to_num(arr.astype(np.float64)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        out = np.clip((arr.astype(np.float64) + 128.0) / 257.0, 0, 255).astype(np.uint8)
    grey = Image.fromarray(out, "L")
    key = im.info.get("transparency")
    if isinstance(key, int) and im.mode != "F":
        alpha = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def to_rgb(im: Image.Image) -> Image.Image:
    """An open image -> a new RGB image under the decode rule (open_rgb without the file and the pixel limit).

    EXIF orientation applied, 16-bit/float scaled by their type's range, transparency (alpha, palette or
    colour key) composited over white, any other mode converted.
    """
    im = ImageOps.exif_transpose(im)  # a new (loaded) image either way
    if im.mode in _INT16_MODES or im.mode in ("I", "F"):
        im = _high_depth_to_8bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")  # palette/L/RGB colour keys and premultiplied modes become plain alpha here
        paper = Image.new("RGBA", rgba.size, WHITE + (255,))
        paper.alpha_composite(rgba)
        return paper.convert("RGB")
    return im.convert("RGB")  # 1, L, P, CMYK (Adobe-inverted JPEGs are undone by Pillow), YCbCr, RGB (a copy)


def open_rgb(source: Source, *, draft: int | None = None) -> Image.Image:
    """Decode `source` (a path, bytes or a binary file) under the one rule; the result is an RGB image.

    The header is checked against MAX_PIXELS before any pixel is decoded (ImageTooLarge). Then: first
    frame of animations, EXIF orientation applied, 16-bit/float scaled by their type's range, alpha,
    palette transparency and colour keys composited over white, every other mode converted to RGB.
    `draft`: JPEGs may decode at a 1/2..1/8 DCT scale that keeps both sides >= draft (fast, for statistics).
    """
    name = _source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        im = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own check (2 x its limit) fired on the header
        raise ImageTooLarge(f"{name}: {exc} (> MAX_PIXELS = {MAX_PIXELS:,}); refused without decoding") from None
    with im:
        check_pixels(*im.size, name=name)
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))
        im.seek(0)
        return to_rgb(im)


def resize_square(im: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Squash `im` to size x size (the whole drawing stays in view, as in the seed's 3x224x224).

    Pillow's bicubic and bilinear filters widen their support when shrinking, so the result is antialiased.
    """
    if interpolation not in RESAMPLE:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if im.size == (size, size):
        return im
    return im.resize((size, size), RESAMPLE[interpolation])


def decode(source: Source, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [size, size, 3] pixels of `source`: resize_square(open_rgb(source))."""
    return np.asarray(resize_square(open_rgb(source), size, interpolation), dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device, dtype):
    """(scale, shift) with x * scale - shift == (x / 255 - mean) / std, shaped [1, C, 1, 1] on `device`."""
    import torch

    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (1.0 / (255.0 * s)).to(device=device, dtype=dtype), (m / s).to(device=device, dtype=dtype)


def normalize(x: torch.Tensor, mean, std, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 NCHW (or CHW) tensor on any device -> float (x / 255 - mean) / std, float32 unless `dtype`.

    mean/std: one value per channel. Their tensors are made once per (values, device, dtype) and cached.
    """
    import torch

    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 tensor (0..255), got {x.dtype}")
    dtype = dtype or torch.float32
    mean = tuple(float(v) for v in (mean.tolist() if isinstance(mean, torch.Tensor) else mean))
    std = tuple(float(v) for v in (std.tolist() if isinstance(std, torch.Tensor) else std))
    channels = x.shape[-3] if x.dim() >= 3 else -1
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize: {len(mean)} means / {len(std)} stds for {channels} channels "
                         f"(x must be NCHW or CHW, shape {tuple(x.shape)})")
    scale, shift = _affine(mean, std, x.device, dtype)
    if x.dim() == 3:
        scale, shift = scale[0], shift[0]
    return torch.addcmul(-shift, x.to(dtype), scale)
