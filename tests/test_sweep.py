"""Optuna studies: real journal storage, real MLflow store, tiny dataset."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest

from research import configfile
from research.errors import ConfigError
from research.sweep import SweepSpec, load_spec, make_storage, sweep

SWEEPS = sorted((Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))


def tiny_spec(version_dir, tmp_path, **changes) -> SweepSpec:
    data = {
        "study_name": "tiny",
        "n_trials": 4,
        "base": {"model": "resnet18", "dataset": str(version_dir), "image_size": 32, "epochs": 2, "batch_size": 8,
                 "checkpoint_dir": str(tmp_path / "ckpt"), "device": "cpu", "lr_schedule": "constant"},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 0.2, "log": True},
                  "sampler": {"type": "categorical", "choices": ["shuffle", "weighted"]}},
        "sampler": {"name": "random", "seed": 0},
        # prune hard so a 4-trial study shows pruning: any trial below the median after epoch 1
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "heartbeat_interval": 1, "heartbeat_grace": 5,
    }
    return configfile.from_dict(SweepSpec, configfile.merge(data, changes))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.study_name == path.stem  # the docs' `promote --study <file name>` finds the study


def test_empty_space_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="n_trials: 1"):
        configfile.from_dict(SweepSpec, {"base": {}, "space": {}})
    fixed = configfile.from_dict(SweepSpec, {"base": {}, "space": {}, "n_trials": 1})  # a baseline: one fixed config
    assert fixed.space == {}
    with pytest.raises(ConfigError, match=r"enqueue\[0\]: lrr not in the search space"):
        configfile.from_dict(SweepSpec, {"base": {}, "space": {"lr": {"type": "float", "low": 1, "high": 2}},
                                         "enqueue": [{"lrr": 1.5}]})
    with pytest.raises(ConfigError, match="space.lrr"):
        configfile.from_dict(SweepSpec, {"base": {}, "space": {"lrr": {"type": "float", "low": 1, "high": 2}}})


@pytest.mark.slow
def test_study_nests_trials_and_resumes(tiny_version, mlflow_store, tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    first = {"lr": 0.05, "sampler": "weighted"}
    spec = tiny_spec(tiny_version, tmp_path, enqueue=[first])
    summary = sweep(spec, storage)
    study = optuna.load_study(study_name="tiny", storage=make_storage(storage))
    trials = study.get_trials()
    assert len(trials) == 4
    assert trials[0].params == first  # the enqueued config runs first
    states = {t.number: t.state.name for t in trials}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states.values()
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_study"] == "tiny"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:
        number = int(child.data.tags["optuna_trial"])
        assert child.data.tags["optuna_study"] == "tiny"
        assert child.data.tags["optuna_state"] == states[number]
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[states[number]]
        assert "val_f1_macro" in child.data.metrics and "lr" in child.data.params
        if states[number] == "COMPLETE":  # the objective is the kept epoch's figure, the one promote ranks on
            assert child.data.metrics["objective"] == child.data.metrics["selected_val_f1_macro"]
            assert trials[number].value == child.data.metrics["objective"]
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert parent.data.metrics["n_complete"] + parent.data.metrics.get("n_pruned", 0) == 4

    # the same study name again resumes it: 2 more trials, same parent run
    summary2 = sweep(tiny_spec(tiny_version, tmp_path, n_trials=6, enqueue=[first]), storage)
    assert summary2["parent_run_id"] == summary["parent_run_id"]
    assert len(study.get_trials()) == 6
    assert sum(t.params == first for t in study.get_trials()) == 1  # enqueued once, when the study was new


@pytest.mark.slow
def test_two_workers_finish_exactly_n_trials(tiny_version, mlflow_store, tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    # 3 trials on 2 workers: one worker takes a second slot, and a fourth would be an overshoot
    spec = tiny_spec(tiny_version, tmp_path, n_trials=3, study_name="two", base={"epochs": 1},
                     pruner={"name": "none"})
    summary = sweep(spec, storage, workers=2)
    assert summary["counts"]["COMPLETE"] == 3
    assert sum(summary["counts"].values()) == 3
    client = mlflow.MlflowClient()
    children = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == [0, 1, 2]
    assert len({c.data.tags.get("host", "") + c.data.tags["optuna_trial"] for c in children}) == 3


@pytest.mark.slow
def test_cli_runs_a_spec(tiny_version, mlflow_store, tmp_path, capsys):
    from research.cli import main  # in this process: the command's parsing and output (its processes: test_logs.py)

    spec_file = tmp_path / "s.yaml"
    import yaml

    data = configfile.to_dict(tiny_spec(tiny_version, tmp_path, n_trials=1, study_name="cli", base={"epochs": 1}))
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(spec_file), "--storage", f"journal:{tmp_path / 'cli.journal'}"]) == 0
    assert "python -m research promote --study cli\n" in capsys.readouterr().out




@pytest.mark.parametrize("where", ["base", "space", "enqueue"])
@pytest.mark.slow
def test_a_missing_dataset_version_stops_the_sweep_before_any_study_or_run(where, tiny_version, mlflow_store, tmp_path):
    missing = str(tmp_path / "versions" / "v9")
    changes = {"base": {"dataset": missing}} if where == "base" else {
        "space": {"dataset": {"type": "categorical", "choices": [str(tiny_version), missing]}}}
    if where == "enqueue":
        changes = {"space": {"dataset": {"type": "categorical", "choices": [str(tiny_version), missing]}},
                   "enqueue": [{"dataset": missing, "lr": 0.01, "sampler": "shuffle"}]}
    storage = f"journal:{tmp_path / 'study.journal'}"
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ConfigError, match="'.*v9' not found"):
        sweep(tiny_spec(tiny_version, tmp_path, **changes), storage)
    # nothing was started: no study (whose enqueued trial would have failed first), no MLflow run
    assert not (tmp_path / "study.journal").exists() or not optuna.get_all_study_names(make_storage(storage))
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
