"""Queries over runs: which runs are in scope, and which of them is best on a validation metric.

The scope is experiments by name (`experiment_ids`) and filter strings (`run_filter`, values quoted by `quote`);
a `Candidate` is a FINISHED run that has a model, with its figure at the epoch whose weights it kept
(research.store.selection_value); `ranked_runs` orders them, best first, ties to the earlier run. Only validation
metrics choose (`check_selection_metric`), and an ensemble never on a loss (`check_ensemble_metric`).
research/registry.py registers what these pick; research/runs.py lists runs in the same scope.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from research import tracking
from research.errors import ConfigError, first_line
from research.store import logged_models, minimise, search_all_runs, selection_value, study_objective

TORCH_NAME = "model"  # the torch model's name inside a training run (research/train.py)
DEFAULT_FILTER = None  # any architecture: the best run wins, whatever its params.model
DEFAULT_METRIC = "val_f1_macro"
WEIGHTS_DELETED = "weights_deleted"  # run tag where the keep rules dropped the weights (research/artifacts.py)


def check_selection_metric(metric: str) -> None:
    """Only validation metrics choose: a champion picked on test would carry an optimistic test score."""
    if not metric.startswith("val_"):
        raise ConfigError(
            f"--metric {metric!r}: promote ranks and gates on a validation metric only (the test split reports, "
            "it never chooses: a champion picked on test has an optimistic test score). Use --metric val_f1_macro "
            "(the default), val_accuracy or val_loss."
        )


def check_ensemble_metric(metric: str) -> None:
    """An ensemble is ranked and gated on a metric that temperatures cannot move (macro F1, accuracy): its val
    loss is measured at temperatures fitted on that same val (each member's, then the average's), a single
    run's at temperature 1, so a loss would favour the ensemble for how it was measured."""
    if minimise(metric):
        raise ConfigError(
            f"--metric {metric!r}: an ensemble's val loss is measured at temperatures fitted on that same val, a "
            "single run's at temperature 1, so the two are not comparable. An ensemble is gated on the val metric "
            f"the study optimised when it is a label metric: use --metric {DEFAULT_METRIC} (or val_accuracy).")


@dataclasses.dataclass
class Candidate:
    """A FINISHED run that has a model, and its figure on the selection `metric`."""

    run: Any  # mlflow.entities.Run
    score: float  # the metric at the epoch whose weights the run kept (store.selection_value)
    metric: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def test_f1(self) -> float | None:
        return self.run.data.metrics.get("test_f1_macro")

    @property
    def ensemble(self) -> bool:
        return "ensemble_of" in self.run.data.tags

    @property
    def dataset_digest(self) -> str:
        return self.run.data.params.get("dataset_digest", "")

    @property
    def teacher(self) -> str:
        """The pinned teacher it was distilled from (models:/NAME/VERSION), "" for none (research/inputs/teacher.py)."""
        return self.run.data.params.get("teacher", "") or ""

    @property
    def teacher_run_id(self) -> str:
        return self.run.data.params.get("teacher.run_id", "") or ""

    @property
    def where(self) -> str:
        """Where the run came from, in words: `study demo trial 3, run <id>`."""
        tags = self.run.data.tags
        if "optuna_study" not in tags:
            return f"run {self.run_id}"
        return f"study {tags['optuna_study']} trial {tags.get('optuna_trial', '?')}, run {self.run_id}"


