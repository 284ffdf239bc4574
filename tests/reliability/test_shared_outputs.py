"""Issue 35, holes of the first and fifth kind: two commands on one output, and outputs behind dead links.

Every stage that writes an output folder (or file) holds that output's lock while it writes
(`research.data.outputs.writing`): a second command is refused with the holder's command, pid and host,
before it writes anything. A symlink on the way to an output that leads nowhere is refused before any work.
Real `python -m research` processes race where the race is the point.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from research.cli import main
from tests.conftest import write_clean_dir
from tests.reliability import cli_env, kill, refused, research_cmd, start_cli, tail, wait_for

BUILD = ["data", "build", "--classes", "heart", "drink", "time", "tool", "--limit-per-class", "10", "--workers", "1"]




def test_a_second_build_of_one_output_is_refused_and_the_first_stays_whole(tmp_path):
    """The issue's case: two `data build --out X` shared X.partial (one labels.csv listed 1,760 images over 1,256
    files). Now the second is refused, naming the first's pid, and the first builds a consistent dataset."""
    first = start_cli(*BUILD, "--out", "X", cwd=tmp_path, log=tmp_path / "first.log")
    try:
        wait_for(lambda: (tmp_path / "X.partial").is_dir() or first.poll() is not None, 120, 0.02,
                 "the first build to start rendering")
        assert first.poll() is None, "the first build ended before the second started: make it larger"
        # the first is held mid-build (stopped, its lock still held) while the second runs: on busy cores the second's
        # imports can take longer than the whole first build, and the test would race the two
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(research_cmd(*BUILD, "--out", "X"), cwd=tmp_path, env=cli_env(),
                                    capture_output=True, text=True, timeout=300)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, tail(tmp_path / "first.log")
    finally:
        kill(first)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"X is being written now by `python -m research data build` (pid {first.pid} on host" in second.stderr
    assert "Traceback" not in second.stderr
    with (tmp_path / "X" / "labels.csv").open(newline="") as f:
        listed = {row["path"] for row in csv.DictReader(f)}
    on_disk = {p.relative_to(tmp_path / "X").as_posix() for p in (tmp_path / "X").rglob("*.png")}
    assert listed == on_disk and len(listed) > 40
    assert json.loads((tmp_path / "X" / ".research-stage").read_text())["stage"] == "build"
    assert not (tmp_path / "X.partial").exists() and not (tmp_path / ".X.lock").exists()


@pytest.fixture
def project(tmp_path, make_tree, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = make_tree({"heart": ("circle", 6), "drink": ("square", 6), "sky": ("stripe", 6)}, size=32,
                    name="data/raw/tiny")
    write_clean_dir(raw, tmp_path / "data/clean/tiny")
    return tmp_path


def hold(out: Path, stage: str) -> subprocess.Popen:
    """Another process holding output `out`'s lock, as a running `stage` does."""
    code = ("import sys, time; from research.data import outputs\n"
            f"with outputs.writing({str(out)!r}, {stage!r}):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("stage, argv", [
    ("build", ["data", "build", "--classes", "heart", "--limit-per-class", "1", "--workers", "1", "--out", "OUT"]),
    ("eda", ["eda", "data/raw/tiny", "--no-log", "--workers", "1", "--out", "OUT"]),
    ("clean", ["clean", "data/raw/tiny", "--method", "score", "--no-log", "--workers", "1", "--out", "OUT"]),
    ("split", ["split", "data/clean/tiny", "--version", "OUT", "--recipe", "v1", "--out", ".", "--workers", "1"]),
    ("scan", ["data", "scan", "data/raw/tiny", "--workers", "1", "--out", "OUT"]),
    ("report", ["report", "--study", "nope", "--no-log", "--out", "OUT"]),
])
def test_every_stage_refuses_an_output_another_process_writes(project, stage, argv, capsys):
    holder = hold(project / "OUT", "eda")
    try:
        err = refused(argv, capsys)
    finally:
        kill(holder)
    assert f"OUT is being written now by `python -m research eda` (pid {holder.pid} on host" in err
    assert not (project / "OUT").exists() and not (project / "OUT.partial").exists()
    # once the holder is gone, the lock it left (a kill leaves the file) is taken over at once
    if stage != "report":
        assert main([str(a) for a in argv]) == 0
        assert not (project / ".OUT.lock").exists()


def test_a_cache_builder_waits_for_the_one_building_it(project, capsys):
    from research.data import outputs

    holder = hold(project / "cache", "cache")
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            waiting(project / "cache")
    finally:
        kill(holder)
    assert time.monotonic() - t0 >= 1.0
    with outputs.writing(project / "cache", "cache", wait=True):  # free now: taken at once
        pass


def waiting(path: Path) -> None:
    """Take a cache's lock as its builders do, giving up after 1 s."""
    from research.data import outputs

    def give_up(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(1)
    try:
        with outputs.writing(path, "cache", wait=True):
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ a link that leads nowhere

@pytest.mark.parametrize("argv", [
    ["eda", "data/raw/tiny", "--no-log", "--workers", "1", "--out", "DEAD"],
    ["clean", "data/raw/tiny", "--method", "score", "--no-log", "--workers", "1", "--out", "DEAD"],
    ["report", "--study", "nope", "--no-log", "--out", "DEAD"],
    ["data", "scan", "data/raw/tiny", "--workers", "1", "--out", "DEAD"],
    ["split", "data/clean/tiny", "--version", "DEAD", "--recipe", "v1", "--out", ".", "--workers", "1"],
    ["split", "data/clean/tiny", "--version", "v1", "--recipe", "v1", "--out", "DEAD/versions", "--workers", "1"],
])
def test_an_output_behind_a_dead_symlink_is_refused_before_any_work(project, argv, capsys):
    """eda, clean and report used to end in FileExistsError's traceback; split did all its work first, then
    NotADirectoryError."""
    (project / "DEAD").symlink_to(project / "gone")
    t0 = time.perf_counter()
    err = refused(argv, capsys)
    assert "DEAD is a symlink to" in err and "which does not exist" in err
    assert time.perf_counter() - t0 < 20
    assert not (project / "gone").exists()
    assert not [p.name for p in project.iterdir() if p.name.startswith(".")]  # no temp folder, no lock


def test_a_dead_link_inside_an_output_is_refused_by_output_path(tmp_path):
    from research.data import outputs
    from research.errors import ConfigError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "heart").symlink_to(tmp_path / "out" / "nowhere")
    with pytest.raises(ConfigError, match="heart is a symlink to .*which does not exist"):
        outputs.output_path(tmp_path / "out", "heart/a.png")
    assert not (tmp_path / "out" / "nowhere").exists()
