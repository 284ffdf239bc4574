"""Where a command's log lines go: every one to a file, to the terminal only what a person must read.

While a command runs, log records at INFO and up and Python warnings are written, with UTC times, to
`<logs>/<command>-<UTC time>-<pid>.log`, where `<logs>` is `logs/` beside a local sqlite store (by default
`mlruns/logs/`) and `mlruns/logs/` for any other store; the newest 50 files of that folder are kept. The
terminal gets errors, and warnings that are not on the known-noise list below; `-v` shows it all. MLflow and
Optuna give their loggers their own stderr handler on import; those loggers are routed to the root logger
instead, so their lines land in the file too. Progress bars (rich, tqdm) do not go through logging.

A log file that cannot be written (a full disk, a read-only or missing folder) never stops the command: one
warning line says so and the command goes on without a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from research import tracking

KEEP = 50  # log files kept per folder
FORMAT = "%(levelname)s %(name)s: %(message)s"

# Records about library internals, not about the user's run: file only. (logger prefix, message regex)
NOISE = (
    # MLflow logs a store error with its traceback, then raises it; the command reports it in one line
    ("mlflow.store.db.utils", r"SQLAlchemy database error"),
    ("mlflow", r"by Pickle or CloudPickle format"),  # every pytorch model we log (serialization_format="pickle")
    ("mlflow", r"serialized using CloudPickle"),  # every pyfunc model logged from a Python object
    ("py.warnings", r":\d+: (\w*Deprecat\w*|FutureWarning|ExperimentalWarning): "),  # news for library authors
)

# Loggers that MLflow (the first four) and Optuna configure on import with their own stderr handler and
# propagate=False; while a command runs they have no handler and propagate. sqlalchemy.engine stays at
# WARNING, as MLflow keeps it: at INFO it writes every SQL statement.
ROUTED = {"mlflow": logging.NOTSET, "alembic": logging.NOTSET, "huey": logging.NOTSET,
          "sqlalchemy.engine": logging.WARNING, "optuna": logging.NOTSET}


def log_dir() -> Path:
    """`logs/` beside a local sqlite store; `logs/` in the tracking home (mlruns/) for any other store."""
    database = tracking.sqlite_path(tracking.tracking_uri())
    return database.resolve().parent / "logs" if database else tracking.home() / "logs"


@contextlib.contextmanager
def to_file(command: str, verbose: bool = False) -> Iterator[Path]:
    """Route logging and warnings as the module says while the block runs; yields the log file's path.

    On the way out the previous logging state comes back (commands also run inside tests), old log files
    are pruned, and one dim line says where the file is when warnings were kept from the terminal (or
    lines of any level, after `point(path)`, e.g. on an error).
    """
    path = log_dir() / f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    file = _LazyFile(path, encoding="utf-8", delay=True)  # no file, nor folder, when nothing was logged
    file.setFormatter(_Formatter("%(asctime)s " + FORMAT, "%Y-%m-%dT%H:%M:%SZ"))
    terminal = _Stderr()
    terminal.setFormatter(_Formatter(FORMAT))
    shown = _Terminal(verbose)
    terminal.addFilter(shown)

    configure_env = os.environ.get("MLFLOW_CONFIGURE_LOGGING")
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"  # an MLflow imported later leaves its loggers alone
    import optuna.logging  # noqa: F401  Optuna configures its logger on import: do it now, to route it

    root = logging.getLogger()
    saved = [(logger, logger.handlers, logger.level, logger.propagate)
             for logger in (root, *map(logging.getLogger, ROUTED))]
    for name, level in ROUTED.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
        logger.setLevel(level)
    root.handlers = [*root.handlers, file, terminal]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        for logger, handlers, level, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        if configure_env is None:
            os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)
        else:
            os.environ["MLFLOW_CONFIGURE_LOGGING"] = configure_env
        file.close()
        if path.parent.is_dir():
            _prune(path.parent)
        pointed = path in _POINTED
        _POINTED.discard(path)
        # routine INFO lines alone get no pointer; an error (point) does, once its file exists
        if not file.failed and path.is_file() and (shown.warnings_hidden or pointed):
            from rich.console import Console

            hidden = f" ({shown.hidden} lines hidden; -v shows them)" if shown.hidden else ""
            Console(stderr=True).print(f"log: {_display(path)}{hidden}", style="dim", markup=False, highlight=False,
                                       soft_wrap=True)


_POINTED: set[Path] = set()


def point(path: Path) -> None:
    """At the end of the command, say where its log is even if only INFO lines were hidden (after an error)."""
    _POINTED.add(path)


def is_noise(record: logging.LogRecord) -> bool:
    return any(record.name.startswith(prefix) and re.search(pattern, record.getMessage())
               for prefix, pattern in NOISE)


class _Terminal(logging.Filter):
    """Lets through what the terminal shows; counts the lines of the rest, which only the file has."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose, self.hidden, self.warnings_hidden = verbose, 0, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or (record.levelno >= logging.WARNING and not is_noise(record)):
            return True
        self.hidden += len(record.getMessage().strip().splitlines()) or 1
        self.warnings_hidden |= record.levelno >= logging.WARNING
        return False


class _Formatter(logging.Formatter):
    converter = time.gmtime  # UTC, as in the file's name

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip()  # a captured warning ends in a newline


class _LazyFile(logging.FileHandler):
    """Creates its folder with its file, at the first record: a command that fails before it writes anything
    (e.g. an unreachable tracking server) leaves nothing behind. When the file cannot be created or written
    (OSError: a full disk, a read-only folder), it says so once and drops every later record."""

    failed = False

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:
            super().emit(record)  # opening the file raises here; a failed write goes to handleError
        except OSError as exc:
            self._give_up(exc)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self._give_up(exc)
        else:
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()  # flushes: a full disk raises here too
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        if not self.failed:
            self.failed = True
            print(f"warning: no log file: {self.baseFilename} cannot be written ({exc.strerror or exc}); "
                  "the command goes on without one", file=sys.stderr)
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record: rich's live progress display swaps it to print above."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def _prune(folder: Path) -> None:
    """Delete all but the KEEP newest log files; workers of one sweep may prune the same folder at once."""
    with contextlib.suppress(FileNotFoundError):
        for old in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]:
            old.unlink(missing_ok=True)


def _display(path: Path) -> Path:
    cwd = Path.cwd()
    return path.relative_to(cwd) if path.is_relative_to(cwd) else path
