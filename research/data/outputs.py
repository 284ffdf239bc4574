"""Where a stage may write: never into a source, never over another stage's output.

Every stage that writes calls `check_folder` (or `check_file` for one file, e.g. scan's inventory)
before it writes anything, and `mark` on the folder it writes. Paths are compared after resolving
symlinks. A stage refuses, with a ConfigError that names both paths and the fix, an output that

- lies inside one of its sources, is one, or contains one;
- lies inside the output of a stage (any depth), or next to the images of a source tree;
- exists and was made by another stage, or is a source tree, or holds files no stage made.

A folder made by the same stage may be written again (split asks for --force first). Each stage's
folder carries a `.research-stage` marker naming its stage. Folders written before markers existed,
and the data build's tree (which carries no marker, so that it scans as it always did), are known
by their stage's own files (`SIGNATURES`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from research.errors import ConfigError

MARKER = ".research-stage"
COMMANDS = {"build": "data build", "scan": "data scan", "eda": "eda", "clean": "clean", "split": "split"}
SIGNATURES = {
    "build": ("labels.csv", "ATTRIBUTION.md"),
    "eda": ("summary.json", "formats.csv"),
    "clean": ("clean.json", "manifest.csv"),
    "split": ("version.json", "manifest.csv"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str) -> str:
    """`name` (a version's) if it is a plain folder name (no separators, no '..'), else a ConfigError."""
    if not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"--version {name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                          "(no '/', no '..', not starting with '.'), e.g. v3; --out says where it goes.")
    return name


def stage_of(folder: Path) -> str | None:
    """The stage that made `folder` (its marker, else its stage's own files), or None."""
    marker = folder / MARKER
    if marker.is_file():
        return marker.read_text().strip() or "unknown"
    return next((stage for stage, files in SIGNATURES.items() if all((folder / f).is_file() for f in files)), None)


def mark(folder: Path, stage: str) -> None:
    """Create `folder` (if needed) and mark it as `stage`'s output."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(stage + "\n")


def check_folder(stage: str, out: str | Path, sources: Iterable[str | Path] = ()) -> None:
    """Refuse an output folder `stage` may not write (see the module doc)."""
    out = Path(out)
    _check_place(stage, out, sources)
    made_by = stage_of(out) if out.is_dir() else None
    if made_by == stage:
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{stage}: output {out} is a file, not a folder; choose a folder (--out).")
    if made_by:
        raise ConfigError(f"{stage}: output folder {out} is the output of `{_command(made_by)}`; a stage never "
                          "overwrites another stage's output: choose another --out.")
    names = sorted(os.listdir(out)) if out.is_dir() else []
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        what = "a source tree (it holds images)" if _is_source_tree(out) else f"a folder no stage made ({shown})"
        raise ConfigError(f"{stage}: output folder {out} is {what}, not a previous {stage} output, and is never "
                          "written: choose a new or empty folder (--out).")
    _check_not_among_images(stage, out)


def check_file(stage: str, out: str | Path, sources: Iterable[str | Path], header: str) -> None:
    """Refuse an output file `stage` may not write; an existing file is replaced only if it starts with `header`."""
    out = Path(out)
    _check_place(stage, out, sources)
    if out.is_dir():
        raise ConfigError(f"{stage}: --out {out} is a folder; name a file, e.g. inventory.csv.")
    if not out.exists():
        _check_not_among_images(stage, out)
        return
    with out.open(encoding="utf-8", errors="replace") as f:
        if f.readline().rstrip("\r\n") != header:
            raise ConfigError(f"{stage}: --out {out} exists and is not a previous `{_command(stage)}` output "
                              "(its first line differs); choose another file name.")


def _shown(out: Path) -> str:
    real = out.resolve()
    return str(out) if real == out.absolute() else f"{out} (= {real})"


def _check_place(stage: str, out: Path, sources: Iterable[str | Path]) -> None:
    """Not inside a source nor containing one; not inside a stage's output."""
    real = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        if real == src or src in real.parents:
            raise ConfigError(f"{stage}: output {_shown(out)} is inside the source {source}; a stage never writes "
                              "into its source: write it elsewhere (--out).")
        if real in src.parents:
            raise ConfigError(f"{stage}: output {_shown(out)} contains the source {source}; write it to a folder "
                              "that holds no source (--out).")
    for folder in real.parents:
        made_by = stage_of(folder)
        if made_by:
            raise ConfigError(f"{stage}: output {_shown(out)} lies inside {folder}, the output of "
                              f"`{_command(made_by)}`; a stage never writes into another stage's folder: write it "
                              "elsewhere (--out).")


def _check_not_among_images(stage: str, out: Path) -> None:
    """A new output does not land in a folder of images or a class-per-folder tree (it would read as a class)."""
    home = next((p for p in out.resolve().parents if p.is_dir()), None)
    if home is not None and _is_source_tree(home):
        raise ConfigError(f"{stage}: output {_shown(out)} would land in {home}, which holds images (a source tree, "
                          "where it would read as a class); write it elsewhere (--out).")


def _holds_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES for e in entries)
    except OSError:
        return False


def _is_source_tree(folder: Path) -> bool:
    """Images in it, or a class-per-folder tree: 2+ non-empty sub-folders no stage made, each holding images."""
    if _holds_images(folder):
        return True
    try:
        subs = [p for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith(".") and any(p.iterdir()) and stage_of(p) is None]
    except OSError:
        return False
    return len(subs) >= 2 and all(_holds_images(p) for p in subs)


def _command(stage: str) -> str:
    return f"python -m research {COMMANDS.get(stage, stage)}"
