"""Everything that decides where MLflow writes: one local home (`mlruns/`) unless told otherwise.

The local default is a sqlite store `mlruns/mlflow.db` with artifacts under `mlruns/artifacts/`
(the plain `./mlruns` file store is an error in MLflow 3). `MLFLOW_TRACKING_URI` wins when set:
a team server (`http://...`) or any store MLflow understands.

Before a command uses a store it is checked once, and a store that cannot serve is a TrackingError naming
the URI and the fix: `setup` opens a local sqlite store (creating a fresh one under a file lock, so
commands started together never race MLflow's schema migration), and `check_reachable` asks an http(s)
server one bounded request (down, silent, or not an MLflow server).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from research.errors import TrackingError, database_failure  # TrackingError re-exported: tracking.TrackingError
from research.locks import file_lock

HOME = Path("mlruns")
LOCAL_UI = "http://127.0.0.1:5000"  # where `python -m research ui` (and `mlflow ui`) serve by default
# How the MLflow UI shows the project's experiments. KIND_TAG: the experiment's kind as MLflow records it (its UI's
# kind selector writes it; "custom_model_development" is machine learning). MLflow 3.17's UI does not read it to
# pick a view: it follows its GenAI / Model training switch, the `workflowType` URL parameter, else that browser's
# last choice (GenAI at first), so the URLs below carry the parameter. The shared view VIEW_KEY, an experiment tag
# the UI loads for `?viewStateShareKey=`, opens the runs table on the columns that compare runs and studies
# (best_* and n_complete are on a study's parent run: research/sweep/summary.py).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
VIEW_KEY = "research"
_VIEW = {"selectedColumns": [*(f"metrics.`{m}`" for m in ("best_val_f1_macro", "best_test_f1_macro",
                                                           "best_test_accuracy", "n_complete", "val_f1_macro",
                                                           "test_f1_macro", "test_accuracy")),
                             "params.`model`", "params.`lr`"]}
EXPERIMENT_TAGS = {KIND_TAG: KIND, f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(_VIEW)}

# Fail fast on a tracking server that is down: MLflow's defaults retry for minutes.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

_READY: set[str] = set()  # stores this process has checked (setup, check_reachable)


def home() -> Path:
    """The local tracking home (`mlruns/` in the working directory, or $RESEARCH_MLRUNS)."""
    return Path(os.environ.get("RESEARCH_MLRUNS", HOME)).resolve()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home() / 'mlflow.db'}"


def is_local(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith(("sqlite:", "file:")) or "://" not in (uri or tracking_uri())


def setup() -> str:
    """Point MLflow at the store; returns the tracking URI. Call before any MLflow use."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download floods logs
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))
    if uri not in _READY:
        _open_local_store(uri)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` (or `sqlite:///file:PATH?mode=ro&uri=true`) URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0].removeprefix("file:"))


def _open_local_store(uri: str) -> None:
    """Open (a fresh one: create) the local store once per process; TrackingError when it cannot serve."""
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":  # MLflow's own opt-in
            raise TrackingError(f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 no longer writes: "
                                f"use an sqlite store, e.g. sqlite:///{uri.removeprefix('file://')}/mlflow.db "
                                "(`mlflow migrate-filestore` moves existing runs), or unset it for mlruns/mlflow.db.")
        return
    path = sqlite_path(uri)
    if path is None:
        return  # a server (check_reachable) or another database: MLflow opens it at first use
    if path.is_dir():
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri} names a folder; an sqlite store is a file in it, e.g. "
                            f"sqlite:///{path / 'mlflow.db'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    import mlflow

    try:
        with _first_open_lock(path):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        failure = database_failure(exc)
        why = f"({failure[0]}). {failure[1]}." if failure else f"({' '.join(str(exc).split())[:300]})."
        raise TrackingError(f"the tracking store {uri} cannot be opened {why}") from exc
    _READY.add(uri)


