"""What training shows: a live growing table in a terminal, one plain line per epoch elsewhere."""

from __future__ import annotations

import io
import time

from rich.console import Console

from research.progress import EpochDisplay

ROW = {"train_loss": 1.23456, "val_loss": 2.5, "val_accuracy": 0.5, "val_precision_macro": 0.4,
       "val_recall_macro": 0.3, "val_f1_macro": 0.35, "lr": 1e-3, "epoch_seconds": 12.0}


def run_display(console: Console, epochs: int = 3, pause: float = 0.0) -> None:
    with EpochDisplay(console, epochs) as display:
        for epoch in range(1, epochs + 1):
            with display.batches(epoch, 4) as advance:
                for _ in range(4):
                    advance(8)
                time.sleep(pause)  # the live display refreshes 4 times a second
            display.add(ROW | {"epoch": epoch})


def test_without_a_terminal_one_plain_line_per_epoch(monkeypatch):
    monkeypatch.setenv("RESEARCH_WORKER", "worker 2/3")
    out = io.StringIO()
    run_display(Console(file=out, force_terminal=False, width=200))
    lines = out.getvalue().splitlines()
    assert lines == [f"[worker 2/3] epoch {e}/3  train_loss 1.2346  val_loss 2.5000  val_acc 0.500  val_P 0.400  "
                     "val_R 0.300  val_F1 0.350  lr 1.0e-03  sec 12" for e in (1, 2, 3)]


def test_in_a_terminal_one_table_grows_and_the_bar_goes(monkeypatch):
    monkeypatch.delenv("RESEARCH_PROGRESS", raising=False)
    out = io.StringIO()
    run_display(Console(file=out, force_terminal=True, width=100, color_system=None), pause=0.4)
    final = out.getvalue().rsplit("\x1b[2K", 1)[-1]  # what stays on screen after the last refresh
    assert final.count("epoch") == 1 and final.count("1.2346") == 3  # one header, a row per epoch
    assert "img/s" not in final  # the finished bar is gone
    assert "img/s" in out.getvalue()  # it was shown while the epoch ran


def test_plain_is_forced_for_workers_sharing_a_terminal(monkeypatch):
    monkeypatch.setenv("RESEARCH_PROGRESS", "plain")
    out = io.StringIO()
    run_display(Console(file=out, force_terminal=True, width=200, color_system=None))
    assert len(out.getvalue().splitlines()) == 3
