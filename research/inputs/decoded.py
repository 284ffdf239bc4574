"""Decode a dataset version once into uint8 memory-mapped arrays, one per split.

Layout: `data/cache/<version digest[:16]>-<S>px-<interpolation>/` holds `<split>.u8` (raw uint8, shape
[N, S, S, 3], rows in `split_items` order) and `meta.json`. NHWC rows keep one image in one
contiguous block (a gather is one memcpy per image) and `permute(0, 3, 1, 2)` of a batch is
already a channels_last tensor.

Validity: `meta.json` is written last, atomically (tmp + os.replace). A cache is served only
when meta exists, its digest, size, interpolation, classes and per-split path order match the version, and
every array file has exactly the byte size meta records. Anything else (killed mid-write,
truncated copy, a changed version) is rebuilt. A changed digest, size or interpolation is a different directory,
so a stale cache is never even looked at. Byte-level corruption with an intact size is not
detected (hashing gigabytes on every start costs more than it saves).

The decode rule is `research.data.image.decode`, shared with the ImageFolder path (`load_rgb`) and
serving, so all see the same pixels. The interpolation is part of the key: a bicubic and a bilinear
cache of the same version and size are different directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from research import verify
from research.data import image
from research.data.image import SPLITS
from research.data.pool import pmap
from research.errors import ConfigError

CACHE_FORMAT = 2  # bump when the decode rule or the layout changes: old caches are then rebuilt
CHUNK = 64  # images per worker task
INLINE_BELOW = 256  # fewer images than this: decode in this process (a pool costs more than it saves)


# ---------------------------------------------------------------------------------------- decode

# The decode rule is research.data.image's; these names stay for callers outside research/data.
decode = image.decode  # research/registry.py


def load_rgb(path: str | Path, size: int, interpolation: str = "bicubic") -> Image.Image:
    """The ImageFolder path's loader (research/inputs/loaders.py): the cache's pixels as a PIL image."""
    return image.resize_square(image.open_rgb(path), size, interpolation)


# ---------------------------------------------------------------------------------------- layout

def split_items(version, split: str) -> tuple[list[Path], np.ndarray]:
    """Absolute image paths and class indices of one split, sorted by (class index, path).

    This order is the row order of the cache and of the folder dataset, so an index means the
    same image on both paths.
    """
    frame = version.split_frame(split)
    index = {name: i for i, name in enumerate(version.classes)}
    unknown = sorted(set(frame["class"]) - set(index))
    if unknown:
        raise ConfigError(
            f"Version {version.name}: manifest classes {unknown} are not in version.json classes; "
            "rebuild the version with `python -m research split ...`."
        )
    rows = sorted(zip((index[c] for c in frame["class"]), (str(p) for p in frame["path"])))
    paths = [Path(version.dir) / p for _, p in rows]
    labels = np.array([c for c, _ in rows], dtype=np.int64)
    return paths, labels


def cache_dir(version, size: int, root: str | Path = "data/cache", interpolation: str = "bicubic") -> Path:
    digest = str(getattr(version, "digest", "") or "")
    if len(digest) < 16:
        raise ConfigError(
            f"Version {version.name} has no digest ({digest!r}) in version.json, so it cannot be cached "
            "safely; rebuild it with `python -m research split ...` or use loader=folder."
        )
    _check_interpolation(interpolation)
    return Path(root) / f"{digest[:16]}-{size}px-{interpolation}"


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in image.INTERPOLATIONS:
        raise ConfigError(f"interpolation={interpolation!r} is not one of {', '.join(image.INTERPOLATIONS)}.")


def _order_digest(paths: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.relative_to(base).as_posix().encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclasses.dataclass
class Cache:
    dir: Path
    meta: dict[str, Any]
    arrays: dict[str, np.memmap]  # split -> [N, S, S, 3] uint8 (read-only)
    labels: dict[str, np.ndarray]  # split -> [N] int64
    built: bool  # True when this call (re)built it
    build_seconds: float


def _expected(version, size: int, interpolation: str = "bicubic") -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        paths, labels = split_items(version, split)
        splits[split] = {
            "count": len(paths),
            "shape": [len(paths), size, size, 3],
            "bytes": len(paths) * size * size * 3,
            "file": f"{split}.u8",
            "order_sha256": _order_digest(paths, Path(version.dir)),
        }
    return {
        "format": CACHE_FORMAT,
        "digest": version.digest,
        "version": version.name,
        "size": size,
        "interpolation": interpolation,
        "layout": "NHWC uint8",
        "classes": list(version.classes),
        "splits": splits,
    }


def check(path: Path, expected: dict[str, Any]) -> str | None:
    """Why the cache at `path` cannot be served, or None when it can."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "meta.json missing (never built or killed mid-write)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable: {exc}"
    for key in ("format", "digest", "size", "interpolation", "classes"):
        if meta.get(key) != expected[key]:
            return f"{key} changed: cached {meta.get(key)!r}, wanted {expected[key]!r}"
    for split, want in expected["splits"].items():
        got = meta.get("splits", {}).get(split, {})
        for key in ("count", "shape", "bytes", "order_sha256"):
            if got.get(key) != want[key]:
                return f"{split}.{key} changed: cached {got.get(key)!r}, wanted {want[key]!r}"
        file = path / want["file"]
        actual = file.stat().st_size if file.is_file() else -1
        if actual != want["bytes"]:
            return f"{file.name} holds {actual} bytes, meta says {want['bytes']} (partial or truncated)"
    return None


