"""The team set-up for real: Optuna on PostgreSQL, an MLflow server with a PostgreSQL backend store.

Three sweep worker processes share one study stored in PostgreSQL and log to one `mlflow server`
(served artifacts); then the study is summarised and its best run promoted and loaded through
the server. PostgreSQL must listen on 127.0.0.1:5432 with trust auth for user postgres (as on
these machines); the test tries to start a local cluster once, and skips with the reason when
none is reachable. It creates its own databases and drops them.

`pytest -s tests/test_postgres.py` prints the transcript (trials per worker, wall times).
"""

from __future__ import annotations

import base64
import collections
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
ADMIN_DSN = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres connect_timeout=3"
N_TRIALS, N_WORKERS, KEEP = 6, 3, 2
MODEL_NAME = "illustration-classifier"


# ------------------------------------------------------------------------------- PostgreSQL

def _connect():
    import psycopg

    return psycopg.connect(ADMIN_DSN, autocommit=True)


def _start_local_cluster() -> str:
    """Start the Debian cluster when pg_ctlcluster exists; returns what happened (for a skip reason)."""
    conf = Path("/etc/postgresql")
    if not shutil.which("pg_ctlcluster") or not conf.is_dir():
        return "pg_ctlcluster or /etc/postgresql not found"
    versions = sorted(p.name for p in conf.iterdir() if (p / "main").is_dir())
    if not versions:
        return "no cluster 'main' under /etc/postgresql"
    proc = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
                          capture_output=True, text=True, timeout=60)
    return f"pg_ctlcluster {versions[-1]} main start -> rc {proc.returncode} {proc.stderr.strip()[:200]}"


@pytest.fixture(scope="module")
def postgres():
    """A factory of fresh databases on the local server: create(prefix) -> SQLAlchemy URL; dropped at the end."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (requirements.txt pins psycopg[binary])")
    try:
        conn = _connect()
    except psycopg.OperationalError as first:
        attempt = _start_local_cluster()
        for _ in range(20):
            try:
                conn = _connect()
                break
            except psycopg.OperationalError:
                time.sleep(0.5)
        else:
            pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} as {PG_USER} with trust auth "
                        f"({str(first).strip().splitlines()[0]}); tried: {attempt}")
    created: list[str] = []

    def create(prefix: str, make: bool = True) -> str:
        """A unique database name (created unless make=False), dropped at the end; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        created.append(name)
        if make:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    try:
        yield create
    finally:
        for name in created:
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.Error as exc:  # leave the test's verdict alone; say what is left behind
                print(f"could not drop database {name}: {exc}")
        conn.close()


