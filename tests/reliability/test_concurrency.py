"""Fault 4: 4 worker processes on one study storage (a journal file; PostgreSQL when reachable).

They must finish exactly N trials between them (no overshoot, no duplicate trial numbers, one
MLflow child run per trial, none left RUNNING), every worker exits 0, and no worker prints
"database is locked" (neither Optuna's storage nor the shared MLflow sqlite store).
"""

from __future__ import annotations

import socket
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
PG = ("127.0.0.1", 5432)


def postgres_reason() -> str | None:
    """None when PostgreSQL accepts connections as postgres with trust auth, else why not."""
    try:
        with socket.create_connection(PG, timeout=2):
            pass
    except OSError as exc:
        return f"PostgreSQL is not reachable at {PG[0]}:{PG[1]} ({exc})"
    try:
        import psycopg

        psycopg.connect(f"host={PG[0]} port={PG[1]} user=postgres dbname=postgres connect_timeout=3").close()
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to skip, reported as is
        return f"PostgreSQL at {PG[0]}:{PG[1]} refused user postgres with trust auth: {exc}"
    return None


@pytest.fixture(params=["journal", "postgresql"])
def storage(request, tmp_path):
    if request.param == "journal":
        yield f"journal:{tmp_path / 'study.journal'}"
        return
    reason = postgres_reason()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = f"reliability_{uuid.uuid4().hex[:10]}"
    admin = f"host={PG[0]} port={PG[1]} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@{PG[0]}:{PG[1]}/{name}"
    optuna.storages.RDBStorage(url)  # the schema once, before 4 workers race to create it
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_four_workers_finish_exactly_n_trials(storage, tiny_version, mlflow_store, tmp_path):
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
