"""`python -m research runs` (a leaderboard in the terminal) and `python -m research ui` (the MLflow UI).

The leaderboard ranks training runs by their best val macro F1 over epochs (the epoch whose
checkpoint became the model), with the test macro F1 of that checkpoint beside it. Study parent
runs are left out; their trials are listed (`--study NAME` for one study). `--studies` lists the
studies instead, one row each.

The table shows the columns that fit the terminal, in the order of RUN_COLUMNS / STUDY_COLUMNS (most
wanted first), and never cuts a value; `--columns` picks them, `--format csv|json` gives every column
at full precision.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from research import tracking
from research.errors import ConfigError
from research.runquery import experiment_ids, quote
from research.store import DEFAULT_OBJECTIVE, search_all_runs, selection_value, study_objective

# the row keys, in the order the table shows them and keeps them when the terminal is narrow (the first ones win)
RUN_COLUMNS = ("val_f1", "test_f1", "model", "name", "duration", "status", "run_id", "lr", "batch", "dataset",
               "schedule", "loss", "sampler", "study", "trial")
STUDY_COLUMNS = ("study", "best_trial", "best_value", "complete", "pruned", "failed", "running", "duration", "model",
                 "objective", "best_run_id")
NUMERIC = {"val_f1", "test_f1", "duration", "lr", "batch", "trial", "best_trial", "best_value", "complete", "pruned",
           "failed", "running"}


# ------------------------------------------------------------------------------ runs and studies

def _search(experiment: str | None, study: str | None):
    """The MLflow client and every run in scope (trials, plain runs and study parents)."""
    import mlflow

    tracking.setup()
    tracking.check_reachable()
    client = mlflow.MlflowClient()
    ids = experiment_ids(client, experiment)
    filter_string = f"tags.optuna_study = {quote(study)}" if study else ""
    return client, search_all_runs(client, ids, filter_string) if ids else []


def leaderboard(experiment: str | None = None, study: str | None = None, top: int | None = 20) -> list[dict]:
    """Training runs (not study parents), best val macro F1 first; one dict per run, keyed by RUN_COLUMNS."""
    client, runs = _search(experiment, study)
    rows = []
    for run in runs:
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        if tags.get("optuna_role") == "parent" or "model" not in params:
            continue
        rows.append({
            "name": run.info.run_name or "", "model": params["model"],
            "val_f1": selection_value(client, run, "val_f1_macro"), "test_f1": metrics.get("test_f1_macro"),
            "duration": _duration(run), "status": run.info.status, "run_id": run.info.run_id,
            "lr": _param(params, "lr", float), "batch": _param(params, "batch_size", int),
            # the dataset_version param may be a version directory: its name
            "dataset": Path(params.get("dataset_version", "")).name, "schedule": params.get("lr_schedule", ""),
            "loss": params.get("loss", ""), "sampler": params.get("sampler", ""),
            "study": tags.get("optuna_study", ""), "trial": _param(tags, "optuna_trial", int),
        })
    rows.sort(key=lambda r: (r["val_f1"] is None, -(r["val_f1"] or 0.0)))
    return rows[:top] if top else rows


def studies(experiment: str | None = None, study: str | None = None, top: int | None = 20) -> list[dict]:
    """One dict per Optuna study (its MLflow parent run), newest first, keyed by STUDY_COLUMNS: the best
    complete trial by the study's objective, the trials' counts by state, the parent run's wall time."""
    client, runs = _search(experiment, study)
    trials = defaultdict(list)
    for run in runs:
        trials[run.data.tags.get("mlflow.parentRunId")].append(run)
    parents = sorted((r for r in runs if r.data.tags.get("optuna_role") == "parent"),
                     key=lambda r: r.info.start_time, reverse=True)
    rows = []
    for parent in parents[:top] if top else parents:
        objective = study_objective(parent) or DEFAULT_OBJECTIVE
        children = trials[parent.info.run_id]
        states = Counter(_trial_state(r) for r in children)
        scored = [(selection_value(client, r, objective.metric), r) for r in children if _trial_state(r) == "COMPLETE"]
        scored = [(v, r) for v, r in scored if v is not None]
        pick = max if objective.maximize else min
        value, best = pick(scored, key=lambda vr: vr[0], default=(None, None))
        info = parent.info
        rows.append({
            "study": parent.data.tags.get("optuna_study", ""),
            "best_trial": best and _param(best.data.tags, "optuna_trial", int), "best_value": value,
            "complete": states["COMPLETE"], "pruned": states["PRUNED"], "failed": states["FAIL"],
            "running": states["RUNNING"],
            "duration": (info.end_time - info.start_time) / 1000.0 if info.end_time else None,
            "model": best and best.data.params.get("model"), "objective": str(objective),
            "best_run_id": best and best.info.run_id,
        })
    return rows


def _trial_state(run) -> str:
    """The Optuna state the worker tagged, else the run's own: a trial untagged yet, or whose worker died."""
    tagged = run.data.tags.get("optuna_state")
    return tagged or {"RUNNING": "RUNNING", "FINISHED": "COMPLETE"}.get(run.info.status, "FAIL")


def _param(values: dict, key: str, kind: type):
    return kind(values[key]) if values.get(key) else None


def _duration(run) -> float | None:
    """Training time (metric total_seconds), else wall time of the run."""
    total = run.data.metrics.get("total_seconds")
    if total is not None:
        return float(total)
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def fmt_seconds(s: float | None) -> str:
    """A duration for a table: seconds, to one decimal under 10 s; minutes from 2 min; "-" for none."""
    if s is None or math.isnan(s):
        return "-"
    return f"{s:.1f}s" if s < 10 else f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


# ------------------------------------------------------------------------------ output