# ------------------------------------------------------------------------------ MLflow server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on a free local port, backend store in a fresh PostgreSQL database; yields its URL."""
    backend = postgres("test_mlflow")
    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(tmp_path / "mlartifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0, deadline = time.time(), time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{_tail(log)}")
            time.sleep(0.5)
        print(f"\nmlflow server up in {time.time() - t0:.1f}s at {url} (backend {backend})")
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and its children (uvicorn workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------ the test

def _write_spec(path: Path, version_dir: Path, checkpoints: Path, study: str) -> Path:
    spec = {
        "study_name": study,
        "description": "tiny PostgreSQL multi-worker check",
        "n_trials": N_TRIALS,
        "base": {"model": "resnet18", "dataset": str(version_dir), "image_size": 32, "epochs": 1,
                 "batch_size": 8, "device": "cpu", "checkpoint_dir": str(checkpoints)},
        "space": {"lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "keep_top_k": KEEP,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _research(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "research", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"python -m research {' '.join(args)} -> {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _png_base64(version_dir: Path) -> str:
    image = next(p for p in sorted((version_dir / "test").rglob("*")) if p.is_file())
    return base64.b64encode(image.read_bytes()).decode()


def test_compose_init_creates_the_optuna_database_and_schema_once(postgres):
    """docker/init_db.py (the compose `init` service) against the real server, run twice."""
    import optuna

    url = postgres("test_init", make=False)
    name = url.rsplit("/", 1)[1]
    env = dict(os.environ, POSTGRES_HOST=PG_HOST, POSTGRES_PORT=str(PG_PORT), POSTGRES_USER=PG_USER,
               POSTGRES_PASSWORD="unused-with-trust-auth", POSTGRES_DB="postgres", OPTUNA_DB=name)
    runs = [subprocess.run([sys.executable, str(REPO / "docker" / "init_db.py")], env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "created" in runs[0].stdout and "exists" in runs[1].stdout
    storage = optuna.storages.RDBStorage(url)
    optuna.create_study(study_name="probe", storage=storage)  # the schema is there and usable
    assert optuna.get_all_study_names(storage) == ["probe"]
    storage.engine.dispose()  # let the fixture drop the database


def test_workers_share_a_postgres_study_and_an_mlflow_server(postgres, mlflow_server, tiny_version, tmp_path,
                                                             monkeypatch):
    import mlflow
    import optuna

    t_start = time.time()
    storage_url = postgres("test_optuna")
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"  # cwd of the workers: their data/cache and mlruns/ land here, not in the repo
    work.mkdir()
    spec = _write_spec(tmp_path / "pg_sweep.yaml", tiny_version, tmp_path / "checkpoints", study_name)
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true",
               RESEARCH_MLRUNS=str(work / "mlruns"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_REGISTRY_URI", None)

    # Optuna's schema once, before the workers start (several workers on a fresh database race to create it).
    optuna.storages.RDBStorage(storage_url).engine.dispose()

    t_workers = time.time()
    logs, procs = [], []
    try:
        for i in range(N_WORKERS):
            log = open(tmp_path / f"worker-{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "research", "sweep", str(spec), "--worker-only", "--storage", storage_url],
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 420
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            _stop(p)
        for log in logs:
            log.close()
    worker_seconds = time.time() - t_workers
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{_tail(tmp_path / f'worker-{i}.log')}"
        assert "Traceback" not in (tmp_path / f"worker-{i}.log").read_text(), _tail(tmp_path / f"worker-{i}.log")

    # A last, plain `sweep` finds the study complete, runs nothing and closes the parent run.
    t_summary = time.time()
    _research(["sweep", str(spec), "--storage", storage_url], env, work, timeout=180)
    summary_seconds = time.time() - t_summary

    # --- Optuna: exactly N finished trials, numbered once each, run by more than one worker
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers: {sorted(numbers)}"
    states = collections.Counter(t.state.name for t in trials)
    assert states == {"COMPLETE": N_TRIALS}, f"trial states {dict(states)}, expected {N_TRIALS} COMPLETE"
    per_worker = collections.Counter(t.user_attrs.get("worker") for t in trials)
    assert None not in per_worker, f"a trial has no `worker` attribute: {per_worker}"
    assert len(per_worker) > 1, f"all trials ran in one worker: {dict(per_worker)}"

    # --- MLflow, through the server: one FINISHED parent run, one FINISHED child per trial under it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    client = mlflow.MlflowClient()
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("optuna_study") == study_name
    assert parent.data.metrics.get("n_complete") == N_TRIALS
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    assert len(children) == N_TRIALS, f"{len(children)} child runs under the parent, expected {N_TRIALS}"
    assert {r.info.status for r in children} == {"FINISHED"}
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == sorted(numbers)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for r in children:  # every epoch metric logged once, by the worker that ran the trial
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_f1_macro")] == [1]
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children), \
        "artifacts should be served by the server (--serve-artifacts)"

    # --- keep_top_k through the server: the weights of KEEP trials stay, the others' files are gone
    from research.store import logged_models

    kept = logged_models(client, [parent.info.experiment_id], {r.info.run_id for r in children})
    assert len(kept) == KEEP, f"{len(kept)} trials keep weights, expected keep_top_k={KEEP}"
    dropped = [r for r in children if r.data.tags.get("weights_deleted") == "true"]
    assert len(dropped) == N_TRIALS - KEEP and not {r.info.run_id for r in dropped} & {m.source_run_id for m in kept}
    weights = list((tmp_path / "mlartifacts").rglob("model.pth"))  # the server's own artifact folder
    assert len(weights) == KEEP, f"{len(weights)} weight files behind the server, expected {KEEP}: {weights}"

    # --- the registry, through the server: promote the study's best run, load the champion, predict
    t_promote = time.time()
    _research(["promote", "--study", study_name, "--model-filter", "resnet18"], env, work, timeout=300)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    # promote ranks by the same metric as the study (best-epoch val_f1_macro); tiny data ties often
    best_runs = {t.user_attrs["mlflow_run_id"] for t in trials if t.value == study.best_value}
    champion_run = champion.tags.get("source_run_id") or champion.run_id
    assert champion_run in best_runs, f"champion from run {champion_run}, not one of the best trials' runs {best_runs}"
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [_png_base64(tiny_version)]}))
    assert list(out["label"])[0] in {"circles", "squares", "stripes"}
    promote_seconds = time.time() - t_promote

    print(f"\n--- PostgreSQL study {study_name}: {N_TRIALS} trials, {N_WORKERS} worker processes")
    for worker, n in sorted(per_worker.items()):
        its_trials = sorted(t.number for t in trials if t.user_attrs.get("worker") == worker)
        print(f"  worker {worker}: {n} trial(s) {its_trials}")
    print(f"  workers wall time {worker_seconds:.1f}s; summary {summary_seconds:.1f}s; "
          f"promote + load + predict {promote_seconds:.1f}s; test total {time.time() - t_start:.1f}s")
    print(f"  parent run {parent_id} FINISHED with {len(children)} FINISHED child runs; "
          f"{MODEL_NAME} version {champion.version} @champion (run {champion_run})")
