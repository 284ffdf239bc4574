"""One live-run lock, and one rule for which runs resume (research/checkpoints.py).

A run that a process trains holds `live.json` beside its checkpoint (pid, host, heartbeat). `train --resume`
of such a run is refused with the pid and host, so two processes never train one MLflow run (issue 26
case 4: 46 values of val_f1_macro, checkpoints overwritten). `train --resume` and `gc` follow
`checkpoints.resumability`: a FAILED run with a last.pt resumes, and gc keeps its checkpoint unless asked
(`--resumable`); a live run's checkpoint is never freed (issue 24 item 9).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import mlflow
import psutil
import pytest

from research import checkpoints
from research.cli import main
from tests.conftest import tiny_cfg
from tests.reliability import run_cli

pytestmark = pytest.mark.slow
EPOCHS = 3


def steps(run_id: str, key: str = "val_f1_macro") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def test_resume_of_a_run_another_process_trains_is_refused_with_its_pid_and_host(tiny_version, mlflow_store,
                                                                                   tmp_path):
    """This process trains a run (held after epoch 1, at the point where a sweep's trial reports); a real
    `python -m research train --resume` of that run is refused, and the run ends with one value per epoch."""
    from research.train import train

    started, go_on, result = threading.Event(), threading.Event(), {}

    def hold_after_first(epoch, row):
        if epoch == 1:
            started.set()
            assert go_on.wait(timeout=300)

    def trainer():
        result["run"] = train(tiny_cfg(tiny_version, tmp_path, epochs=EPOCHS, run_name="live"),
                              on_epoch=hold_after_first)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    try:
        assert started.wait(timeout=300)
        ckdir = next((tmp_path / "ckpt").glob("*/last.pt")).parent
        run_id = ckdir.name

        out, _ = run_cli("train", "--resume", ckdir, cwd=tmp_path, timeout=300)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in out.stderr, out.stderr
        assert steps(run_id) == [1]  # the refused resume logged nothing
        assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
        lock = json.loads((ckdir / checkpoints.LOCK).read_text())
        assert (lock["pid"], lock["host"], lock["run_id"]) == (os.getpid(), socket.gethostname(), run_id)
    finally:
        go_on.set()
        thread.join(timeout=300)
    assert result["run"].status == "FINISHED"
    assert steps(run_id) == list(range(1, EPOCHS + 1))  # one value per epoch: one process trained each
    assert not ckdir.exists()  # the lock went with the checkpoints when the run finished


def test_a_lock_is_stale_once_its_process_is_gone_or_another_hosts_heartbeat_is_old(tmp_path):
    ckdir = tmp_path / "run"
    ckdir.mkdir()

    def lock(pid: int, host: str, started: float, age: float = 0.0) -> None:
        path = ckdir / checkpoints.LOCK
        path.write_text(json.dumps({"pid": pid, "host": host, "started": started, "run_id": "r"}))
        os.utime(path, (time.time() - age, time.time() - age))

    here = socket.gethostname()
    done = subprocess.Popen(["true"])
    done.wait()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        lock(sleeper.pid, here, started)
        assert checkpoints.live_holder(ckdir).pid == sleeper.pid
        lock(sleeper.pid, here, started, age=10 * checkpoints.STALE_SECONDS)  # same host: the pid decides
        assert checkpoints.live_holder(ckdir) is not None
        lock(sleeper.pid, here, started - 1000)  # the pid now runs another program
        assert checkpoints.live_holder(ckdir) is None
        lock(done.pid, here, started)  # the process is gone
        assert checkpoints.live_holder(ckdir) is None
        lock(12345, "another-host", 0.0, age=checkpoints.STALE_SECONDS / 2)  # another host: the heartbeat decides
        assert checkpoints.live_holder(ckdir).host == "another-host"
        assert checkpoints.resumability(ckdir, "RUNNING").state == checkpoints.LIVE
        lock(12345, "another-host", 0.0, age=checkpoints.STALE_SECONDS + 5)
        assert checkpoints.live_holder(ckdir) is None
        (ckdir / checkpoints.LOCK).write_text("{not json")  # unreadable: judged by its heartbeat
        assert checkpoints.live_holder(ckdir) is not None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_lock_is_taken_atomically_is_reentrant_and_goes_after_an_error(tmp_path):
    """A taker sees the holder (here: a live `sleep`), one process may nest it, an error releases it."""
    from research.errors import ConfigError

    ckdir = tmp_path / "run"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        ckdir.mkdir()
        (ckdir / checkpoints.LOCK).write_text(json.dumps({
            "pid": sleeper.pid, "host": socket.gethostname(),
            "started": psutil.Process(sleeper.pid).create_time(), "run_id": "r"}))
        with pytest.raises(ConfigError, match=rf"pid {sleeper.pid} on host"), checkpoints.live_run(ckdir, "r"):
            pass
        assert json.loads((ckdir / checkpoints.LOCK).read_text())["pid"] == sleeper.pid  # not taken, not removed
    finally:
        sleeper.kill()
        sleeper.wait()
    with checkpoints.live_run(ckdir, "r"), checkpoints.live_run(ckdir, "r"):  # stale now; re-entrant in one process
        assert checkpoints.live_holder(ckdir).pid == os.getpid()
    with pytest.raises(RuntimeError), checkpoints.live_run(ckdir, "r"):
        raise RuntimeError("training failed")
    assert not (ckdir / checkpoints.LOCK).exists()  # after an error the lock goes at once


def test_resume_and_gc_follow_one_rule_for_a_failed_run(tiny_version, mlflow_store, tmp_path, monkeypatch, capsys):
    """A FAILED run with a last.pt (here: an error after epoch 1, as when the tracking server goes away) resumes,
    and gc keeps its checkpoint until it is asked to free resumable runs' checkpoints."""
    from research.train import resume, train

    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient()
    root = tmp_path / "ckpt"

    def fail_after_first(epoch, row):
        if epoch == 1:
            raise RuntimeError("the tracking server went away")

    with pytest.raises(RuntimeError):
        train(tiny_cfg(tiny_version, tmp_path, epochs=2, run_name="failed"), on_epoch=fail_after_first)
    failed = client.search_runs([client.get_experiment_by_name("test-registry").experiment_id],
                                "attributes.run_name = 'failed'")[0].info.run_id
    assert client.get_run(failed).info.status == "FAILED" and (root / failed / "last.pt").is_file()

    capsys.readouterr()
    assert main(["gc", "--yes", "--checkpoints", str(root)]) == 0
    out = capsys.readouterr().out
    assert (root / failed / "last.pt").is_file(), out  # kept: resume needs it
    assert "resumable" in out and "--resumable" in out
    assert checkpoints.resumability(root / failed, "FAILED").state == checkpoints.RESUMABLE
    result = resume(failed, checkpoint_root=str(root))
    assert result.status == "FINISHED" and steps(failed) == [1, 2]

    # a run trained now by another process (a live `sleep` holds its lock): never freed, not even with --resumable
    live = client.create_run(client.get_experiment_by_name("test-registry").experiment_id).info.run_id
    client.set_terminated(live, "FAILED")
    (root / live).mkdir()
    (root / live / "last.pt").write_bytes(b"x" * 100)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        (root / live / checkpoints.LOCK).write_text(json.dumps({
            "pid": sleeper.pid, "host": socket.gethostname(),
            "started": psutil.Process(sleeper.pid).create_time(), "run_id": live}))
        killed = client.create_run(client.get_experiment_by_name("test-registry").experiment_id).info.run_id
        client.set_terminated(killed, "KILLED")
        (root / killed).mkdir()
        (root / killed / "last.pt").write_bytes(b"x" * 100)
        assert main(["gc", "--resumable", "--yes", "--checkpoints", str(root)]) == 0
        out = capsys.readouterr().out
        assert not (root / killed).exists()  # asked for: freed
        assert (root / live / "last.pt").is_file() and f"pid {sleeper.pid}" in out  # live: never, and gc says why
    finally:
        sleeper.kill()
        sleeper.wait()
