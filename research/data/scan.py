"""Inventory of a class-per-folder image tree: one row per file, read-only, never fatal.

`scan(root)` walks `root` (class = first path component) and returns a DataFrame with the
columns of `COLUMNS`. Each file is read once: sha256 of its bytes, then Pillow reads the
header (format, mode, size) and checks the file cheaply instead of decoding it in full:

- PNG: `verify()` walks every chunk and checks its CRC (catches truncation and corruption
  without inflating the pixels);
- JPEG: a draft decode at 1/8 scale (reads every entropy-coded byte, so truncation shows);
- anything else (GIF, BMP, TIFF, WebP, ...): a full decode.

Bad files are rows with `ok=False` and a reason in `error`; nothing raises. Decisions:

- Hidden files (name starting with '.', or anywhere under a hidden folder, e.g.
  `.DS_Store`, `._x.jpg`, `.ipynb_checkpoints/`) are listed with ok=False, error 'hidden file'.
- Files directly under root (e.g. `labels.csv`) have class '' and ok=False
  'not in a class folder'; the root's `.research-stage` (the data build's marker) is not listed.
  Nested sub-folders belong to their top-level class.
- Symlinks are never followed into folders (no loops): a link to a folder, a looping link and a
  broken link are each a row with ok=False. A link to a regular file is read like the file.
- Width/height are as stored; an EXIF orientation is not applied (the paths of EXIF-rotated
  JPEG/TIFF/WebP files are listed in `df.attrs['exif_rotated']`).
- Headers claiming more than `MAX_PIXELS` pixels (research.data.image's limit, the same for every decoder)
  are decompression bombs: ok=False, never decoded.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path

from PIL import Image

from research.data.image import MAX_PIXELS
from research.data.outputs import MARKER
from research.data.pool import pmap

COLUMNS = ["class", "path", "format", "mode", "width", "height", "bytes", "sha256", "ok", "error"]

_IN_MEMORY = 64 << 20  # files up to this size are read once into memory; bigger ones stream
_EXIF_ORIENTATION = 0x0112
_CHUNK = 256  # files per task sent to a worker process
_INLINE_BELOW = 400  # fewer files than this: a process pool costs more than it saves


@dataclass
class Row:
    cls: str
    path: str
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    bytes: int = 0
    sha256: str = ""
    ok: bool = False
    error: str = ""
    rotated: bool = False  # EXIF orientation != 1; kept out of the columns (see module doc)


@dataclass
class _Entry:
    """One thing found by the walk: a file to inspect, or a finding already made (error set)."""

    abspath: str
    relpath: str
    cls: str
    error: str = ""
    hidden: bool = False


# ---------------------------------------------------------------- walking


def _posix_name(rel: str) -> tuple[str, str]:
    """The relative path as a printable posix string, plus an error if the name is not UTF-8."""
    try:
        rel.encode("utf-8")
        return rel, ""
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, "file name is not valid UTF-8; rename it"


def _symlink_finding(path: str) -> str:
    """'' when the link points at a regular file (read it like one), else why it is skipped."""
    target = os.readlink(path)
    try:
        st = os.stat(path)  # follows the link
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"symlink loop ({target}); not followed"
        return f"broken symlink -> {target}"
    if stat.S_ISDIR(st.st_mode):
        real = os.path.realpath(path)
        parent_real = os.path.realpath(os.path.dirname(path))
        if parent_real == real or parent_real.startswith(real + os.sep):
            return f"symlink loop: points to its own ancestor folder ({target}); not followed"
        return f"symlink to a folder ({target}); not followed"
    if not stat.S_ISREG(st.st_mode):
        return f"symlink to a non-regular file ({target})"
    return ""


def walk(root: str | Path) -> list[_Entry]:
    """Every file-like entry under root, sorted by path; never follows symlinked folders."""
    root = os.fspath(root)
    entries: list[_Entry] = []
    stack: list[tuple[str, str, bool]] = [(root, "", False)]
    while stack:
        folder, rel_folder, hidden_folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            rel, _ = _posix_name(rel_folder or ".")
            entries.append(_Entry(folder, rel, rel.split("/")[0], f"cannot list folder: {exc.strerror or exc}"))
            continue
        for e in children:
            if not rel_folder and e.name == MARKER:  # a stage's marker (research/data/outputs.py), not data
                continue
            rel = f"{rel_folder}/{e.name}" if rel_folder else e.name
            hidden = hidden_folder or e.name.startswith(".")
            if e.is_dir(follow_symlinks=False):
                stack.append((e.path, rel, hidden))
                continue
            shown, error = _posix_name(rel)
            cls = shown.split("/")[0] if "/" in shown else ""
            if not error and e.is_symlink():
                error = _symlink_finding(e.path)
            elif not error and not e.is_file(follow_symlinks=False):
                error = "not a regular file (fifo, socket or device); not read"
            entries.append(_Entry(e.path, shown, cls, error, hidden))
    entries.sort(key=lambda x: x.relpath)
    return entries


# ---------------------------------------------------------------- one file


def _check_decodes(img: Image.Image) -> None:
    """Cheapest check that the pixel data is all there (see module doc); raises if not."""
    if img.format == "PNG":
        img.verify()
    elif img.format in ("JPEG", "MPO"):
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    else:
        img.load()


def _is_exif_rotated(img: Image.Image) -> bool:
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
    except Exception:  # a broken EXIF block is no reason to fail a readable image
        return False


def inspect_file(entry: _Entry) -> Row:
    """One row for one file; every failure becomes ok=False with a reason."""
    row = Row(entry.cls, entry.relpath)
    if entry.error:
        row.error = entry.error
        return row
    try:
        row.bytes = os.stat(entry.abspath).st_size
        sha = hashlib.sha256()
        with open(entry.abspath, "rb") as f:
            if row.bytes <= _IN_MEMORY:
                data = f.read()
                sha.update(data)
                source: io.BytesIO | str = io.BytesIO(data)
            else:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
                source = entry.abspath
        row.sha256 = sha.hexdigest()
    except OSError as exc:
        row.error = f"cannot read: {exc.strerror or exc}"
        return row
    row.error = _inspect_image(source, row) if row.bytes else "zero-byte file"
    if entry.hidden and not row.error:
        row.error = "hidden file"
    elif entry.hidden:
        row.error = f"hidden file ({row.error})"
    if not row.cls:  # e.g. labels.csv next to the class folders: listed, never an image of a class
        row.error = "not in a class folder"
    row.ok = not row.error
    return row


def _inspect_image(source, row: Row) -> str:
    """Fill format/mode/size from the header and check the data; return '' or the reason."""
    try:
        with Image.open(source) as img:
            row.format, row.mode = img.format or "", img.mode
            row.width, row.height = img.size
            if row.width * row.height > MAX_PIXELS:
                return (f"decompression bomb: header claims {row.width}x{row.height} "
                        f"= {row.width * row.height:,} pixels (> {MAX_PIXELS:,}); not decoded")
            if img.format != "PNG":  # PNG verify() must come first and closes the file
                row.rotated = _is_exif_rotated(img)
            _check_decodes(img)
    except Image.DecompressionBombError as exc:
        return f"decompression bomb: {exc}; not decoded"
    except Image.UnidentifiedImageError:
        return "not an image (Pillow cannot identify it)"
    except Exception as exc:  # any decoder failure is a finding about the file, never fatal
        kind = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        return f"{kind} image: {type(exc).__name__}: {exc}"
    return ""


def _inspect_chunk(entries: list[_Entry]) -> list[Row]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data", "Truncated File Read"
        return [inspect_file(e) for e in entries]


# ---------------------------------------------------------------- the scan


def scan(root: str | Path, workers: int | None = None, progress: bool = True):
    """Inventory of every file under root: a DataFrame with columns `COLUMNS` (see module doc)."""
    import pandas as pd

    root = Path(root)
    if not root.is_dir():
        from research.errors import ConfigError

        raise ConfigError(f"scan: '{root}' is not a folder; pass the root of a class-per-folder tree.")
    entries = walk(root)
    chunks = [entries[i : i + _CHUNK] for i in range(0, len(entries), _CHUNK)]
    done = pmap(_inspect_chunk, chunks, workers=workers, progress=progress, label=f"scan {root}",
                total=len(entries), weight=len, inline_below=_INLINE_BELOW)
    rows: list[Row] = [row for chunk_rows in done for row in chunk_rows]
    records = [astuple(r)[:-1] for r in rows]
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df = df.astype({"width": "int64", "height": "int64", "bytes": "int64", "ok": "bool"})
    df.attrs["exif_rotated"] = [r.path for r in rows if r.rotated]
    return df


def inventory_digest(df) -> str:
    """sha256 over the sorted `path<TAB>sha256` lines: names the exact content of a tree."""
    h = hashlib.sha256()
    for path, sha in sorted(zip(df["path"], df["sha256"])):
        h.update(f"{path}\t{sha}\n".encode("utf-8", "backslashreplace"))
    return h.hexdigest()


def class_summary(df):
    """Per-class table: files, ok, bad, formats, modes, median size, size range, megabytes."""
    import pandas as pd

    rows = []
    for cls, g in df.groupby("class", sort=True):
        good = g[g["ok"]]
        rows.append({
            "class": cls or "(root)",
            "files": len(g),
            "ok": int(g["ok"].sum()),
            "bad": int((~g["ok"]).sum()),
            "formats": _counts(good["format"]),
            "modes": _counts(good["mode"]),
            "median WxH": _wh(good["width"].median(), good["height"].median()) if len(good) else "",
            "range": (f"{_wh(good['width'].min(), good['height'].min())}-"
                      f"{_wh(good['width'].max(), good['height'].max())}") if len(good) else "",
            "MB": round(g["bytes"].sum() / 1e6, 1),
        })
    return pd.DataFrame(rows)


def _wh(w, h) -> str:
    return f"{int(w)}x{int(h)}"


def _counts(series) -> str:
    """'PNG' when all are PNG, else 'PNG 90%, JPEG 10%'."""
    shares = series.value_counts(normalize=True)
    if len(shares) == 1:
        return str(shares.index[0])
    return ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
