"""Failures a user can fix, and the one line `python -m research` prints for each (research/cli.py's boundary).

ConfigError (bad input) and TrackingError (an unusable tracking store) carry their own message. Failures of the
machine or of a file the user gave (a full disk, a name over 255 bytes, a read-only file system, YAML, JSON or
text that does not parse, a database that cannot be written) are recognised by kind in `user_message`, wherever
they are raised. Anything else is a bug: the CLI shows its traceback. Every module may import this one: it
imports nothing of the project at import time.
"""

from __future__ import annotations

import errno
import json
import os

NAME_MAX = 255  # bytes in one path component (Linux, macOS): the file system's limit, not ours


class UserFixable(Exception):
    """Mixed into every exception whose message already names the bad value and the fix: the CLI prints that
    message as its one `error:` line (ConfigError, TrackingError, research.train.TrainingDiverged)."""


class ConfigError(UserFixable, ValueError):
    """A bad key or value in a config file, override or argument; the message names it and the fix."""


class TrackingError(UserFixable, RuntimeError):
    """The tracking store cannot be reached or used; the message says which and what to do."""


def first_line(exc: Exception) -> str:
    """An exception's first line (MLflow's can run to pages), for error messages."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# sqlite's words for a database it cannot use -> what that means, and the fix
DATABASE_FAILURES = {
    "database or disk is full": "The disk holding it is full: free space there, then run the command again",
    "readonly database": "It is read-only: make the file and its folder writable, or use another store",
    "file is not a database": "The file is not an sqlite database (corrupt, or another kind of file): move it "
                              "away to start a new store there, or point MLFLOW_TRACKING_URI at the right file",
    "unable to open database file": "The file cannot be opened: check that its folder exists and is writable",
    "database is locked": "Another process holds its lock: wait for it, then run the command again",
}


def user_message(exc: BaseException) -> str | None:
    """The one `error:` line for a failure the user can fix; None for a bug (its traceback is worth showing)."""
    if isinstance(exc, UserFixable):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_message(exc)
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                "(e.g. `iconv -f latin1 -t utf-8 FILE`).")
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc}."
    if _is_yaml_error(exc):
        return f"not valid YAML: {' '.join(str(exc).split())}."
    return _database_message(exc)


def _os_message(exc: OSError) -> str | None:
    # a copy (shutil, MLflow's artifact store) names its source first: the write failed at filename2
    path = next((f for f in (exc.filename2, exc.filename) if f is not None), None)
    elsewhere = "write elsewhere (--out, RESEARCH_MLRUNS, MLFLOW_TRACKING_URI)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        disk = f"the disk holding {path}" if path else "a disk this command writes to"
        return f"no space left on {disk} ({exc.strerror}): free space there, or {elsewhere}, then run it again."
    if exc.errno == errno.ENAMETOOLONG:
        return f"{long_name(str(exc.filename or ''))}: use a shorter name."
    if exc.errno == errno.EROFS:
        return f"{path or 'a path this command writes to'} is on a read-only file system: {elsewhere}."
    if exc.errno in (errno.EACCES, errno.EPERM) and path:
        return f"{path}: permission denied: make it writable (readable, for an input) for this user, or {elsewhere}."
    return None


def long_name(path: str) -> str:
    """Which part of `path` is over NAME_MAX bytes, shortened for one line."""
    parts = [p for p in path.split(os.sep) if len(os.fsencode(p)) > NAME_MAX]
    if not parts:
        return f"the path {path[:60]}... is too long for the file system"
    part = parts[0]
    return (f"the name {part[:40]}... is {len(os.fsencode(part))} bytes; a file or folder name may have at most "
            f"{NAME_MAX} bytes (the file system's limit)")


def _is_yaml_error(exc: BaseException) -> bool:
    return any(cls.__module__.startswith("yaml") and cls.__name__ == "YAMLError" for cls in type(exc).__mro__)


def database_failure(exc: BaseException) -> tuple[str, str] | None:
    """(sqlite's words, what they mean and the fix) when `exc` or an error it was raised from is a database the
    user can fix (full, read-only, corrupt); MLflow and Optuna wrap SQLAlchemy's error in their own."""
    seen: BaseException | None = exc
    while seen is not None:
        for words, meaning in DATABASE_FAILURES.items():
            if words in str(seen):
                return words, meaning
        seen = seen.__cause__ or seen.__context__
    return None


def _database_message(exc: BaseException) -> str | None:
    failure = database_failure(exc)
    return f"{_which_database(exc)} cannot be used ({failure[0]}). {failure[1]}." if failure else None


def _which_database(exc: BaseException) -> str:
    """The study storage when Optuna raised it, else the tracking store (MLflow's)."""
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}optuna{os.sep}" in tb.tb_frame.f_code.co_filename:
            return "the study storage (--storage)"
        tb = tb.tb_next
    import mlflow  # the URI research.tracking.setup() set; this module imports nothing of the project

    return f"the tracking store {mlflow.get_tracking_uri()}"
