"""What parallel workers share: one parallel map and one progress bar.

Decoding and hashing images is CPU-bound Python + Pillow, so the stages fan out to worker processes
(threads where the work releases the GIL or shares state). Small inputs run inline: starting a pool
costs more than it saves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any


def workers_for(workers: int | None = None, cap: int | None = None) -> int:
    """`workers`, or every CPU (at most `cap`) when None/0; never below 1."""
    n = workers or os.cpu_count() or 1
    return max(1, min(n, cap) if cap and not workers else n)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, label: str, transient: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr in a terminal, one line when done in a log (`progress.counting`), or nothing;
    yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    from research.progress import counting

    with counting(total, label, transient) as advance:
        yield advance


def pmap(fn: Callable[[Any], Any], tasks: Iterable, *, workers: int | None = None, progress: bool = False,
         label: str = "", total: int | None = None, weight: Callable[[Any], int] | None = None,
         inline_below: int = 0, chunksize: int = 1, threads: bool = False, transient: bool = True) -> list:
    """[fn(t) for t in tasks], in input order, on `workers` processes (threads when `threads`).

    Progress counts `total` units (default: one per task); each result advances it by `weight(result)`
    (default 1), e.g. `len` when a task is a chunk of files. Runs inline when one worker suffices or when
    `total` < `inline_below`. With processes, `fn` and the tasks must pickle (a module-level function).
    """
    tasks = list(tasks)
    total = len(tasks) if total is None else total
    workers = min(workers_for(workers), max(1, len(tasks)))
    step = weight or (lambda _: 1)
    out: list = []
    with progress_bar(progress, total, label, transient=transient) as advance:
        if workers <= 1 or total < inline_below:
            results: Iterable = map(fn, tasks)
            for res in results:
                out.append(res)
                advance(step(res))
            return out
        executor = ThreadPoolExecutor if threads else ProcessPoolExecutor
        with executor(max_workers=workers) as pool:
            for res in pool.map(fn, tasks, chunksize=chunksize):
                out.append(res)
                advance(step(res))
    return out
