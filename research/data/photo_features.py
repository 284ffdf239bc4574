"""Features that tell a photograph from a drawing, read in one decode per image.

Two views of every image come out of one pass over the files:

- `raw`: the image composited onto white and resized (box filter) to a small square
  (`raw_size`, default 32), flattened to uint8 -- the seed's "raw pixels" and the input to PCA;
- `photo`: handcrafted statistics of the image at its own resolution (nearest-neighbour
  downscale to at most `stat_size` px, never upscaled, so flat colour stays flat and sensor
  noise stays noise). A drawing is a few flat colours with hard edges; a photograph has
  thousands of colours, no exactly flat regions and a lot of gentle gradient.

`photo_score` folds the statistics into one "photo-ness" number (higher = more photo-like):
the mean of the oriented, robustly standardised columns in `SCORE_COLUMNS`.

Known limit: exact-colour statistics read JPEG noise on a flat drawing as texture. On a dev tree
where 10% of the drawings were JPEG (q75, 72-160 px), those drawings scored like photographs;
coarser colours / a flatness tolerance (QUANT_BITS, FLAT_TOL) did not separate them either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from research.data.image import open_rgb
from research.data.pool import pmap, workers_for

RAW_SIZE = 32
STAT_SIZE = 128
QUANT_BITS = 8  # bits per channel when counting colours (lower it for heavily compressed trees)
FLAT_TOL = 0  # neighbours within this many levels (every channel) count as the same colour
SOFT_GRADIENT = 24  # |dx|+|dy| of grey levels below this (and above 0) is texture, not an edge

# name -> direction (+1: larger means more photo-like). These make the photo-ness score.
SCORE_COLUMNS: dict[str, int] = {
    "log_unique_ratio": +1,
    "colour_entropy": +1,
    "top8_mass": -1,
    "flat_fraction": -1,
    "soft_gradient": +1,
}
FEATURE_COLUMNS = [
    *SCORE_COLUMNS,
    "edge_density",
    "saturation_mean",
    "saturation_std",
    "highfreq_ratio",
]


@dataclass
class Features:
    """One row per input path, in input order; `ok` False where the file could not be decoded."""

    raw: np.ndarray  # (n, raw_size*raw_size*3) uint8; zeros where not ok
    stats: pd.DataFrame  # FEATURE_COLUMNS; NaN where not ok
    ok: np.ndarray  # (n,) bool
    errors: list[str]


def raw_pixels(img: Image.Image, size: int = RAW_SIZE) -> np.ndarray:
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8).reshape(-1)


def stat_view(img: Image.Image, size: int = STAT_SIZE) -> np.ndarray:
    """At most `size` px on the long side, nearest neighbour, never upscaled."""
    w, h = img.size
    scale = min(1.0, size / max(w, h))
    if scale < 1.0:
        img = img.resize((max(2, round(w * scale)), max(2, round(h * scale))), Image.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def image_stats(a: np.ndarray) -> dict[str, float]:
    """Colour, flatness, gradient and frequency statistics of an HxWx3 uint8 array.

    Robust to JPEG: colours are counted at QUANT_BITS per channel, "flat" allows FLAT_TOL grey
    levels of difference, and gentle gradient starts above that tolerance, so compression noise
    on a flat-coloured drawing reads as flat, not as photographic texture.
    """
    n = a.shape[0] * a.shape[1]
    q = (a >> (8 - QUANT_BITS)).astype(np.int32)
    codes = (q[..., 0] << (2 * QUANT_BITS)) | (q[..., 1] << QUANT_BITS) | q[..., 2]
    _, counts = np.unique(codes, return_counts=True)
    p = counts / n
    top = np.sort(counts)[::-1][:8].sum() / n
    entropy = float(-(p * np.log2(p)).sum() / max(np.log2(n), 1.0))
    ai = a.astype(np.int16)
    dx = np.abs(np.diff(ai, axis=1)).max(axis=2)[:-1, :]
    dy = np.abs(np.diff(ai, axis=0)).max(axis=2)[:, :-1]
    flat = float(((dx <= FLAT_TOL) & (dy <= FLAT_TOL)).mean())
    grey = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    grad = np.abs(np.diff(grey, axis=1))[:-1, :] + np.abs(np.diff(grey, axis=0))[:, :-1]
    soft = float(((grad > max(0.5, 2 * FLAT_TOL)) & (grad < SOFT_GRADIENT)).mean())
    edges = float((grad >= SOFT_GRADIENT).mean())
    rgb = a.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0)
    return {
        "log_unique_ratio": float(np.log10(len(counts) / n)),
        "colour_entropy": entropy,
        "top8_mass": float(top),
        "flat_fraction": flat,
        "soft_gradient": soft,
        "edge_density": edges,
        "saturation_mean": float(sat.mean()),
        "saturation_std": float(sat.std()),
        "highfreq_ratio": highfreq_ratio(grey),
    }


def highfreq_ratio(grey: np.ndarray) -> float:
    """Share of spectral energy (DC removed) above half the Nyquist radius."""
    g = grey - grey.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    h, w = g.shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - h // 2) / max(h / 2, 1), (xx - w // 2) / max(w / 2, 1))
    total = power.sum()
    return float(power[r > 0.5].sum() / total) if total > 0 else 0.0


def _one(args: tuple[str, int, int]) -> tuple[np.ndarray | None, dict | None, str]:
    path, raw_size, stat_size = args
    try:
        img = open_rgb(path, draft=2 * stat_size)  # JPEG DCT downscale: big JPEGs decode fast
        return raw_pixels(img, raw_size), image_stats(stat_view(img, stat_size)), ""
    except Exception as exc:  # a bad file is a row with ok=False, never a crash
        return None, None, f"{type(exc).__name__}: {exc}"


def extract(
    paths: list[str | Path],
    raw_size: int = RAW_SIZE,
    stat_size: int = STAT_SIZE,
    workers: int | None = None,
    progress: bool = True,
) -> Features:
    """Decode every path once; return raw pixels and photo statistics in input order."""
    jobs = [(str(p), raw_size, stat_size) for p in paths]
    workers = workers_for(workers, cap=8)  # None or 0: every CPU, at most 8
    chunks = max(1, min(64, len(jobs) // (workers * 8) or 1))
    results = pmap(_one, jobs, workers=workers, progress=progress, label="photo features", inline_below=64,
                   chunksize=chunks)
    dim = raw_size * raw_size * 3
    raw = np.zeros((len(jobs), dim), np.uint8)
    rows, ok, errors = [], np.zeros(len(jobs), bool), []
    for i, (pix, stats, err) in enumerate(results):
        if pix is not None:
            raw[i], ok[i] = pix, True
        rows.append(stats or {c: np.nan for c in FEATURE_COLUMNS})
        errors.append(err)
    return Features(raw=raw, stats=pd.DataFrame(rows, columns=FEATURE_COLUMNS), ok=ok, errors=errors)


def standardise(stats: pd.DataFrame, columns: list[str] | None = None) -> np.ndarray:
    """Robust z-scores (median / IQR-scaled) so a long tail of photos cannot set the scale."""
    x = stats[columns or FEATURE_COLUMNS].to_numpy(np.float64)
    med = np.nanmedian(x, axis=0)
    q1, q3 = np.nanpercentile(x, [25, 75], axis=0)
    scale = (q3 - q1) / 1.349
    std = np.nanstd(x, axis=0)
    scale = np.where(scale > 1e-9, scale, np.where(std > 1e-9, std, 1.0))
    return np.nan_to_num((x - med) / scale)


def photo_score(stats: pd.DataFrame) -> np.ndarray:
    """Photo-ness per image: mean of the oriented, robust z-scores of SCORE_COLUMNS (clipped)."""
    z = standardise(stats, list(SCORE_COLUMNS))
    signs = np.array(list(SCORE_COLUMNS.values()), np.float64)
    return np.clip(z * signs, -10, 10).mean(axis=1)
