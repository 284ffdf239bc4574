"""What training shows while it runs.

In a terminal: one live table per run that grows by a row per epoch, with a bar for the epoch in
progress under it (batches, img/s, time left). Without one (CI, a log file, `| tee`), or in a sweep
worker started by `sweep --workers N` (several processes share the terminal): one plain line per
epoch, prefixed with the worker's name.

`counting` is the same rule for the stages' bars (build, scan, clean, split, caches): a live bar in a
terminal; in a log one line when the work is done, never a bar squeezed into the log's 80 columns.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

PLAIN_ENV = "RESEARCH_PROGRESS"  # "plain": one line per epoch even in a terminal
WORKER_ENV = "RESEARCH_WORKER"  # a worker's name, prefixed to its lines

# (header, row key, format): the seed's per-epoch box, fits 80 columns
COLUMNS = (
    ("epoch", "epoch", "{:.0f}"), ("train\nloss", "train_loss", "{:.4f}"), ("val\nloss", "val_loss", "{:.4f}"),
    ("val\nacc", "val_accuracy", "{:.3f}"), ("val\nP", "val_precision_macro", "{:.3f}"),
    ("val\nR", "val_recall_macro", "{:.3f}"), ("val\nF1", "val_f1_macro", "{:.3f}"), ("lr", "lr", "{:.1e}"),
    ("sec", "epoch_seconds", "{:.0f}"),
)


def is_live(console: Console) -> bool:
    return console.is_terminal and os.environ.get(PLAIN_ENV) != "plain"


@contextlib.contextmanager
def counting(total: int, label: str, transient: bool = False) -> Iterator[Callable[[int], None]]:
    """Progress over `total` units; yields `advance(n)`. A live bar on stderr when it is a terminal; when stdout
    is not one (`make demo > demo.log`), one line there once the work is done (`label: done/total in 1.2 s`),
    never a bar squeezed into the log's 80 columns; with neither, that line on stderr unless `transient`."""
    err, out = Console(stderr=True), Console()
    done, start = 0, time.perf_counter()
    if is_live(err):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=err, transient=transient) as bar:
            task = bar.add_task(label, total=total)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.advance(task, n)

            yield advance
    else:
        def advance(n: int) -> None:
            nonlocal done
            done += n

        yield advance
    line = f"{label}: {done}/{total} in {time.perf_counter() - start:.1f} s"
    if not out.is_terminal:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    elif not is_live(err) and not transient:
        err.print(line, markup=False, highlight=False, soft_wrap=True)


class EpochDisplay:
    """`with EpochDisplay(console, epochs) as display:` then `display.batches(epoch, n)` per epoch and
    `display.add(row)` after it."""

    def __init__(self, console: Console, epochs: int):
        self.console, self.epochs, self.live = console, epochs, is_live(console)
        self.table = Table(show_edge=False, padding=(0, 1))
        for header, _, _ in COLUMNS:
            self.table.add_column(header, justify="right", no_wrap=True, min_width=6)
        self.progress = Progress(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                                 console=console)
        self._live: Live | None = None

    def __enter__(self) -> EpochDisplay:
        if self.live:
            self._live = Live(Group(self.table, self.progress), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)  # the table stays on screen; the finished bar is gone

    @contextlib.contextmanager
    def batches(self, epoch: int, total: int) -> Iterator:
        """A bar for one epoch's `total` batches; yields `advance(images)`."""
        if not self.live:
            yield lambda images: None
            return
        task = self.progress.add_task("", total=total, epoch=epoch, epochs=self.epochs, speed="")
        start, seen = time.perf_counter(), 0

        def advance(images: int) -> None:
            nonlocal seen
            seen += images
            speed = seen / max(time.perf_counter() - start, 1e-9)
            self.progress.update(task, advance=1, speed=f"{speed:,.0f} img/s")

        try:
            yield advance
        finally:
            self.progress.remove_task(task)

    def add(self, row: dict[str, float]) -> None:
        cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        if self.live:
            self.table.add_row(*cells)
            return
        worker = os.environ.get(WORKER_ENV)
        words = "  ".join(f"{header.replace(chr(10), '_')} {cell}" for (header, _, _), cell in zip(COLUMNS[1:],
                                                                                              cells[1:]))
        self.console.print(f"{f'[{worker}] ' if worker else ''}epoch {int(row['epoch'])}/{self.epochs}  {words}",
                           markup=False, highlight=False, soft_wrap=True)
