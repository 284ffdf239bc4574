"""Everything that decides where MLflow writes: one local home (`mlruns/`) unless told otherwise.

The local default is a sqlite store `mlruns/mlflow.db` with artifacts under `mlruns/artifacts/`
(the plain `./mlruns` file store is an error in MLflow 3). `MLFLOW_TRACKING_URI` wins when set:
a team server (`http://...`) or any store MLflow understands.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.parse
from pathlib import Path

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


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; the message says which and what to do."""


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
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))
    return uri


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Raise TrackingError at once when an HTTP tracking server does not accept connections."""
    uri = uri or tracking_uri()
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
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


def run_tags(device: str | None = None) -> dict[str, str]:
    tags = {"host": socket.gethostname(), **git_tags()}
    if device:
        tags["device"] = device
    return tags