def _cell(column: str, value) -> str:
    """A value at a short fixed precision: F1 and objective values to 4 decimals, lr to 4 significant digits."""
    if value is None or value == "":
        return "-"
    if column == "duration":
        return fmt_seconds(value)
    if isinstance(value, float):
        return f"{value:.4g}" if column == "lr" else f"{value:.4f}"
    return str(value)


def make_table(rows: list[dict], columns: list[str], title: str | None = None) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for col in columns:
        table.add_column(col, justify="right" if col in NUMERIC else "left", overflow="fold")
    for r in rows:
        # Text, not str: a run name is never read as rich markup
        table.add_row(*(Text(_cell(col, r[col])) for col in columns),
                      style=None if r.get("status", "FINISHED") == "FINISHED" else "dim")
    return table


def fit_columns(console: Console, rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    """The columns, in order, whose full values fit the console's width side by side; one too wide for the
    room left is skipped, and a narrower one after it may still fit."""
    chosen: list[str] = []
    for col in columns:
        table = make_table(rows, [*chosen, col])
        unbounded = console.options.update_width(sys.maxsize)  # its natural width, not squeezed into the console
        if Measurement.get(console, unbounded, table).maximum <= console.width:
            chosen.append(col)
    return chosen or list(columns[:1])


def pick_columns(names: str | None, valid: tuple[str, ...], command: str) -> list[str] | None:
    """`--columns a,b,c` as a list (None when not given); an unknown name is an error that lists the valid ones."""
    if names is None:
        return None
    picked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in picked if n not in valid]
    if unknown or not picked:
        raise ConfigError(f"--columns {names!r}: unknown column {', '.join(unknown) or '(none given)'} for "
                          f"`{command}`; choose from {','.join(valid)}")
    return picked


def print_rows(rows: list[dict], columns: list[str] | None, fmt: str, title: str, all_columns: tuple[str, ...],
               console: Console) -> None:
    """`rows` as a table that fits the console (or exactly `columns`), or as csv / json with full values."""
    if fmt == "json":
        print(json.dumps([{c: r[c] for c in columns or all_columns} for r in rows], indent=2))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, columns or all_columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        shown = columns or fit_columns(console, rows, all_columns)
        console.print(make_table(rows, shown, title))
        hidden = [c for c in all_columns if c not in shown]
        if hidden and not columns:
            console.print(f"not shown at {console.width} columns: {', '.join(hidden)}; pick columns with "
                          f"--columns (e.g. --columns {','.join([*shown[:2], hidden[0]])}), or all of them with "
                          "--format csv|json", highlight=False)


# ------------------------------------------------------------------------------ ui

def ui_command(host: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow ui` on the local tracking store (same database, same artifact root as training)."""
    uri = tracking.tracking_uri()
    if not tracking.is_local(uri):
        raise ConfigError(f"MLFLOW_TRACKING_URI={uri} is a server already: open it in a browser "
                          "(unset MLFLOW_TRACKING_URI to browse the local store under mlruns/).")
    tracking.setup()  # creates mlruns/ for a first-time user
    artifacts = (tracking.home() / "artifacts").as_uri()
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root", artifacts,
            "--host", host, "--port", str(port), "--workers", str(workers)]


# ------------------------------------------------------------------------------ CLI

def add_arguments(parser, name: str) -> None:
    if name == "runs":
        parser.add_argument("--experiment", help="only this MLflow experiment (default: all)")
        parser.add_argument("--study", help="only the trials of this Optuna study")
        parser.add_argument("--studies", action="store_true",
                            help="one row per study: best trial, trials by state, wall time")
        parser.add_argument("--top", type=int, default=20, help="rows to show (default 20; 0 = all)")
        parser.add_argument("--columns", metavar="A,B,...",
                            help=f"exactly these columns, in this order; runs: {', '.join(RUN_COLUMNS)}; "
                                 f"with --studies: {', '.join(STUDY_COLUMNS)} (default: those that fit the terminal)")
        parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                            help="csv and json: every column, full precision, duration in seconds")
    elif name == "ui":
        parser.add_argument("--port", type=int, default=5000)
        parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to reach it from other machines")
        parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: fast start)")


def run(args) -> int:
    console = Console()  # reads COLUMNS now, not at import
    if args.command == "runs":
        if args.top < 0:  # a negative slice would quietly drop rows from the end
            raise ConfigError(f"--top {args.top}: give how many rows to show (0 shows all).")
        all_columns = STUDY_COLUMNS if args.studies else RUN_COLUMNS
        columns = pick_columns(args.columns, all_columns, "runs --studies" if args.studies else "runs")
        rows = (studies if args.studies else leaderboard)(args.experiment, args.study, args.top or None)
        scope = " ".join(f"{k} {v}" for k, v in (("experiment", args.experiment), ("study", args.study)) if v)
        what = "studies" if args.studies else "training runs"
        if not rows and args.format == "table":
            console.print(f"No {what} in {scope or 'the store'} ({tracking.tracking_uri()}).")
            return 0
        title = "studies, newest first" if args.studies else "runs by best val macro F1"
        print_rows(rows, columns, args.format, f"{title} ({scope or 'all experiments'})", all_columns, console)
        return 0
    if args.command == "ui":
        cmd = ui_command(args.host, args.port, args.workers)
        console.print(f"MLflow UI on [bold]http://{args.host}:{args.port}[/] "
                      f"(store {tracking.tracking_uri()}); Ctrl-C stops it.")
        sys.stdout.flush()
        job_execution = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=job_execution)
        env.pop("MLFLOW_CONFIGURE_LOGGING", None)  # research.logs keeps MLflow quiet here; the server logs as usual
        os.execvpe(cmd[0], cmd, env)
    raise ConfigError(f"unknown command {args.command!r} for research.runs")
