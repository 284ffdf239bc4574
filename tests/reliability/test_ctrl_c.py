"""Ctrl-C (SIGINT) in `train` and in `sweep`: what the README promises.

train: exit code 130, the run is marked KILLED, the resume command is printed and the checkpoint
of the last finished epoch is kept. sweep: exit code 130, the trial in flight is FAIL and its MLflow
child run KILLED; running the same spec again resumes the study (same parent run) to n_trials
finished trials and closes everything.
"""

from __future__ import annotations

import signal

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from research.sweep import make_storage
from tests.reliability import (
    child_runs,
    cli_env,
    kill,
    run_cli,
    start_cli,
    tail,
    tiny_sweep_spec,
    tiny_train_config,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_ctrl_c_in_train_marks_killed_and_keeps_the_checkpoint(tiny_version, mlflow_store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    ckpt = tmp_path / "ckpt"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, ckpt, epochs=30, run_name="ctrl-c")))
    proc = start_cli("train", "--config", cfg, cwd=work, env=cli_env(), log=tmp_path / "train.log")
    try:
        last = wait_for(lambda: next(iter(ckpt.glob("*/last.pt")), None) or proc.poll() is not None, timeout=300,
                        interval=0.05, what="the first checkpoint")
        assert proc.poll() is None, tail(proc.log_path)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        kill(proc)
    log = tail(proc.log_path, 100_000)
    run_id = last.parent.name
    assert rc == 130, log[-3000:]
    assert "interrupted" in log and f"--resume {run_id}" in log
    assert "Traceback" not in log, log[-3000:]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    assert last.is_file()  # the last finished epoch survives for --resume


def test_ctrl_c_in_sweep_then_rerun_resumes_the_study(tiny_version, mlflow_store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    storage = f"journal:{tmp_path / 'study.journal'}"
    spec_path = tmp_path / "spec.yaml"
    # long trials: the Ctrl-C must land while one runs, whatever the machine's speed (a tiny epoch takes ~0.1 s)
    spec_path.write_text(yaml.safe_dump(tiny_sweep_spec(tiny_version, tmp_path / "ckpt", "ctrlc", 2, epochs=500)))
    proc = start_cli("sweep", spec_path, "--storage", storage, cwd=work, env=cli_env(), log=tmp_path / "sweep.log")
    study = None
    try:
        def running_trial():
            nonlocal study
            if proc.poll() is not None:
                return "exited"
            if not (tmp_path / "study.journal").exists():
                return None
            study = study or optuna.load_study(study_name="ctrlc", storage=make_storage(storage))
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("mlflow_run_id") and t.intermediate_values:  # one epoch reported
                    return t
            return None

        trial = wait_for(running_trial, timeout=300, interval=0.1, what="a running trial")
        assert trial != "exited", tail(proc.log_path)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        kill(proc)
    log = tail(proc.log_path, 100_000)
    assert rc == 130, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    client = mlflow.MlflowClient()
    assert study.get_trials(deepcopy=False)[trial.number].state == TrialState.FAIL
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    parent = study.user_attrs["mlflow_parent_run_id"]

    # the same spec again (short trials now) resumes the study: same parent, n_trials finished, all closed
    out, seconds = run_cli("sweep", spec_path, "--storage", storage, "--set", "base.epochs=1", cwd=work,
                           env=cli_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    # the interrupted trial's params ran again (an enqueued recipe is not lost to a Ctrl-C)
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trial.params
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    assert {r.info.status for r in child_runs(parent)} <= {"FINISHED", "KILLED"}
    print(f"\nsweep: Ctrl-C in trial {trial.number} -> rc {rc}; rerun finished the study in {seconds:.1f}s: "
          f"{[t.state.name for t in trials]}")
