"""Reading the MLflow store: queries that read every page (runs, logged models), a run's figure to rank on,
a study's objective, and a lock shared by every process that uses one database."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

from research.locks import file_lock

LOWER_IS_BETTER = ("loss",)  # a metric whose name contains one of these is minimised


def search_all_runs(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None,
                    **kwargs) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, order_by=order_by, page_token=token,
                                  **kwargs)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def logged_models(client, experiment_ids: list[str], run_ids: set[str] | None = None, name: str | None = None) -> list:
    """The live LoggedModels of these experiments (named `name`, of `run_ids`, when given)."""
    out = []
    for start in range(0, len(experiment_ids), 100):  # the API takes at most 100 experiments
        token = None
        while True:
            page = client.search_logged_models(experiment_ids[start : start + 100], page_token=token,
                                               filter_string=f"name = '{name}'" if name else None)
            out.extend(m for m in page if run_ids is None or m.source_run_id in run_ids)
            token = page.token
            if not token:
                break
    return out


def minimise(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def best_value(client, run, metric: str) -> float | None:
    """The metric's best value over the run's history (max, or min for a loss); None when never logged."""
    if metric not in run.data.metrics:
        return None
    history = [m.value for m in client.get_metric_history(run.info.run_id, metric) if not math.isnan(m.value)]
    if not history:
        return None
    return min(history) if minimise(metric) else max(history)


SELECTED = "selected_"  # `selected_<metric>`: the metric at the epoch whose weights the run kept (research/train.py)


def selection_value(client, run, metric: str) -> float | None:
    """The run's `metric` where its weights come from, the figure to rank and gate on; None when it has none.

    A trained run keeps the epoch that val macro F1 chose and logs every val metric of that epoch as
    `selected_<metric>`: its best val_loss may sit at another epoch, whose weights were not kept. A run logged
    before that: the metric at step `best_epoch`. An ensemble has no val loss to compare (research/ensemble.py:
    its members' temperatures were fitted on that val). Anything else (one value per metric, logged by hand):
    its best value."""
    metrics, tags = run.data.metrics, run.data.tags
    if SELECTED + metric in metrics:
        return metrics[SELECTED + metric]
    if "ensemble_of" in tags and minimise(metric):
        return None
    if "best_epoch" in metrics and metric in metrics:
        at = [m.value for m in client.get_metric_history(run.info.run_id, metric)
              if m.step == int(metrics["best_epoch"]) and not math.isnan(m.value)]
        if at:
            return at[-1]
    return best_value(client, run, metric)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a study optimised: `direction` ("maximize" or "minimize") and the trials' `metric`."""

    direction: str
    metric: str

    @property
    def maximize(self) -> bool:
        return self.direction != "minimize"

    def __str__(self) -> str:
        return f"{self.direction} {self.metric}"


DEFAULT_OBJECTIVE = Objective("maximize", "val_f1_macro")  # the sweep spec's default (research/sweep/spec.py)


def objective_params(direction: str, metric: str) -> dict[str, str]:
    """The params a study's parent run records its objective in (read back by `study_objective`)."""
    return {"objective_direction": direction, "objective_metric": metric}


def study_objective(parent) -> Objective | None:
    """The objective a study's parent run recorded; None when it recorded none.

    Params `objective_direction` and `objective_metric`; a parent logged before those has the one string param
    `objective`, e.g. "maximize val_f1_macro"."""
    params = parent.data.params
    if params.get("objective_metric"):
        return Objective(params.get("objective_direction", DEFAULT_OBJECTIVE.direction), params["objective_metric"])
    direction, _, metric = params.get("objective", "").partition(" ")
    return Objective(direction, metric) if metric else None


@contextlib.contextmanager
def database_lock(url: str, key: str) -> Iterator[bool]:
    """An exclusive lock named `key` among the processes sharing the database at `url`; yields whether one is held.

    PostgreSQL: an advisory lock per key (across machines). A sqlite file or an Optuna journal (`journal:PATH`):
    a file lock beside it, shared by all keys (one machine). Anything else (an `mlflow server`, another RDB):
    no lock; the caller re-reads and verifies instead.
    """
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(727274, hashtext(:k))"), {"k": key})
                try:
                    yield True
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(727274, hashtext(:k))"), {"k": key})
        finally:
            engine.dispose()
        return
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
    elif url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
    else:
        yield False
        return
    # not "<journal>.lock": that is the name of Optuna's own journal lock (a symlink); a regular file
    # there blocks every journal write for its 30 s grace period, then Optuna deletes it under us
    with file_lock(path.with_name(path.name + ".slots.lock")):
        yield True