def experiment_ids(client, experiment: str | None) -> list[str]:
    """The id of the experiment named `experiment` (a ConfigError listing the names when there is none), else of
    every experiment."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"No MLflow experiment named {experiment!r}. Experiments: {', '.join(names) or 'none'}.")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


def quote(value: str) -> str:
    """`value` as a string literal in an MLflow filter string: single-quoted, its own quotes escaped."""
    return "'" + value.replace("'", "\\'") + "'"


def study_metric(client, study: str) -> str | None:
    """The metric a study optimised (as its parent run recorded it, `store.study_objective`), or None."""
    parents = search_all_runs(client, experiment_ids(client, None),
                              f"tags.optuna_study = {quote(study)} and tags.optuna_role = 'parent'")
    for parent in parents:
        objective = study_objective(parent)
        if objective:
            return objective.metric
    return None


def run_filter(study: str | None, model_filter: str | None) -> str:
    parts = ["attributes.status = 'FINISHED'"]
    if model_filter:
        parts.append(f"params.model = {quote(model_filter)}")
    if study:
        parts.append(f"tags.optuna_study = {quote(study)}")
    return " and ".join(parts)


def runs_with_model(client, experiment_ids: list[str]) -> set[str]:
    """Run ids that logged a torch model named `model` (MLflow 3 keeps it as a LoggedModel)."""
    return {m.source_run_id for m in logged_models(client, experiment_ids, name=TORCH_NAME) if m.source_run_id}


def pick_run(client, *, study: str | None = None, run_id: str | None = None, experiment: str | None = None,
             model_filter: str | None = DEFAULT_FILTER, metric: str = DEFAULT_METRIC) -> Candidate:
    """The run to promote: `run_id` itself, or the best FINISHED run with a model in the scope by `metric` (val)."""
    check_selection_metric(metric)
    if run_id:
        return named_run(client, run_id, metric)
    return ranked_runs(client, study=study, experiment=experiment, model_filter=model_filter, metric=metric)[0]


def ranked_runs(client, *, study: str | None = None, experiment: str | None = None,
                model_filter: str | None = DEFAULT_FILTER, metric: str = DEFAULT_METRIC) -> list[Candidate]:
    """The FINISHED runs with a model in the scope, best first by `metric` (a val metric); never empty."""
    check_selection_metric(metric)
    model_filter = None if model_filter in (None, "", "any") else model_filter
    ids = experiment_ids(client, experiment)
    runs = search_all_runs(client, ids, run_filter(study, model_filter)) if ids else []
    with_model = runs_with_model(client, ids) if runs else set()
    scored = []
    for run in runs:
        if run.info.run_id not in with_model:
            continue
        value = selection_value(client, run, metric)
        if value is not None:
            scored.append(Candidate(run, value, metric))
    if not scored:
        scope = " ".join(f"{k}={v!r}" for k, v in (("study", study), ("experiment", experiment),
                                                    ("model", model_filter)) if v) or "all experiments"
        train = "python -m research train" + (f" --model {model_filter}" if model_filter else "")
        widen = "drop --model-filter, " if model_filter else ""
        raise ConfigError(
            f"No FINISHED run with a model and metric {metric!r} in {scope} ({len(runs)} finished run(s) matched "
            f"the filter). Train one (`{train}`), or widen the search: {widen}another --study/--experiment, "
            "or --run RUN_ID."
        )
    sign = -1.0 if minimise(metric) else 1.0
    # ties go to the earlier run: a re-run that merely equals the champion does not displace it
    scored.sort(key=lambda c: (-sign * c.score, c.run.info.start_time or 0))
    return scored


def named_run(client, run_id: str, metric: str) -> Candidate:
    """`run_id` as a Candidate, checked: it exists, it is FINISHED, it has its model, an ensemble not on a loss.
    Its score is NaN when it has no value of `metric`."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"No MLflow run {run_id!r} in {tracking.tracking_uri()} ({first_line(exc)}).") from exc
    if run.info.status != "FINISHED":
        raise ConfigError(f"Run {run_id} is {run.info.status}, not FINISHED; only finished runs can be promoted "
                          "(pruned trials end KILLED and have no model).")
    run_model(client, run_id)  # or the error saying why it has none
    if "ensemble_of" in run.data.tags:
        check_ensemble_metric(metric)
    value = selection_value(client, run, metric)
    return Candidate(run, math.nan if value is None else value, metric)


def run_model(client, run_id: str):
    """The run's live logged model `model` (its best weights), or a ConfigError naming why there is none."""
    run = client.get_run(run_id)
    found = [m for m in logged_models(client, [run.info.experiment_id], {run_id}) if m.name == TORCH_NAME]
    if not found:
        why = ("its weights were dropped by its study's keep_top_k" if run.data.tags.get(WEIGHTS_DELETED) == "true"
               else "it was not logged by research/train.py, or the run was pruned")
        raise ConfigError(f"Run {run_id} has no model `{TORCH_NAME}`: {why}.")
    return max(found, key=lambda m: m.creation_timestamp or 0)