def _decode_chunk(job: tuple[str, tuple[int, ...], int, list[str], int, str]) -> int:
    """Worker: decode `paths` into rows start.. of the memmap at `array_path`."""
    array_path, shape, start, paths, size, interpolation = job
    out = np.memmap(array_path, dtype=np.uint8, mode="r+", shape=shape)
    for i, p in enumerate(paths):
        try:
            out[start + i] = image.decode(p, size, interpolation)
        except Exception as exc:  # name the file: a bare PIL error says nothing about which one
            raise ValueError(f"Cannot decode {p} for the cache: {exc}. Re-run `python -m research clean` "
                             "and `split`, or remove the file from the version.") from exc
    out.flush()
    del out
    return len(paths)


def _build(path: Path, version, size: int, expected: dict[str, Any], workers: int | None, progress: bool,
           interpolation: str) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    jobs = []  # (array path, shape, start, paths, size, interpolation)
    for split in SPLITS:
        paths, _ = split_items(version, split)
        spec = expected["splits"][split]
        file = path / spec["file"]
        shape = tuple(spec["shape"])
        if len(paths):
            np.memmap(file, dtype=np.uint8, mode="w+", shape=shape).flush()  # full size, zero-filled
        else:
            file.touch()
        for start in range(0, len(paths), CHUNK):
            jobs.append((str(file), shape, start, [str(p) for p in paths[start : start + CHUNK]], size, interpolation))
    pmap(_decode_chunk, jobs, workers=workers, progress=progress, label=f"caching {version.name} at {size}px",
         total=sum(len(j[3]) for j in jobs), weight=int, inline_below=INLINE_BELOW, transient=False)
    for split in SPLITS:  # arrays on disk before meta says they are there
        file = path / expected["splits"][split]["file"]
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps({**expected, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    os.replace(tmp, path / "meta.json")


def build_lock(path: Path):
    """One builder per cache directory across processes (parallel sweep workers share caches): the lock every
    output has (`outputs.writing`); a second builder waits for the first, told whose turn it is, and then finds
    the cache built."""
    from research.data import outputs

    return outputs.writing(path, "cache", wait=True)


def ensure_cache(version, size: int, root: str | Path = "data/cache", workers: int | None = None,
                 progress: bool = True, interpolation: str = "bicubic") -> Cache:
    """The valid cache of (version, size, interpolation), building or rebuilding it first when needed."""
    path = cache_dir(version, size, root, interpolation)
    expected = _expected(version, size, interpolation)
    built, seconds = False, 0.0
    with build_lock(path):
        reason = check(path, expected)
        if reason is not None:
            if path.exists() and progress:
                from rich.console import Console

                Console(stderr=True).print(f"[yellow]rebuilding cache {path}: {reason}")
            start = time.perf_counter()
            verify.version_files(version, workers)  # an edited version: one error naming the file, not a decode's
            _build(path, version, size, expected, workers, progress, interpolation)
            seconds = time.perf_counter() - start
            built = True
            reason = check(path, expected)
            if reason is not None:
                raise RuntimeError(f"Cache {path} failed its own check after a build: {reason}")
    meta = json.loads((path / "meta.json").read_text())
    arrays, labels = {}, {}
    for split in SPLITS:
        spec = meta["splits"][split]
        shape = tuple(spec["shape"])
        arrays[split] = (np.memmap(path / spec["file"], dtype=np.uint8, mode="r", shape=shape)
                         if spec["count"] else np.zeros(shape, np.uint8))
        labels[split] = split_items(version, split)[1]
    return Cache(path, meta, arrays, labels, built, seconds)
