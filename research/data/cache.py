"""Decode a dataset version once into uint8 memory-mapped arrays, one per split.

Layout: `data/cache/<version digest[:16]>-<S>px/` holds `<split>.u8` (raw uint8, shape
[N, S, S, 3], rows in `split_items` order) and `meta.json`. NHWC rows keep one image in one
contiguous block (a gather is one memcpy per image) and `permute(0, 3, 1, 2)` of a batch is
already a channels_last tensor.

Validity: `meta.json` is written last, atomically (tmp + os.replace). A cache is served only
when meta exists, its digest, size, classes and per-split path order match the version, and
every array file has exactly the byte size meta records. Anything else (killed mid-write,
truncated copy, a changed version) is rebuilt. A changed digest or size is a different directory,
so a stale cache is never even looked at. Byte-level corruption with an intact size is not
detected (hashing gigabytes on every start costs more than it saves).

The decode rule (`load_rgb`) is shared with the ImageFolder path so both see the same pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from research.config import ConfigError

SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the decode rule or the layout changes: old caches are then rebuilt
WHITE = (255, 255, 255)
RESAMPLE = Image.Resampling.BICUBIC
CHUNK = 64  # images per worker task
INLINE_BELOW = 256  # fewer images than this: decode in this process (a pool costs more than it saves)


# ---------------------------------------------------------------------------------------- decode

def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited over white (the drawings' paper)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, WHITE + (255,))
        paper.alpha_composite(rgba)
        return paper.convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | Path, size: int) -> Image.Image:
    """The one decode rule of both input paths.

    EXIF orientation applied, any mode to RGB with alpha over white, then squashed to
    (size, size) with Pillow's bicubic filter, which widens its support when shrinking
    (antialiased). Squash, not crop: the whole drawing stays in view, as in the seed's 3x224x224.
    """
    with Image.open(path) as im:
        im.seek(0)  # first frame of animations
        im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
    if im.size != (size, size):
        im = im.resize((size, size), RESAMPLE)
    return im


def decode(path: str | Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] pixels of `path` under the decode rule."""
    return np.asarray(load_rgb(path, size), dtype=np.uint8)


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


def cache_dir(version, size: int, root: str | Path = "data/cache") -> Path:
    digest = str(getattr(version, "digest", "") or "")
    if len(digest) < 16:
        raise ConfigError(
            f"Version {version.name} has no digest ({digest!r}) in version.json, so it cannot be cached "
            "safely; rebuild it with `python -m research split ...` or use loader=folder."
        )
    return Path(root) / f"{digest[:16]}-{size}px"


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


def _expected(version, size: int) -> dict[str, Any]:
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
    for key in ("format", "digest", "size", "classes"):
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


def _decode_chunk(array_path: str, shape: tuple[int, ...], start: int, paths: list[str], size: int) -> int:
    """Worker: decode `paths` into rows start.. of the memmap at `array_path`."""
    out = np.memmap(array_path, dtype=np.uint8, mode="r+", shape=shape)
    for i, p in enumerate(paths):
        try:
            out[start + i] = decode(p, size)
        except Exception as exc:  # name the file: a bare PIL error says nothing about which one
            raise ValueError(f"Cannot decode {p} for the cache: {exc}. Re-run `python -m research clean` "
                             "and `split`, or remove the file from the version.") from exc
    out.flush()
    del out
    return len(paths)


def _progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def _build(path: Path, version, size: int, expected: dict[str, Any], workers: int | None, progress: bool) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    jobs = []  # (array path, shape, start, paths)
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
            jobs.append((str(file), shape, start, [str(p) for p in paths[start : start + CHUNK]]))
    total = sum(len(j[3]) for j in jobs)
    workers = workers or os.cpu_count() or 1
    label = f"caching {version.name} at {size}px"
    with _progress() if progress else contextlib.nullcontext() as bar:
        task = bar.add_task(label, total=total) if bar else None
        if workers <= 1 or total < INLINE_BELOW:
            for job in jobs:
                done = _decode_chunk(*job, size)
                if bar:
                    bar.advance(task, done)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                futures = [pool.submit(_decode_chunk, *job, size) for job in jobs]
                for fut in as_completed(futures):
                    done = fut.result()
                    if bar:
                        bar.advance(task, done)
    for split in SPLITS:  # arrays on disk before meta says they are there
        file = path / expected["splits"][split]["file"]
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps({**expected, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    os.replace(tmp, path / "meta.json")


@contextlib.contextmanager
def _lock(path: Path):
    """One builder per cache directory across processes (parallel sweep workers share caches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_cache(version, size: int, root: str | Path = "data/cache", workers: int | None = None,
                 progress: bool = True) -> Cache:
    """The valid cache of (version, size), building or rebuilding it first when needed."""
    path = cache_dir(version, size, root)
    expected = _expected(version, size)
    built, seconds = False, 0.0
    with _lock(path):
        reason = check(path, expected)
        if reason is not None:
            if path.exists() and progress:
                from rich.console import Console

                Console(stderr=True).print(f"[yellow]rebuilding cache {path}: {reason}")
            start = time.perf_counter()
            _build(path, version, size, expected, workers, progress)
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
