"""One exclusive lock across processes on one machine: `file_lock(path)`, an fcntl lock on a regular file.

Taken around a tracking store's first open (research/tracking.py), a study's worker slots (research/store.py)
and a run's live guard (research/checkpoints.py). Every module may import this one: it imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock across processes on one machine (fcntl on the regular file `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
