"""Fault 4: 4 worker processes on one study storage (a journal file) and one MLflow sqlite store.

They must finish exactly N trials between them (no overshoot, no duplicate trial numbers, one MLflow child run
per trial, none left RUNNING), every worker exits 0, and no worker prints "database is locked" (neither Optuna's
storage nor the shared MLflow sqlite store). The same on PostgreSQL (workers on an RDB study and an MLflow server
with a PostgreSQL store) is tests/test_postgres.py.
"""

from __future__ import annotations

import time
import uuid

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from research.sweep import make_storage
from tests.reliability import child_runs, cli_env, kill, prepare_study, start_workers, tail, tiny_sweep_spec

pytestmark = pytest.mark.slow
N_TRIALS, N_WORKERS = 6, 4


def test_four_workers_finish_exactly_n_trials(tiny_version, mlflow_store, tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    work = tmp_path / "work"
    work.mkdir()
    study_name = f"conc-{uuid.uuid4().hex[:6]}"
    spec, parent = prepare_study(tiny_sweep_spec(tiny_version, tmp_path / "ckpt", study_name, N_TRIALS, epochs=1),
                                 tmp_path / "spec.yaml", storage)
    t0 = time.perf_counter()
    workers = start_workers(N_WORKERS, tmp_path / "spec.yaml", storage, study_name, work, tmp_path / "logs",
                            cli_env())
    try:
        codes = [p.wait(timeout=600) for p in workers]
    finally:
        for p in workers:
            kill(p)
    wall = time.perf_counter() - t0
    logs = {p.pid: tail(p.log_path, 1_000_000) for p in workers}
    assert codes == [0] * N_WORKERS, {pid: log[-2000:] for pid, log in logs.items()}
    for _, log in logs.items():
        assert "database is locked" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]

    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    per_worker = {pid: sum(str(t.user_attrs.get("worker", "")).endswith(f":{pid}") for t in trials) for pid in logs}
    print(f"\n{storage.split(':')[0]}: {N_WORKERS} workers, {N_TRIALS} trials in {wall:.1f}s; trials per worker "
          f"{sorted(per_worker.values(), reverse=True)}")
    described = [(t.number, t.state.name, t.user_attrs.get("worker"), t.system_attrs.get("failed_trial"))
                 for t in trials]
    assert sorted(numbers) == list(range(N_TRIALS)), described  # exactly N, no duplicate numbers
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state.name for t in trials]
    assert sum(per_worker.values()) == N_TRIALS

    runs = child_runs(parent)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == list(range(N_TRIALS))
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs}
    client = mlflow.MlflowClient()
    for r in runs:  # every epoch metric logged once from the right process
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_f1_macro")] == [1]
