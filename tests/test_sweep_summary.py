"""The end of a study in words (research.sweep.summary): a real Optuna study in journal storage with trials
added as they finished (no training), its real MLflow parent run, `summarize` as a sweep calls it."""

from __future__ import annotations

import mlflow
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from research import configfile
from research.sweep import SweepSpec, summarize
from research.sweep.storage import open_study
from research.sweep.worker import parent_run_id

LR = 0.0265122597429743
DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 0.2, log=True),
                 "sampler": CategoricalDistribution(["shuffle", "weighted"])}


@pytest.mark.slow
def test_summary_is_in_words_with_the_next_commands(mlflow_store, tmp_path, capsys):
    spec = configfile.from_dict(SweepSpec, {
        "study_name": "words", "n_trials": 5, "base": {"model": "resnet18"},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 0.2, "log": True},
                  "sampler": {"type": "categorical", "choices": ["shuffle", "weighted"]}}})
    storage = f"journal:{tmp_path / 'words.journal'}"
    study = open_study(spec, storage)
    parent = parent_run_id(study, spec, None)
    experiment = mlflow.get_run(parent).info.experiment_id
    for value, lr, test, state in ((0.61234567, LR, 0.587654, TrialState.COMPLETE),
                                   (0.5, 0.00123456, 0.45, TrialState.COMPLETE),
                                   (0.55, 0.0543219, None, TrialState.COMPLETE),
                                   (None, 0.1, None, TrialState.PRUNED), (None, 0.2, None, TrialState.FAIL)):
        run_id = mlflow.MlflowClient().create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        attrs = {"mlflow_run_id": run_id} | ({"test_f1_macro": test} if test is not None else {})
        study.add_trial(create_trial(state=state, value=value, params={"lr": lr, "sampler": "weighted"},
                                     distributions=DISTRIBUTIONS, user_attrs=attrs))
    capsys.readouterr()
    summary = summarize(spec, storage)
    out = capsys.readouterr().out
    assert "{'" not in out and "params={" not in out and "[" not in out
    assert "words: 5 trials, 3 complete, 1 pruned, 1 failed" in out
    best = study.trials[0]
    assert "#0: val_f1_macro 0.6123, test macro F1 0.5877" in out
    assert "lr=0.02651, sampler=weighted" in out and str(LR) not in out
    assert best.user_attrs["mlflow_run_id"] in out and summary["parent_run_id"] in out
    assert "#2  0.5500  test n/a     lr=0.05432, sampler=weighted" in out
    lines = out.rstrip("\n").splitlines()
    nexts = ["python -m research promote --study words", f"python -m research report --study words --storage {storage}",
             "python -m research runs --study words", "python -m research ui"]
    assert [line.split("  ")[-1].strip() for line in lines[-4:]] == nexts  # the commands end it, one a line
    # aligned: every label in one column, every value starting at the same place
    start = len(lines[-1]) - len(nexts[-1])
    assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines), out
