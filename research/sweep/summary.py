"""The end of a study: close its parent run with the outcome (best trial, counts, plots), print the top trials."""

from __future__ import annotations

import contextlib
import shlex
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import optuna
from mlflow.entities import Metric
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as ovm
from rich.console import Console

from research import tracking
from research.sweep.spec import SweepSpec
from research.sweep.storage import open_study

console = Console()
HEADLINE_METRICS = ("test_f1_macro", "test_accuracy")  # of the best trial, on the parent run as best_*


def summarize(spec: SweepSpec, storage_url: str | None, spec_path: str | None = None) -> dict[str, Any]:
    """Close the parent run with the study's outcome: best params/value, counts, plots; print it in words."""
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
        experiment = study.user_attrs["mlflow_experiment_id"]  # set with the parent run id
        summary |= {"parent_url": tracking.run_url(parent, experiment), "runs_url": tracking.experiment_url(experiment)}
        close_parent_run(mlflow.MlflowClient(), parent, study, spec, summary)
    # one line per command, never wrapped, so each copies as a command
    console.print(summary_text(done, spec, summary, storage_url), markup=False, soft_wrap=True)
    return summary


def close_parent_run(client: mlflow.MlflowClient, parent: str, study: optuna.Study, spec: SweepSpec,
                     summary: dict[str, Any]) -> None:
    client.log_batch(parent, metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                      for k, v in parent_metrics(client, spec, summary).items()])
    if "best_value" in summary:
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


def parent_metrics(client: mlflow.MlflowClient, spec: SweepSpec, summary: dict[str, Any]) -> dict[str, float]:
    """Trial counts (`n_complete`, ...) and the best trial's number, objective and test headline metrics as
    `best_*`: metrics, so the UI's runs table sorts and charts studies side by side."""
    metrics = {f"n_{state.lower()}": n for state, n in summary["counts"].items()}
    if "best_value" in summary:
        best = client.get_run(summary["best_run_id"]).data.metrics if summary["best_run_id"] else {}
        metrics |= {f"best_{k}": best[k] for k in HEADLINE_METRICS if k in best}
        metrics |= {f"best_{spec.objective.metric}": summary["best_value"], "best_trial": summary["best_trial"]}
    return metrics


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


def summary_text(done: list[FrozenTrial], spec: SweepSpec, summary: dict[str, Any], storage_url: str | None,
                 top: int = 5) -> str:
    """The study's outcome in words: aligned labels, rounded numbers (4 decimals for the objective and F1, 4
    significant digits for float params), and the commands to run next."""
    metric, name = spec.objective.metric, spec.study_name
    done = sorted(done, key=lambda t: t.value, reverse=spec.objective.direction == "maximize")
    counts = summary["counts"]
    states = [f"{counts['COMPLETE']} complete", f"{counts['PRUNED']} pruned", f"{counts['FAIL']} failed"]
    states += [f"{counts[s]} {s.lower()}" for s in ("RUNNING", "WAITING") if counts[s]]
    rows = [("study", f"{name}: {sum(counts.values())} trials, {', '.join(states)}"),
            ("objective", f"{spec.objective.direction} {metric}")]
    if done:
        best = done[0]
        rows += [("best trial", f"#{best.number}: {metric} {best.value:.4f}, test macro F1 {_test_f1(best)}"),
                 ("", params_text(best.params)), ("", f"MLflow run {best.user_attrs.get('mlflow_run_id', 'n/a')}")]
        width = len(str(max(t.number for t in done[:top])))
        rows += [("top trials" if i == 0 else "",
                  f"#{t.number:<{width}}  {t.value:.4f}  test {_test_f1(t):<6}  {params_text(t.params)}")
                 for i, t in enumerate(done[:top])]
    else:
        rows.append(("best trial", "none yet: no trial completed"))
    rows.append(("parent run", summary["parent_run_id"] or "n/a"))
    if summary.get("parent_url"):
        rows += [("UI", summary["parent_url"]), ("", f"{summary['runs_url']}  (runs table, studies side by side)")]
    commands = [f"python -m research runs --study {name}",
                "python -m research ui" if tracking.is_local() else f"open {tracking.tracking_uri()} in a browser"]
    if done:
        storage = f" --storage {shlex.quote(storage_url)}" if storage_url else ""
        commands = [promote_command(name), f"python -m research report --study {name}{storage}", *commands]
    rows += [("next" if i == 0 else "", command) for i, command in enumerate(commands)]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}".rstrip() for label, text in rows)


def _test_f1(trial: FrozenTrial) -> str:
    test = trial.user_attrs.get("test_f1_macro")
    return "n/a" if test is None else f"{test:.4f}"


def params_text(params: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return text or "no searched params"


def promote_command(study_name: str) -> str:
    """The command that promotes this study's best run (by the study's objective, of any architecture)."""
    return f"python -m research promote --study {shlex.quote(study_name)}"
