"""`python -m research runs` (a leaderboard in the terminal) and `python -m research ui` (the MLflow UI).

The leaderboard ranks training runs by their best val macro F1 over epochs (the epoch whose
checkpoint became the model), with the test macro F1 of that checkpoint beside it. Study parent
runs are left out; their trials are listed (`--study NAME` for one study).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from research import tracking
from research.config import ConfigError

console = Console()
COLUMNS = ("run", "name", "status", "model", "dataset", "batch", "lr schedule", "loss", "sampler",
           "val F1", "test F1", "duration")


# ------------------------------------------------------------------------------ runs

def leaderboard(experiment: str | None = None, study: str | None = None, top: int | None = 20) -> list[dict]:
    """Training runs (not study parents), best val macro F1 first; one dict per run."""
    import mlflow

    from research.registry import _experiment_ids, _quote, best_value, search_all_runs

    tracking.setup()
    tracking.check_reachable()
    client = mlflow.MlflowClient()
    ids = _experiment_ids(client, experiment)
    filter_string = f"tags.optuna_study = {_quote(study)}" if study else ""
    runs = search_all_runs(client, ids, filter_string) if ids else []
    rows = []
    for run in runs:
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        if tags.get("optuna_role") == "parent" or "model" not in params:
            continue
        val = best_value(client, run, "val_f1_macro")
        rows.append({
            "run_id": run.info.run_id, "name": run.info.run_name or "", "status": run.info.status,
            # the dataset_version param may be a version directory: its name
            "model": params.get("model", ""), "dataset": Path(params.get("dataset_version", "")).name,
            "batch": params.get("batch_size", ""), "lr": params.get("lr", ""),
            "lr_schedule": params.get("lr_schedule", ""), "loss": params.get("loss", ""),
            "sampler": params.get("sampler", ""), "val_f1_macro": val,
            "test_f1_macro": metrics.get("test_f1_macro"), "seconds": _duration(run),
            "study": tags.get("optuna_study", ""), "trial": tags.get("optuna_trial", ""),
        })
    rows.sort(key=lambda r: (r["val_f1_macro"] is None, -(r["val_f1_macro"] or 0.0)))
    return rows[:top] if top else rows


def _duration(run) -> float | None:
    """Training time (metric total_seconds), else wall time of the run."""
    total = run.data.metrics.get("total_seconds")
    if total is not None:
        return float(total)
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def _fmt_seconds(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


def _fmt(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def print_leaderboard(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("batch", "val F1", "test F1", "duration") else "left")
    for r in rows:
        style = None if r["status"] == "FINISHED" else "dim"
        table.add_row(
            r["run_id"][:8], r["name"], r["status"], r["model"], r["dataset"], str(r["batch"]),
            r["lr_schedule"] + (f" ({r['lr']})" if r["lr"] else ""), r["loss"], r["sampler"],
            _fmt(r["val_f1_macro"]), _fmt(r["test_f1_macro"]), _fmt_seconds(r["seconds"]), style=style,
        )
    console.print(table)


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
        parser.add_argument("--top", type=int, default=20, help="rows to show (default 20; 0 = all)")
    elif name == "ui":
        parser.add_argument("--port", type=int, default=5000)
        parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to reach it from other machines")
        parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: fast start)")


def run(args) -> int:
    if args.command == "runs":
        rows = leaderboard(args.experiment, args.study, args.top or None)
        scope = " ".join(f"{k} {v}" for k, v in (("experiment", args.experiment), ("study", args.study)) if v)
        if not rows:
            console.print(f"No training runs in {scope or 'the store'} ({tracking.tracking_uri()}).")
            return 0
        print_leaderboard(rows, f"runs by best val macro F1 ({scope or 'all experiments'})")
        return 0
    if args.command == "ui":
        cmd = ui_command(args.host, args.port, args.workers)
        console.print(f"MLflow UI on [bold]http://{args.host}:{args.port}[/] "
                      f"(store {tracking.tracking_uri()}); Ctrl-C stops it.")
        sys.stdout.flush()
        job_execution = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=job_execution)
        os.execvpe(cmd[0], cmd, env)
    raise ConfigError(f"unknown command {args.command!r} for research.runs")
