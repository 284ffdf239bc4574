"""Where a study lives and how workers share it: storages, the trial-slot lock, heartbeats, stale trials.

Storage: a journal file `mlruns/optuna.journal` by default (many processes on one machine); any Optuna
storage URL (`postgresql://...`, `sqlite:///...`) to share a study across machines. Running the same
study name again resumes it.

Killed workers: each running trial writes a heartbeat (a trial user attribute) every `heartbeat_interval`
s. A trial whose heartbeat is older than `heartbeat_grace` s is marked FAIL by whichever worker notices,
its MLflow run is set KILLED, and it is retried once through Optuna's `RetryHeartbeatStaleTrialCallback`
(a WAITING copy with the same params). This works on every storage, the journal file included (Optuna's
own heartbeat exists only for RDB storage).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import mlflow
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from research import tracking
from research.config import TrainConfig
from research.errors import ConfigError
from research.store import database_lock
from research.sweep.spec import SweepSpec

console = Console()


def default_storage_url() -> str:
    return f"journal:{tracking.home() / 'optuna.journal'}"


def make_storage(url: str | None) -> JournalStorage | RDBStorage:
    url = url or default_storage_url()
    if url.endswith(".journal") and "://" not in url and not url.startswith("journal:"):
        url = f"journal:{url}"
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        if path.is_dir():
            raise ConfigError(f"storage {url!r} names a folder; a journal is a file, e.g. "
                              f"journal:{path / 'optuna.journal'}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("postgresql", "sqlite", "mysql")):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ImportError as exc:  # SQLAlchemy's dialect needs a driver package this environment lacks
            missing = f"{exc.__cause__ or exc}"
            raise ConfigError(f"storage {_without_password(url)}: its database driver is not installed ({missing}). "
                              "Install it (postgresql://: psycopg[binary]; mysql://: mysqlclient, or write "
                              "mysql+pymysql:// and install pymysql), or use journal:PATH on one machine.") from exc
    raise ConfigError(f"storage {url!r}: use journal:PATH, a *.journal path, postgresql://..., or sqlite:///...")


def _without_password(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: show its scheme only
        return url.split("://")[0] + "://..."


def slot_lock(url: str | None, key: str = ""):
    """Serialise 'count trials, then ask' across processes, so the study never overshoots n_trials: a lock
    per study name `key` on the storage (research.store.database_lock); another RDB gets none (at most
    workers-1 extra trials)."""
    url = url or default_storage_url()
    if url.endswith(".journal") and not url.startswith("journal:"):
        url = f"journal:{url}"
    return database_lock(url, key)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    return spec.sampler.build()


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    return spec.pruner.build(int(spec.base.get("epochs", TrainConfig().epochs)))  # as validated (SweepSpec.validate)


def open_study(spec: SweepSpec, storage_url: str | None) -> optuna.Study:
    """The spec's study, created on first use and loaded (resumed) after that."""
    return optuna.create_study(
        study_name=spec.study_name, storage=make_storage(storage_url), direction=spec.objective.direction,
        sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True,
    )


class Heartbeat:
    """Writes `heartbeat` on the trial every `interval` s from a daemon thread."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        with contextlib.suppress(Exception):  # a finished trial no longer takes attrs
            self.trial.set_user_attr("heartbeat", time.time())

    def __enter__(self):
        # the first beat here, not in the thread: the trial's cached attrs then never gain a key while the
        # worker's thread reads them
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def fail_stale_trials(study: optuna.Study, grace: float) -> list[int]:
    """Mark RUNNING trials with an old heartbeat FAIL, close their MLflow runs, enqueue one retry."""
    now, failed = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a retried trial inherits its parent's old heartbeat attr: its own start counts too
        started = t.datetime_start.timestamp() if t.datetime_start else now
        beat = max(t.user_attrs.get("heartbeat") or 0.0, started)
        if now - beat <= grace:
            continue
        try:
            dead = study.tell(t.number, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, ValueError):  # it finished (or was failed) meanwhile
            continue
        failed.append(t.number)
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            with contextlib.suppress(Exception):
                client = mlflow.MlflowClient()
                client.set_tag(run_id, "optuna_state", "FAIL")
                client.set_terminated(run_id, "KILLED")
        requeue(study, dead, max_retry=1)
        console.print(f"[yellow]trial {t.number}: no heartbeat for {now - beat:.0f}s; marked FAIL and queued a retry")
    return failed


def requeue(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> None:
    """Queue a WAITING copy of a failed `trial` with its params (its system attr `failed_trial` names the first
    of the line): the next free worker, or the study's next run, trains it again. At most `max_retry` copies per
    line (None: no limit)."""
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)
