"""Quiet terminal, nothing lost: third-party INFO lines and library warnings go to mlruns/logs/, `-v` shows them,
real errors still print. Commands run for real, in a fresh process and in this one (where MLflow is imported
and has configured its loggers already)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from research import logs
from research.cli import main

ROOT = Path(__file__).resolve().parent.parent
NEW_STORE = "Creating initial MLflow database tables"  # MLflow's INFO line on a new sqlite store
HIDDEN = re.compile(r"log: (\S+) \((\d+) lines hidden; -v shows them\)")


def research(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m research ARGS` in a fresh process on a new store under cwd/mlruns/."""
    home = cwd / "mlruns"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RESEARCH_MLRUNS=str(home),
               MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")
    return subprocess.run([sys.executable, "-m", "research", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def log_files(home: Path) -> list[Path]:
    return sorted((home / "logs").glob("*.log"))


@pytest.mark.slow
def test_mlflow_info_lines_go_to_the_log_file_not_the_terminal(tmp_path):
    done = research(["runs"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert NEW_STORE not in done.stdout + done.stderr
    assert "alembic" not in done.stdout + done.stderr
    [log] = log_files(tmp_path / "mlruns")
    assert re.fullmatch(r"runs-\d{8}T\d{6}Z-\d+\.log", log.name)
    text = log.read_text()
    assert re.search(rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO mlflow\.store\.db\.utils: {NEW_STORE}", text, re.M)
    assert "INFO alembic.runtime.migration: Running upgrade" in text
    assert "lines hidden" not in done.stderr  # routine INFO lines alone: no pointer line


@pytest.mark.slow
def test_verbose_before_the_command_shows_them(tmp_path):
    done = research(["-v", "runs"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"INFO mlflow.store.db.utils: {NEW_STORE}" in done.stderr
    assert "lines hidden" not in done.stderr
    [log] = log_files(tmp_path / "mlruns")
    assert NEW_STORE in log.read_text()  # the file keeps them as well


@pytest.mark.slow
def test_verbose_after_the_command_shows_them(fresh_mlflow_store, tmp_path, capsys):
    assert main(["runs", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert f"INFO mlflow.store.db.utils: {NEW_STORE}" in err
    assert "lines hidden" not in err


@pytest.mark.slow
def test_a_real_error_still_prints_and_says_where_the_log_is(fresh_mlflow_store, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["runs", "--experiment", "nope"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: No MLflow experiment named 'nope'")
    assert NEW_STORE not in out + err
    shown, _ = HIDDEN.search(err).groups()
    assert NEW_STORE in (tmp_path / shown).read_text()


@pytest.mark.slow
def test_old_logs_are_pruned_and_logging_is_restored(mlflow_store, tmp_path, capsys):
    folder = tmp_path / "mlruns" / "logs"
    folder.mkdir()
    for i in range(60):  # older runs' logs, oldest first
        (folder / f"runs-old{i:02d}.log").write_text("x\n")
        os.utime(folder / f"runs-old{i:02d}.log", (1_000_000 + i, 1_000_000 + i))
    (folder / "notes.txt").write_text("not a log")
    before = [(logger.handlers, logger.level, logger.propagate)
              for logger in map(logging.getLogger, ("", "mlflow", "alembic", "optuna"))]
    assert main(["runs"]) == 0
    kept = {p.name for p in folder.glob("*.log")}
    assert len(kept) == logs.KEEP
    assert {f"runs-old{i:02d}.log" for i in range(11)}.isdisjoint(kept)  # the 11 oldest went
    assert any(name.startswith("runs-2") for name in kept)  # this command's log stays
    assert (folder / "notes.txt").exists()
    after = [(logger.handlers, logger.level, logger.propagate)
             for logger in map(logging.getLogger, ("", "mlflow", "alembic", "optuna"))]
    assert after == before
    assert NEW_STORE not in capsys.readouterr().err


@pytest.mark.filterwarnings("always")
def test_library_deprecations_go_to_the_file_and_other_warnings_show(mlflow_store, capsys):
    with logs.to_file("check") as path:
        warnings.warn_explicit("old_api() is deprecated", FutureWarning, "site-packages/lib/api.py", 7)
        warnings.warn_explicit("use X", DeprecationWarning, "site-packages/lib/api.py", 9)
        warnings.warn("the stage URI is deprecated; use @champion", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "old_api" not in err and "use X" not in err
    assert "UserWarning: the stage URI is deprecated" in err
    text = path.read_text()
    assert "FutureWarning: old_api() is deprecated" in text and "UserWarning: the stage URI" in text
    assert int(HIDDEN.search(err).group(2)) == 2


def test_a_server_store_keeps_its_logs_local(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_MLRUNS", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert logs.log_dir() == tmp_path / "home" / "logs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}")
    assert logs.log_dir() == tmp_path / "team" / "logs"


@pytest.mark.slow  # ~30 s on 2 busy cores
def test_training_noise_is_kept_from_the_terminal(mlflow_store, tiny_version, tmp_path, monkeypatch, capsys):
    """The demo's noise: system metrics start/stop and the pickle warning on every logged model."""
    monkeypatch.chdir(tmp_path)  # the loader's cache goes to data/cache/ here
    assert main(["train", "--model", "resnet18", "--dataset", str(tiny_version), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--experiment", "logs",
                 "--set", f"checkpoint_dir={tmp_path / 'ckpt'}"]) == 0
    out, err = capsys.readouterr()
    assert "epoch" in out
    for noise in ("system metrics", "Pickle or CloudPickle"):
        assert noise not in out + err
    text = (tmp_path / HIDDEN.search(err).group(1)).read_text()
    assert "INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring system metrics." in text
    assert "WARNING mlflow.pytorch: Saving pytorch model by Pickle or CloudPickle format" in text
