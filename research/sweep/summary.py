"""The end of a study: close its parent run with the outcome (best trial, counts, plots), print the top trials."""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as ovm
from rich.console import Console
from rich.table import Table

from research import registry, tracking
from research.config import TrainConfig
from research.sweep.spec import SweepSpec
from research.sweep.storage import open_study

console = Console()


def summarize(spec: SweepSpec, storage_url: str | None, spec_path: str | None = None) -> dict[str, Any]:
    """Close the parent run with the study's outcome: best params/value, counts, plots; print the top."""
    tracking.setup()
    study = open_study(spec, storage_url)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {"study": spec.study_name, "counts": counts, "parent_run_id": parent}
    if done:
        best = study.best_trial
        summary |= {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
                    "best_run_id": best.user_attrs.get("mlflow_run_id")}
    if parent:
        close_parent_run(mlflow.MlflowClient(), parent, study, spec, summary)
    print_top(done, spec, summary)
    return summary


def close_parent_run(client: mlflow.MlflowClient, parent: str, study: optuna.Study, spec: SweepSpec,
                     summary: dict[str, Any]) -> None:
    for state, n in summary["counts"].items():
        client.log_metric(parent, f"n_{state.lower()}", n)
    if "best_value" in summary:
        client.log_metric(parent, f"best_{spec.objective.metric}", summary["best_value"])
        client.set_tag(parent, "best_trial", str(summary["best_trial"]))
        client.set_tag(parent, "best_run_id", str(summary["best_run_id"]))
    client.log_dict(parent, summary, "study_summary.json")
    log_plots(client, parent, study)
    # stray child runs of dead workers: never leave one RUNNING
    for t in study.get_trials(deepcopy=False):
        rid = t.user_attrs.get("mlflow_run_id")
        if rid and t.state != TrialState.RUNNING:
            with contextlib.suppress(Exception):
                if client.get_run(rid).info.status == "RUNNING":
                    client.set_terminated(rid, "KILLED")
    client.set_terminated(parent, "FINISHED")


def log_plots(client: mlflow.MlflowClient, parent: str, study: optuna.Study) -> None:
    plots = {"optimization_history": ovm.plot_optimization_history, "slice": ovm.plot_slice,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) >= 2 and len(study.best_trial.params) >= 1:
        plots["param_importances"] = ovm.plot_param_importances
    matplotlib.use("Agg")  # optuna draws through pyplot: files only, never a window
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # one completed trial gives every parallel-coordinate axis a single value: matplotlib widens it,
        # and says so once per axis
        warnings.filterwarnings("ignore", message="Attempting to set identical", category=UserWarning)
        for name, fn in plots.items():
            try:
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
                path = Path(tmp) / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(fig)
                client.log_artifact(parent, str(path), artifact_path="plots")
            except Exception as exc:  # a plot needs enough trials; the study's result does not
                console.print(f"[dim]plot {name} skipped: {exc}")


def print_top(done: list[FrozenTrial], spec: SweepSpec, summary: dict[str, Any], top: int = 5) -> None:
    done = sorted(done, key=lambda t: t.value, reverse=spec.objective.direction == "maximize")
    table = Table(title=f"study {spec.study_name}: {summary['counts']}")
    for col in ("trial", spec.objective.metric, "test_f1_macro", "params", "run"):
        table.add_column(col)
    for t in done[:top]:
        test = t.user_attrs.get("test_f1_macro")
        table.add_row(str(t.number), f"{t.value:.4f}", "" if test is None else f"{test:.4f}",
                      json.dumps(t.params, default=str), str(t.user_attrs.get("mlflow_run_id", "")))
    console.print(table)
    if done:
        model = done[0].params.get("model", spec.base.get("model", TrainConfig().model))
        console.print(f"promote the best trial: [bold]{promote_command(spec.study_name, model)}[/]",
                      soft_wrap=True)  # one line, so it copies as a command


def promote_command(study_name: str, model: str) -> str:
    """The command that promotes this study's best run; `--model-filter` only where promote's default
    filter (registry.DEFAULT_FILTER; None = any architecture) would pass over `model`."""
    command = f"python -m research promote --study {study_name}"
    default = registry.DEFAULT_FILTER
    if default is not None and default != model:
        command += f" --model-filter {model}"
    return command