@contextlib.contextmanager
def _first_open_lock(path: Path) -> Iterator[None]:
    """MLflow creates a fresh store's tables on first open, and two processes doing it at once fail ("table ...
    already exists"): the first open is serialised by a lock file beside the database. Not the store's own
    lock (research.store.database_lock): a caller may hold that one while it sets up."""
    lock = file_lock(path.with_name(path.name + ".init.lock"))
    try:
        lock.__enter__()
    except OSError:  # a read-only folder: nothing can be created there, so no creation can race either
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Raise TrackingError within about `timeout` s when an http(s) tracking server does not accept connections,
    does not answer, or answers as something other than an MLflow server (checked once per process)."""
    uri = uri or tracking_uri()
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or uri in _READY:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({exc.strerror or exc}). "
            "Start it (e.g. `python -m research ui` or the server in docker/compose.yaml), "
            "or unset MLFLOW_TRACKING_URI to use the local store under mlruns/."
        ) from exc
    _ask_server(uri, timeout)
    _READY.add(uri)


def _ask_server(uri: str, timeout: float) -> None:
    """One request an MLflow server answers with JSON, through MLflow's own client (its credentials and TLS
    settings), without retries: a silent or foreign server fails here, not after MLflow's retries."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, timeout=timeout, raise_on_status=False, params={"max_results": 1})
    except Exception as exc:
        silent = "timed out" in str(exc).lower() or "timeout" in type(exc.__cause__ or exc).__name__.lower()
        why = (f"accepted the connection but did not answer within {timeout:.0f} s" if silent
               else f"failed: {' '.join(str(exc).split())[:200]}")
        raise TrackingError(f"MLflow tracking server {uri} {why}. Check that the server is up and is an MLflow "
                            f"server (`curl {uri}/health` says OK), or unset MLFLOW_TRACKING_URI to use the local "
                            "store under mlruns/.") from exc
    if response.status_code in (401, 403):
        raise TrackingError(f"MLflow tracking server {uri} refused the request (HTTP {response.status_code}): set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN).")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200 or not isinstance(answer, dict):
        kind = response.headers.get("Content-Type", "no content type").split(";")[0]
        raise TrackingError(f"{uri} answers, but not as an MLflow tracking server (HTTP {response.status_code}, "
                            f"{kind}): check the host, port and path of MLFLOW_TRACKING_URI (an MLflow server "
                            "answers /api/2.0/mlflow/experiments/search with JSON).")


def experiment_id(name: str) -> str:
    """Get or create experiment `name`; local stores keep its artifacts under mlruns/artifacts/."""
    import mlflow

    setup()
    check_reachable()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for key, value in EXPERIMENT_TAGS.items():  # made before the tags, or elsewhere; a kind chosen in the UI stays
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if is_local():
        location = (home() / "artifacts" / _safe(name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def end_run_failed(run_id: str) -> None:
    """Mark run `run_id` FAILED (ending it when it is the active run); never raises, for a caller already handling
    the error that stopped the run. On a full disk that write fails; the run's models that never finished
    logging (status not READY: partial weights that nothing can load) are then deleted, which frees the space
    they took, and the write is tried once more. Checkpoints stay: the run can still be resumed."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run("FAILED")  # pops the run first: a failed write leaves nothing active
        else:
            client.set_terminated(run_id, "FAILED")
        return
    except Exception:
        pass
    with contextlib.suppress(Exception):
        drop_unfinished_models(client, run_id)
        client.set_terminated(run_id, "FAILED")


def drop_unfinished_models(client, run_id: str) -> list[str]:
    """Delete the local files of the run's LoggedModels that are not READY and mark them FAILED; their ids."""
    import shutil

    from mlflow.entities import LoggedModelStatus

    from research.store import logged_models

    experiment = client.get_run(run_id).info.experiment_id
    dropped = []
    for model in logged_models(client, [experiment], run_ids={run_id}):
        if model.status == LoggedModelStatus.READY or not model.artifact_location.startswith("file:"):
            continue
        shutil.rmtree(urllib.parse.urlparse(model.artifact_location).path, ignore_errors=True)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        dropped.append(model.model_id)
    return dropped


def ui_url(route: str, **params: str) -> str:
    """The MLflow UI's address of `route` (`experiments/1/runs`, ...) in its Model training view: on the
    tracking server for an http(s) store, else where `python -m research ui` serves."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/{route}?{urllib.parse.urlencode({'workflowType': 'machine_learning', **params})}"


def experiment_url(experiment_id: str) -> str:
    """The experiment's runs table, in the project's shared view (the columns that compare runs and studies)."""
    return ui_url(f"experiments/{experiment_id}/runs", viewStateShareKey=VIEW_KEY)


def run_url(run_id: str, experiment_id: str | None = None) -> str:
    """The run's page; its experiment is looked up when not given."""
    import mlflow

    experiment_id = experiment_id or mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return ui_url(f"experiments/{experiment_id}/runs/{run_id}")


def model_version_url(name: str, version: str) -> str:
    return ui_url(f"models/{urllib.parse.quote(name, safe='')}/versions/{version}")


def ui_line(url: str) -> str:
    """`UI: <url>`, saying how to start the UI when it is the local one."""
    return f"UI: {url}" + ("  (start it with `python -m research ui`)" if is_local() else "")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the repo the code runs from (empty outside a checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def process_tags() -> dict[str, str]:
    """The process that writes a run (pid and start time, beside the `host` tag): `gc` tells a run whose process
    was killed (it stays RUNNING) from one still being written."""
    import psutil

    return {"pid": str(os.getpid()), "process_started": f"{psutil.Process().create_time():.3f}"}


def run_tags(device: str | None = None) -> dict[str, str]:
    tags = {"host": socket.gethostname(), **git_tags()}
    if device:
        tags["device"] = device
    return tags
