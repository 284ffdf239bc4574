"""What the MLflow UI shows a person: experiments that open on their training runs, study parent runs that
carry their best trial's numbers, readable trial names, and the UI address each command ends with. A real
sqlite store, real training and a real 2-trial Optuna study (1 epoch each)."""

from __future__ import annotations

import argparse
import json

import mlflow
import pytest

from research import cli, runs, tracking
from research.sweep import sweep
from tests.test_sweep import tiny_spec

ML_VIEW = "?workflowType=machine_learning"


@pytest.mark.slow
def test_new_and_existing_experiments_open_on_training_runs(mlflow_store):
    client = mlflow.MlflowClient()
    view = f"mlflow.sharedViewState.{tracking.VIEW_KEY}"
    new = client.get_experiment(tracking.experiment_id("ui-new")).tags
    assert new[tracking.KIND_TAG] == "custom_model_development"
    assert "metrics.`best_val_f1_macro`" in json.loads(new[view])["selectedColumns"]

    old = client.create_experiment("ui-old")  # made before the tags existed
    assert tracking.experiment_id("ui-old") == old
    assert {k: v for k, v in client.get_experiment(old).tags.items() if k in new} == {
        tracking.KIND_TAG: "custom_model_development", view: new[view]}

    chosen = client.create_experiment("ui-chosen", tags={tracking.KIND_TAG: "genai_development"})
    tracking.experiment_id("ui-chosen")
    assert client.get_experiment(chosen).tags[tracking.KIND_TAG] == "genai_development"  # a user's choice stays


@pytest.mark.slow
def test_ui_urls_point_at_the_local_ui_or_the_tracking_server(mlflow_store, monkeypatch):
    ui = argparse.ArgumentParser()
    runs.add_arguments(ui, "ui")
    defaults = ui.parse_args([])
    assert tracking.LOCAL_UI == f"http://{defaults.host}:{defaults.port}"  # where `python -m research ui` serves

    exp = tracking.experiment_id("ui-urls")
    run = mlflow.MlflowClient().create_run(exp).info.run_id
    local = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}{ML_VIEW}"
    assert tracking.run_url(run) == local == tracking.run_url(run, exp)
    assert tracking.ui_line(local) == f"UI: {local}  (start it with `python -m research ui`)"
    assert (tracking.model_version_url("illustration classifier", "3")
            == f"http://127.0.0.1:5000/#/models/illustration%20classifier/versions/3{ML_VIEW}")

    assert tracking.experiment_url(exp) == (f"http://127.0.0.1:5000/#/experiments/{exp}/runs{ML_VIEW}"
                                            f"&viewStateShareKey={tracking.VIEW_KEY}")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org/team/")
    url = tracking.ui_url("experiments/7/runs")
    assert url == f"https://mlflow.example.org/team/#/experiments/7/runs{ML_VIEW}"
    assert tracking.ui_line(url) == f"UI: {url}"  # a server runs already: no note


@pytest.mark.slow
def test_train_command_ends_with_its_run_url(tiny_version, mlflow_store, tmp_path, capsys):
    code = cli.main(["train", "--dataset", str(tiny_version), "--model", "resnet18", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--experiment", "ui-train",
                     "--set", f"checkpoint_dir={tmp_path / 'ckpt'}"])
    assert code == 0
    [run] = mlflow.search_runs(experiment_names=["ui-train"], output_format="list")
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last == tracking.ui_line(tracking.run_url(run.info.run_id))
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{ML_VIEW}" in last


@pytest.mark.slow
def test_study_parent_run_carries_its_best_trial_and_commands_end_with_urls(tiny_version, mlflow_store, tmp_path,
                                                                          capsys):
    spec = tiny_spec(tiny_version, tmp_path, n_trials=2, base={"epochs": 1}, pruner={"name": "none"})
    summary = sweep(spec, f"journal:{tmp_path / 'ui.journal'}")
    out = capsys.readouterr().out
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    best = client.get_run(summary["best_run_id"]).data.metrics
    metrics = parent.data.metrics
    assert metrics["best_val_f1_macro"] == pytest.approx(summary["best_value"])
    assert metrics["best_test_f1_macro"] == pytest.approx(best["test_f1_macro"])
    assert metrics["best_test_accuracy"] == pytest.approx(best["test_accuracy"])
    assert metrics["best_trial"] == summary["best_trial"]
    assert (metrics["n_complete"], metrics["n_pruned"], metrics["n_fail"]) == (2, 0, 0)

    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in trials) == ["tiny #0 resnet18", "tiny #1 resnet18"]

    parent_url = tracking.run_url(parent.info.run_id, parent.info.experiment_id)
    runs_url = tracking.experiment_url(parent.info.experiment_id)
    assert (summary["parent_url"], summary["runs_url"]) == (parent_url, runs_url)
    lines = [line.split() for line in out.splitlines()]
    assert ["UI", parent_url] in lines and runs_url in [words[0] for words in lines if words], out

    assert cli.main(["promote", "--study", "tiny"]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last == tracking.ui_line(tracking.model_version_url("illustration-classifier", "1"))
