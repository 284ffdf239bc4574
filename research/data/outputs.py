"""Where a stage may write or delete: one guard for every path, never a source, never another stage's files.

Every command that writes files goes through this module, and nothing else decides where it writes:

- `check_folder(stage, out, sources)` (or `check_file` for one file, e.g. scan's inventory) before it writes
  anything: the output folder, symlinks resolved, may not be or lie inside a source, contain one, lie inside
  another stage's output (any depth) or among a source's images, and an existing one must be this stage's;
- `output_path(out, rel)` for every file it writes inside that folder: each part of `rel` a plain name, and the
  path, symlinks resolved, strictly inside `out` (a class name `../../raw/x` from a CSV never leaves it);
- `remove_own(folder, stage)` for every folder it deletes or replaces: it deletes only the files the stage's
  marker lists (what it wrote), and refuses, naming them, when the folder holds anything else;
- `plain_name(value, what)` for every name read from a CSV (a class, a file name) before it becomes a path;
- `claim(out, stage)` in a `@holding` function, right after its checks (or `with writing(out, stage)`):
  one lock per output folder (or file), so two commands never write one output at once; the second is refused
  with the holder's command, pid and host (a cache's builder waits instead). The lock is a hidden file beside
  the output, `.<name>.lock`, held with flock (released by the kernel when its process dies) and removed by
  its holder at the end.

A symlink on the way to an output that leads nowhere is refused before any work (`check_folder`, `check_file`,
`output_path`, `writing`): writing through it would create its target wherever it points, or fail late.

Each stage's folder carries a `.research-stage` marker: JSON with the stage and, for the stages that replace
their folder (`data build`, `split`), the files it wrote. Folders written before markers existed, or before
markers held a file list, are known by their stage's own files (`SIGNATURES`), and their file list is the
stage's own index (`INDEXES`: the version's manifest.csv, the build's labels.csv).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import os
import re
import socket
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from research.errors import ConfigError

MARKER = ".research-stage"
COMMANDS = {"build": "data build", "sources": "data build", "scan": "data scan", "eda": "eda", "clean": "clean",
            "split": "split", "report": "report", "cache": "train (its data cache)"}
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
    for step in (path, *path.parents[: len(parts)]):  # the file and its folders up to `out`, `out` included
        _check_link(step, out)
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


def _check_link(path: Path, out: Path) -> None:
    """Refuse a symlink that leads nowhere: a write would create its target wherever it points, or fail late."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{path} is a symlink to {os.readlink(path)}, which does not exist, on the way to the "
                          f"output {out}; nothing was written. Remove the link (or create what it points to), or "
                          "choose another --out.")


def _check_place(stage: str, out: Path, sources: Iterable[str | Path]) -> None:
    """No dangling symlink on the way; not inside a source nor containing one; not inside a stage's output."""
    for step in (out, *out.absolute().parents):
        _check_link(step, out)
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


# ------------------------------------------------------------------------------ who writes an output now

_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process
_claims: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("output_claims", default=None)


def lock_path(out: str | Path) -> Path:
    """The lock of output `out`: `.<name>.lock` beside it (symlinks resolved, so every spelling shares one)."""
    real = Path(out).resolve()
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def writing(out: str | Path, stage: str, wait: bool = False) -> Iterator[None]:
    """Hold output `out`'s lock while `stage` writes it. Another process holding it: a ConfigError naming its
    command, pid and host (`wait`: wait for it instead, as a cache's builders do). Re-entrant in one process.
    Before the lock file is made beside `out`, that place is checked as an output is (no dangling link, not
    inside another stage's output, not among a source's images), so a refused output leaves no trace."""
    out = Path(out)
    _check_place(stage, out, ())
    path = lock_path(out)
    if _is_source_tree(path.parent):
        _check_not_among_images(stage, out)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = _take(path, out, stage, wait)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still held: a waiter that opened it sees a stale inode and opens afresh
        os.close(fd)


def holding(fn: Callable) -> Callable:
    """Decorator of a stage's function: the output locks it `claim`s are held until it returns."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _claims.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _claims.reset(token)

    return call


def claim(out: str | Path, stage: str) -> None:
    """Take output `out`'s lock (`writing`) until the `@holding` function that calls this returns: one line
    after the stage's checks, before its first write."""
    stack = _claims.get()
    if stack is None:
        raise RuntimeError("outputs.claim() is called only inside a function decorated with @outputs.holding")
    stack.enter_context(writing(out, stage))


def _take(path: Path, out: Path, stage: str, wait: bool) -> int:
    """An open descriptor of `path` holding its flock, with this process written in it as the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise ConfigError(f"{stage}: {out} is being written now by {holder}; two commands writing one "
                                  "output would mix their files. Wait for it to end (or stop it), or choose another "
                                  "--out.") from None
            if not told:
                print(f"waiting for {holder}, which writes {out}", file=sys.stderr)
                told = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it as we waited: take the file that is there now
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.time(), "argv": sys.argv[1:6]}).encode())
        return fd


def remove_stale_locks(folder: Path) -> None:
    """Remove the lock files in `folder` that no process holds (a killed holder leaves its file behind)."""
    for path in Path(folder).glob(".*.lock"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()  # held: a process that opened it meanwhile sees a stale inode and opens afresh
        except OSError:
            pass
        finally:
            os.close(fd)


def _holder(fd: int) -> str:
    """Who holds a lock, in words, from what it wrote in the file."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%H:%M:%S", time.localtime(float(data["since"])))
        return (f"`{_command(str(data['stage']))}` (pid {int(data['pid'])} on host {data['host']}, since {since})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has just started)"
