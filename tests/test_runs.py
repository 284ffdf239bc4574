"""`runs` and `ui` (research.runs): the leaderboard and the MLflow UI command over real trained runs in a
private store (the `store` fixture, tests/conftest.py); the table's fit to the terminal, csv/json and
`--studies` over runs logged here with mlflow in a store of their own (`logged`)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from research.cli import main
from research.runs import RUN_COLUMNS
from tests.conftest import EXPERIMENT, private_store

TABLE = "runs-table"  # the experiment of the `logged` fixture's runs
LR = 0.0265122597429743


@pytest.fixture(scope="module")
def logged_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A store of its own (no training) with runs logged through mlflow: two plain runs and study `tbl`, a
    parent run with five trials (complete, complete, pruned, failed, still running). Its root, run name -> id."""
    root = tmp_path_factory.mktemp("runs-table")
    with pytest.MonkeyPatch.context() as mp:
        private_store(mp, root)
        return root, log_runs()


@pytest.fixture
def logged(logged_store, monkeypatch) -> dict[str, str]:
    """`logged_store` as the current store, for one test."""
    root, ids = logged_store
    monkeypatch.setenv("RESEARCH_MLRUNS", str(root / "mlruns"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return ids


def log_runs() -> dict[str, str]:
    import mlflow

    # an explicit experiment id, not mlflow.set_experiment: that sets a process-wide default that later tests,
    # each with its own store, would inherit
    experiment_id = mlflow.MlflowClient().create_experiment(TABLE)
    ids = {}

    def log_run(name, model, lr, val, test, seconds, trial=None, state=None, status="FINISHED"):
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=trial is not None) as run:
            mlflow.log_params({"model": model, "dataset_version": "data/versions/v3", "batch_size": 64, "lr": lr,
                               "lr_schedule": "cosine", "loss": "focal", "sampler": "weighted"})
            for epoch, value in enumerate(val):
                mlflow.log_metric("val_f1_macro", value, step=epoch)
            if test is not None:
                mlflow.log_metric("test_f1_macro", test)
            mlflow.log_metric("total_seconds", seconds)
            if trial is not None:
                mlflow.set_tags({"optuna_study": "tbl", "optuna_trial": str(trial), "optuna_state": state})
            mlflow.end_run(status)
        ids[name] = run.info.run_id

    log_run("baseline-with-a-rather-long-name-for-the-table", "efficientnet_lite0", LR, [0.41, 0.6123456789],
            0.5987654321, 754.2)
    log_run("weak", "resnet18", 1e-7, [0.05123], 0.04, 33.3)
    with mlflow.start_run(experiment_id=experiment_id, run_name="study tbl") as parent:
        mlflow.set_tags({"optuna_study": "tbl", "optuna_role": "parent"})
        mlflow.log_param("objective", "maximize val_f1_macro")
        log_run("tbl-trial-0", "resnet18", 0.00123456, [0.3, 0.5], 0.45, 100, 0, "COMPLETE")
        log_run("tbl-trial-1", "vgg16_v2", 0.0543219, [0.2, 0.55, 0.52], 0.5, 200, 1, "COMPLETE")
        log_run("tbl-trial-2", "resnet18", 0.1, [0.1], None, 20, 2, "PRUNED", status="KILLED")
        log_run("tbl-trial-3", "resnet18", 0.2, [], None, 5, 3, "FAIL", status="FAILED")
    ids["study tbl"] = parent.info.run_id
    # a trial whose worker is still at it: a RUNNING child run, no state tag yet
    running = mlflow.MlflowClient().create_run(experiment_id, run_name="tbl-trial-4", tags={
        "mlflow.parentRunId": parent.info.run_id, "optuna_study": "tbl", "optuna_trial": "4"})
    mlflow.MlflowClient().log_param(running.info.run_id, "model", "resnet18")
    ids["tbl-trial-4"] = running.info.run_id
    return ids


def runs_out(capsys, monkeypatch, width: int, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    capsys.readouterr()
    assert main(["runs", "--experiment", TABLE, *args]) == 0
    return capsys.readouterr().out


def header(out: str, first: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(first)).split()


def test_runs_leaderboard_ranks_by_best_val_f1(store, capsys, monkeypatch):
    from research.runs import leaderboard

    rows = leaderboard(experiment=EXPERIMENT)
    assert {r["run_id"] for r in rows} == {store.good, store.weak}
    assert rows[0]["val_f1"] >= rows[1]["val_f1"]
    assert all(r["model"] == "resnet18" and r["dataset"] == "tiny" and r["duration"] > 0 for r in rows)
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["runs", "--experiment", EXPERIMENT, "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and store.good in out


@pytest.mark.parametrize("width", [80, 160])
@pytest.mark.slow
def test_runs_table_fits_the_terminal_with_whole_values(logged, capsys, monkeypatch, width):
    out = runs_out(capsys, monkeypatch, width)
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    shown = header(out, "val_f1")
    # the values each column shows, whole (at 4 decimals, 4 significant digits for lr, durations in words)
    baseline = {"val_f1": "0.6123", "test_f1": "0.5988", "model": "efficientnet_lite0", "duration": "12.6min",
                "name": "baseline-with-a-rather-long-name-for-the-table",
                "run_id": logged["baseline-with-a-rather-long-name-for-the-table"], "lr": "0.02651", "batch": "64"}
    weak = {"val_f1": "0.0512", "test_f1": "0.0400", "duration": "33s", "lr": "1e-07", "run_id": logged["weak"]}
    for expected in (baseline, weak):
        for column in set(shown) & set(expected):
            assert expected[column] in out, (column, expected[column])
    hidden = re.search(rf"not shown at {width} columns: (.*?); pick columns with --columns", " ".join(out.split()))
    assert hidden, out
    assert set(shown) | set(hidden.group(1).split(", ")) == set(RUN_COLUMNS)
    assert {"val_f1", "test_f1", "model"} <= set(shown)
    if width == 160:
        assert {"name", "duration", "status", "run_id", "lr"} <= set(shown)


def test_runs_csv_and_json_hold_every_column_at_full_precision(logged, capsys, monkeypatch):
    from research.runs import leaderboard

    rows = leaderboard(experiment=TABLE)
    as_json = json.loads(runs_out(capsys, monkeypatch, 80, "--format", "json"))
    assert as_json == rows
    base = as_json[0]
    assert base["run_id"] == logged["baseline-with-a-rather-long-name-for-the-table"]
    assert (base["val_f1"], base["test_f1"], base["lr"], base["duration"]) == (0.6123456789, 0.5987654321, LR, 754.2)
    as_csv = list(csv.DictReader(io.StringIO(runs_out(capsys, monkeypatch, 80, "--format", "csv"))))
    assert [r["run_id"] for r in as_csv] == [r["run_id"] for r in rows]
    assert float(as_csv[0]["val_f1"]) == 0.6123456789 and float(as_csv[0]["lr"]) == LR
    assert as_csv[0]["name"] == "baseline-with-a-rather-long-name-for-the-table"
    assert as_csv[-1]["val_f1"] == ""  # the running trial logged no val F1 yet


def test_runs_columns_picks_exactly_and_names_the_valid_ones(logged, capsys, monkeypatch):
    out = runs_out(capsys, monkeypatch, 80, "--columns", "run_id,name,val_f1")
    assert header(out, "run_id") == ["run_id", "name", "val_f1"]
    assert all(run_id in out for run_id in logged.values() if run_id != logged["study tbl"])
    assert "not shown" not in out
    capsys.readouterr()
    assert main(["runs", "--columns", "val_f1,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "val_f1,test_f1,model,name" in err
    assert main(["runs", "--studies", "--columns", "val_f1"]) == 2
    assert "study,best_trial,best_value" in capsys.readouterr().err


def test_runs_studies_one_row_per_study(logged, capsys, monkeypatch):
    rows = json.loads(runs_out(capsys, monkeypatch, 80, "--studies", "--format", "json"))
    assert len(rows) == 1
    study = rows[0]
    assert {k: study[k] for k in ("study", "best_trial", "best_value", "complete", "pruned", "failed", "running",
                                  "model", "best_run_id")} == {
        "study": "tbl", "best_trial": 1, "best_value": 0.55, "complete": 2, "pruned": 1, "failed": 1, "running": 1,
        "model": "vgg16_v2", "best_run_id": logged["tbl-trial-1"]}
    import mlflow

    parent = mlflow.MlflowClient().get_run(logged["study tbl"]).info
    assert study["duration"] == (parent.end_time - parent.start_time) / 1000.0  # the parent run's wall time
    out = runs_out(capsys, monkeypatch, 80, "--studies")
    assert "…" not in out
    assert header(out, "study")[:3] == ["study", "best_trial", "best_value"]
    row = next(line for line in out.splitlines() if line.startswith("tbl")).split()
    assert row[:7] == ["tbl", "1", "0.5500", "2", "1", "1", "1"]


def test_ui_command_points_at_the_store(store):
    from research.runs import ui_command

    cmd = ui_command("127.0.0.1", 5055)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == store.uri
    assert cmd[cmd.index("--default-artifact-root") + 1] == (store.workdir / "mlruns" / "artifacts").as_uri()
    assert cmd[cmd.index("--port") + 1] == "5055"
