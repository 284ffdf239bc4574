"""Fault 3: SIGKILL one of two sweep workers while it runs a trial.

Two `python -m research sweep SPEC --worker-only` processes share one journal-file study
(heartbeat every 1 s, grace 5 s, 4 trials of 3 epochs). Worker 0 is killed as soon as it has a
RUNNING trial with an MLflow run. The other worker must notice the stale heartbeat, mark the trial
FAIL, close its MLflow run KILLED, run the retry (same params, system attr `failed_trial`), and end
the study with exactly 4 finished trials; after `summarize`, no child run is RUNNING.
"""

from __future__ import annotations

import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from research.sweep import make_storage, summarize
from tests.reliability import child_runs, cli_env, kill, prepare_study, start_workers, tail, tiny_sweep_spec, wait_for

pytestmark = pytest.mark.slow
N_TRIALS = 4


def test_sigkill_one_of_two_workers(tiny_version, mlflow_store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    storage = f"journal:{tmp_path / 'study.journal'}"
    spec, parent = prepare_study(tiny_sweep_spec(tiny_version, tmp_path / "ckpt", "killed", N_TRIALS, epochs=3),
                                 tmp_path / "spec.yaml", storage)
    study = optuna.load_study(study_name="killed", storage=make_storage(storage))
    t0 = time.perf_counter()
    workers = start_workers(2, tmp_path / "spec.yaml", storage, "killed", work, tmp_path / "logs", cli_env())
    victim, survivor = workers
    try:
        def victim_trial():
            if victim.poll() is not None:
                return "exited"
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if str(t.user_attrs.get("worker", "")).endswith(f":{victim.pid}") and t.user_attrs.get("mlflow_run_id"):
                    return t
            return None

        dead = wait_for(victim_trial, timeout=300, interval=0.1, what="a running trial of worker 0")
        assert dead != "exited", f"worker 0 ended without a trial to kill: {tail(victim.log_path)}"
        kill(victim)
        t_kill = time.perf_counter()
        rc = survivor.wait(timeout=600)
        t_end = time.perf_counter()
        assert rc == 0, tail(survivor.log_path)
    finally:
        for p in workers:
            kill(p)
    summary = summarize(spec, storage)

    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    print(f"\nkilled worker 0 in trial {dead.number} after {t_kill - t0:.1f}s; survivor done {t_end - t_kill:.1f}s "
          f"later; states {summary['counts']}")
    assert len(finished) == N_TRIALS
    assert len(by_number) == len(trials)  # no duplicate trial numbers
    assert by_number[dead.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == dead.params  # the retry runs the dead trial's parameters
    assert "no heartbeat" in tail(survivor.log_path, 100_000)

    client = mlflow.MlflowClient()
    runs = child_runs(parent)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED" and dead_run.data.tags["optuna_state"] == "FAIL"
    retry_run = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["optuna_retry_of"] == str(dead.number) and retry_run.info.status == "FINISHED"
    assert client.get_run(parent).info.status == "FINISHED"
