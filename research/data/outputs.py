"""Where a stage may write or delete: one guard for every path, never a source, never another stage's files.

Every command that writes files goes through this module, and nothing else decides where it writes:

- `check_folder(stage, out, sources)` (or `check_file` for one file, e.g. scan's inventory) before it writes
  anything: the output folder, symlinks resolved, may not be or lie inside a source, contain one, lie inside
  another stage's output (any depth) or among a source's images, and an existing one must be this stage's;
- `output_path(out, rel)` for every file it writes inside that folder: each part of `rel` a plain name, and the
  path, symlinks resolved, strictly inside `out` (a class name `../../raw/x` from a CSV never leaves it);
- `remove_own(folder, stage)` for every folder it deletes or replaces: it deletes only the files the stage's
  marker lists (what it wrote), and refuses, naming them, when the folder holds anything else;
- `plain_name(value, what)` for every name read from a CSV (a class, a file name) before it becomes a path.

Each stage's folder carries a `.research-stage` marker: JSON with the stage and, for the stages that replace
their folder (`data build`, `split`), the files it wrote. Folders written before markers existed, or before
markers held a file list, are known by their stage's own files (`SIGNATURES`), and their file list is the
stage's own index (`INDEXES`: the version's manifest.csv, the build's labels.csv).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from research.errors import ConfigError

MARKER = ".research-stage"
COMMANDS = {"build": "data build", "scan": "data scan", "eda": "eda", "clean": "clean", "split": "split",
            "report": "report"}
SIGNATURES = {
    "build": ("labels.csv", "ATTRIBUTION.md"),
    "eda": ("summary.json", "formats.csv"),
    "clean": ("clean.json", "manifest.csv"),
    "split": ("version.json", "manifest.csv"),
    "report": ("report.json", "report.md"),
}
INDEXES = {"build": "labels.csv", "split": "manifest.csv"}  # (file, its `path` column) lists what the stage wrote
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS): longer is ENAMETOOLONG
SHOWN = 5  # unknown files named in a refusal


def check_name(name: str) -> str:
    """`name` (a version's) if it is a plain folder name (no separators, no '..'), else a ConfigError."""
    if not PLAIN_NAME.fullmatch(name) or ".." in name or len(name.encode()) > NAME_MAX:
        raise ConfigError(f"--version {name[:80]!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                          f"(no '/', no '..', not starting with '.', at most {NAME_MAX} bytes), e.g. v3; --out says "
                          "where it goes.")
    return name


def plain_name(value: object, what: str) -> str:
    """`value` if it can be one file or folder name: not empty, '.' or '..', no '/', '\\', NUL or control
    character, at most 255 bytes; else a ConfigError naming `what` (e.g. "class 'x' in clean/manifest.csv")."""
    name = value if isinstance(value, str) else ""
    bad = ("empty" if not name.strip() else "'.' or '..'" if name in (".", "..") else
           "a path ('/' or '\\')" if "/" in name or "\\" in name else
           "a control character" if any(unicodedata.category(c) == "Cc" for c in name) else
           f"longer than {NAME_MAX} bytes" if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX else "")
    if not isinstance(value, str):
        bad = f"not text ({type(value).__name__})"
    if bad:
        raise ConfigError(f"{what}: {str(value)[:80]!r} is {bad}, not a plain file or folder name, and would be "
                          "written outside its folder; fix that row (a class is one folder name, a file one file "
                          "name) and rerun.")
    return name


def relative_path(value: object, what: str) -> str:
    """`value` if it is a relative '/'-separated path of plain names (`plain_name` each), e.g. 'heart/a.png'."""
    text = value if isinstance(value, str) else ""
    if not text or text.startswith("/") or re.match(r"[A-Za-z]:", text):
        raise ConfigError(f"{what}: {str(value)[:80]!r} is not a relative path (it is empty or absolute); paths in "
                          "it are relative to the source root, e.g. heart/a.png. Fix that row and rerun.")
    for part in text.split("/"):
        plain_name(part, what)
    return text


# ------------------------------------------------------------------------------ markers and what they record

def _marker(folder: Path) -> dict | None:
    """The marker's content ({'stage', 'files'?}); an old plain-text marker is {'stage': its text}."""
    try:
        text = (folder / MARKER).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return {"stage": "unknown"}
        return data if isinstance(data, dict) else {"stage": "unknown"}
    return {"stage": text.strip() or "unknown"}


def stage_of(folder: Path) -> str | None:
    """The stage that made `folder` (its marker, else its stage's own files), or None."""
    if (folder / MARKER).is_file():
        return str((_marker(folder) or {}).get("stage") or "unknown")
    return next((stage for stage, files in SIGNATURES.items() if all((folder / f).is_file() for f in files)), None)


def mark(folder: Path, stage: str, files: Iterable[str] | None = None) -> None:
    """Create `folder` (if needed) and mark it as `stage`'s output; `files` (relative paths) is what the stage
    wrote there, the only files `remove_own` may delete later. The marker is replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    text = stage + "\n"  # the plain form (all markers had it before file lists): a stage that never deletes
    if files is not None:
        text = json.dumps({"stage": stage, "files": sorted(set(files) - {MARKER})}, indent=0, ensure_ascii=False)
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def recorded_files(folder: Path, stage: str) -> set[str]:
    """The files `stage` wrote in `folder`: its marker's list, else (a folder from before markers held one) the
    paths its own index lists (manifest.csv, labels.csv) and its fixed files; empty if it recorded none."""
    listed = (_marker(folder) or {}).get("files")
    if isinstance(listed, list):
        return {str(f) for f in listed}
    index = INDEXES.get(stage)
    if index is None or not (folder / index).is_file():
        return set()
    import csv

    with (folder / index).open(encoding="utf-8", errors="replace", newline="") as f:
        paths = {row.get("path") or "" for row in csv.DictReader(f)}
    return (paths - {""}) | set(SIGNATURES.get(stage, ())) | {index}


def unknown_files(folder: Path, stage: str, entries: Iterable[tuple[str, bool]] | None = None) -> list[str]:
    """Entries under `folder` (symlinks not followed, a symlink is an entry) that `stage` did not write."""
    own = recorded_files(folder, stage) | {MARKER}
    dirs = {p for f in own for p in _ancestors(f)}
    unknown = []
    for rel, is_dir in _entries(folder) if entries is None else entries:
        if rel.startswith(MARKER + ".tmp-"):  # a marker being replaced when its stage was killed
            continue
        if (rel not in dirs) if is_dir else (rel not in own):
            unknown.append(rel + ("/" if is_dir else ""))
    return sorted(unknown)


def remove_own(folder: str | Path, stage: str, what: str = "") -> None:
    """Delete `folder` if it holds only what `stage` wrote there (`recorded_files`), entry by entry; refuse,
    naming the other files, otherwise (`check_removable`). `what` names the folder, e.g. 'the previous build'."""
    folder = Path(folder)
    entries = check_removable(folder, stage, what)
    if entries is None:
        return
    for rel, is_dir in sorted(entries, key=lambda e: -e[0].count("/")):  # deepest first: files, then their folder
        path = folder / rel
        path.rmdir() if is_dir else path.unlink()
    folder.rmdir()


def check_removable(folder: Path, stage: str, what: str = "") -> list[tuple[str, bool]] | None:
    """A ConfigError unless `folder` is absent, empty, or holds only what `stage` wrote there; else its
    entries (relative path, is a folder), or None when it does not exist."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        raise ConfigError(f"{stage}: {folder} is {'a symlink' if folder.is_symlink() else 'a file'}, not a folder "
                          f"`{_command(stage)}` wrote; it is never deleted: move it away or choose another --out.")
    made_by = stage_of(folder)
    entries = list(_entries(folder))
    if made_by != stage and entries:
        raise ConfigError(f"{stage}: {what or folder} ({folder}) was not written by `{_command(stage)}`"
                          f"{f' but by `{_command(made_by)}`' if made_by else ''}; it is never deleted: move it "
                          "away or choose another --out.")
    unknown = unknown_files(folder, stage, entries)
    if unknown:
        shown = ", ".join(unknown[:SHOWN]) + (f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else "")
        raise ConfigError(f"{stage}: {what or 'the folder'} {folder} holds {len(unknown)} file(s) that "
                          f"`{_command(stage)}` did not write ({shown}); it would have to delete them to replace the "
                          "folder, and it never deletes what it did not write: move them out (or delete them "
                          "yourself) and rerun, or choose another --out.")
    return entries


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _entries(folder: Path) -> Iterable[tuple[str, bool]]:
    """(relative path, is a real folder) of everything under `folder`; symlinks are entries, never followed."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        rel_dir = Path(dirpath).relative_to(folder).as_posix()
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield rel, name in dirnames and not os.path.islink(os.path.join(dirpath, name))


# ------------------------------------------------------------------------------ the checks before writing

def output_path(out: str | Path, rel: str) -> Path:
    """`out/rel` for a file a stage writes in its own output folder `out` (one `check_folder` passed): every
    part of `rel` a plain name, never the marker, and the path, symlinks resolved, strictly inside `out`."""
    out = Path(out)
    parts = str(rel).split("/")
    for part in parts:
        plain_name(part, f"file {str(rel)[:120]!r} under {out}")
    if parts[-1] == MARKER or parts[-1].startswith(MARKER + ".tmp-"):
        raise ConfigError(f"{rel!r}: {MARKER} is the stage's marker, never written as a file; rename that file.")
    path = out.joinpath(*parts)
    real, home = path.resolve(), out.resolve()
    if home not in real.parents:
        raise ConfigError(f"{path} resolves to {real}, outside the output folder {out} (a symlink on the way); "
                          f"a stage writes only inside its own output: remove the link or choose another --out.")
    return path


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
