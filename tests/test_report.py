"""The study report: a real 3-trial study and a one-trial `seed_recipe` baseline study (real Optuna
journal storage, real MLflow store, the session's tiny dataset), shared by the module."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest

from research import configfile
from research import report as report_module
from research.cli import main
from research.errors import ConfigError
from research.report import report
from research.sweep import SweepSpec, make_storage, sweep
from tests.conftest import private_store  # chdir: the cached loader's data/cache/, the report's reports/

CLASSES = {"circles", "squares", "stripes"}


def tiny_spec(version_dir, tmp_path, study_name: str, n_trials: int, space: dict, epochs: int = 2,
              model: str = "resnet18") -> SweepSpec:
    data = {
        "study_name": study_name,
        "n_trials": n_trials,
        "base": {"model": model, "dataset": str(version_dir), "image_size": 32, "epochs": epochs, "batch_size": 8,
                 "checkpoint_dir": str(tmp_path / "ckpt"), "device": "cpu", "lr_schedule": "constant"},
        "space": space,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "heartbeat_interval": 1, "heartbeat_grace": 5,
    }
    return configfile.from_dict(SweepSpec, data)


class Studies:
    def __init__(self, root: Path, storage: str, parent: str):
        self.root, self.storage, self.parent = root, storage, parent

    def study(self, name: str):
        return optuna.load_study(study_name=name, storage=make_storage(self.storage))


@pytest.fixture(scope="module")
def studies(tiny_version, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        private_store(mp, root)
        storage = f"journal:{root / 'study.journal'}"
        space = {"lr": {"type": "float", "low": 1e-3, "high": 0.2, "log": True},
                 "sampler": {"type": "categorical", "choices": ["shuffle", "weighted"]}}
        summary = sweep(tiny_spec(tiny_version, root, "tiny", 3, space), storage)
        sweep(tiny_spec(tiny_version, root, "seed_recipe", 1, {}, epochs=1), storage)  # the baseline: one fixed config
        yield Studies(root, storage, summary["parent_run_id"])
        while mlflow.active_run() is not None:
            mlflow.end_run()


def history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


@pytest.mark.slow
def test_report_picks_on_validation_and_matches_mlflow(studies):
    out = studies.root / "out"
    rep = report("tiny", storage_url=studies.storage, out_dir=out)
    study = studies.study("tiny")
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 3

    # the champion is the trial whose MLflow run has the best val epoch (read here from the runs, not from the
    # study the report reads), ties to the earlier trial
    champ = rep["champion"]
    best_val = {t.number: max(history(t.user_attrs["mlflow_run_id"], "val_f1_macro").values()) for t in done}
    expected = max(sorted(best_val), key=lambda n: best_val[n])
    assert champ["trial"] == expected and champ["val_f1_macro"] == best_val[expected]

    # the numbers are the MLflow run's: best-epoch val, final test
    client = mlflow.MlflowClient()
    run = client.get_run(champ["run_id"])
    assert champ["run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    val = history(champ["run_id"], "val_f1_macro")
    best_epoch = min(step for step, v in val.items() if v == max(val.values()))
    assert champ["best_epoch"] == best_epoch == int(run.data.metrics["best_epoch"])
    assert champ["val_accuracy"] == history(champ["run_id"], "val_accuracy")[best_epoch]
    assert champ["test_f1_macro"] == run.data.metrics["test_f1_macro"]
    assert champ["test_accuracy"] == run.data.metrics["test_accuracy"]
    assert champ["epochs_run"] == 2 and set(champ["params"]) == {"lr", "sampler"}
    assert [t["number"] for t in rep["trials"]] == [t.number for t in sorted(done, key=lambda t: -t.value)]
    assert champ["config"]["model"] == "resnet18"

    # the baseline is seed_recipe's one trial
    base_trial = studies.study("seed_recipe").best_trial
    base = rep["baseline"]
    assert base["run_id"] == base_trial.user_attrs["mlflow_run_id"] and base["params"] == {}
    assert base["test_f1_macro"] == client.get_run(base["run_id"]).data.metrics["test_f1_macro"]
    assert base["val_f1_macro"] == base_trial.value

    # per-class F1 for every class, from the classification reports
    for facts, run_metrics in ((champ, run.data.metrics), (base, client.get_run(base["run_id"]).data.metrics)):
        assert set(facts["per_class"]) == CLASSES
        for cls, row in facts["per_class"].items():
            assert math.isclose(row["test_f1"], run_metrics[f"test_f1_{cls}"], abs_tol=1e-9)
            assert row["support"] > 0 and 0 <= row["val_f1"] <= 1
    assert sum(champ["confusion"]["counts"][0]) == champ["per_class"]["circles"]["support"]

    # importances, or why not
    if rep["importances"]:
        assert set(rep["importances"]) <= {"lr", "sampler"}
        assert math.isclose(sum(rep["importances"].values()), 1.0, abs_tol=1e-6)
    else:
        assert rep["importance_note"].startswith("not computed")

    # the files, and the same numbers in report.json
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert champ["run_id"] in text and base["run_id"] in text and "seed_recipe" in text
        assert "never used to choose" in text and "stripes" in text
    assert "| macro mean |" in md and "<img src='confusion_matrix_test.png'" in page
    assert "<img src='per_class_f1_test.png'" in page and "![Champion per-class F1 (test)](per_class_f1_test.png)" in md
    assert (out / "confusion_matrix_test.png").stat().st_size > 0 and (out / "per_class_f1_test.png").stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["champion"]["test_f1_macro"] == champ["test_f1_macro"]
    assert saved["champion"]["run_id"] == champ["run_id"] and saved["counts"]["COMPLETE"] == 3
    assert saved["wall_seconds"] > 0

    # logged to the study's parent run, which stays FINISHED
    parent = client.get_run(studies.parent)
    logged = {f.path for f in client.list_artifacts(studies.parent, "report")}
    names = ("report.md", "report.html", "report.json", "confusion_matrix_test.png", "per_class_f1_test.png")
    assert {f"report/{n}" for n in names} <= logged
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["report_champion_test_f1_macro"] == champ["test_f1_macro"]
    assert parent.data.metrics["report_champion_val_f1_macro"] == champ["val_f1_macro"]
    assert parent.data.metrics["report_baseline_test_f1_macro"] == base["test_f1_macro"]
    assert parent.data.metrics["report_baseline_val_f1_macro"] == base["val_f1_macro"]
    assert parent.data.tags["report_champion_run_id"] == champ["run_id"]


def test_baseline_by_run_id(studies):
    base_run = studies.study("seed_recipe").best_trial.user_attrs["mlflow_run_id"]
    rep = report("tiny", baseline=base_run, storage_url=studies.storage, out_dir=studies.root / "by-run", log=False)
    assert rep["baseline"]["run_id"] == base_run and rep["baseline"]["trial"] is None
    assert rep["logged_to"] is None


def test_missing_study_lists_the_existing_ones(studies):
    with pytest.raises(ConfigError, match="studies there: seed_recipe, tiny") as err:
        report("nope", storage_url=studies.storage, out_dir=studies.root / "nope")
    assert "'nope'" in str(err.value) and "seed_recipe" in str(err.value)
    assert "python -m research sweep sweeps/nope.yaml" in str(err.value)


def test_a_missing_explicit_baseline_is_refused_before_anything_is_written(studies):
    for ref in ("no_such_study", "0" * 32):
        out = studies.root / "bad"
        with pytest.raises(ConfigError, match=f"no baseline {ref}: .*--baseline STUDY_OR_RUN_ID"):
            report("tiny", baseline=ref, storage_url=studies.storage, out_dir=out, log=False)
        assert not out.exists()


def test_a_baseline_equal_to_the_study_is_refused(studies):
    champion_run = studies.study("tiny").best_trial.user_attrs["mlflow_run_id"]
    with pytest.raises(ConfigError, match="--baseline tiny: that is the study being reported"):
        report("tiny", baseline=["seed_recipe", "tiny"], storage_url=studies.storage, out_dir=studies.root / "self")
    with pytest.raises(ConfigError, match=f"--baseline {champion_run}: that is the champion's own run"):
        report("tiny", baseline=champion_run, storage_url=studies.storage, out_dir=studies.root / "self", log=False)


@pytest.mark.slow
def test_several_baselines_side_by_side(studies, tiny_version, capsys, monkeypatch):
    """--baseline repeated: one column per baseline, in the order given, in every output."""
    multi = f"journal:{studies.root / 'multi.journal'}"
    for name in ("tiny", "seed_recipe"):
        optuna.copy_study(from_study_name=name, from_storage=make_storage(studies.storage),
                          to_storage=make_storage(multi))
    # another architecture, so the headers must tell the baselines apart by model
    sweep(tiny_spec(tiny_version, studies.root, "scratch", 1, {}, epochs=1, model="timm:resnet18"), multi)
    client = mlflow.MlflowClient()  # a parent run of its own: the shared study's parent keeps the other tests' numbers
    parent = client.create_run(client.get_run(studies.parent).info.experiment_id, run_name="multi").info.run_id
    client.set_terminated(parent)
    optuna.load_study(study_name="tiny", storage=make_storage(multi)).set_user_attr("mlflow_parent_run_id", parent)
    monkeypatch.setattr(report_module.console, "width", 250)  # one table row per line, not wrapped at 80 columns

    out = studies.root / "multi"
    argv = ["report", "--study", "tiny", "--storage", multi, "--out", str(out), "--baseline", "scratch",
            "--baseline", "seed_recipe", "--baseline", "scratch"]
    assert main(argv) == 0
    console = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    scratch, seed = (studies_best_run(multi, name) for name in ("scratch", "seed_recipe"))

    # report.json: the baselines, in the order given, once each; `baseline` = the first
    assert rep["baseline_refs"] == ["scratch", "seed_recipe"]
    assert [b["run_id"] for b in rep["baselines"]] == [scratch, seed] and rep["baseline"]["run_id"] == scratch
    assert [b["label"] for b in rep["baselines"]] == ["scratch (timm:resnet18)", "seed_recipe (resnet18)"]
    assert rep["baselines"][0]["config"]["model"] == "timm:resnet18"
    assert rep["baselines"][1]["test_f1_macro"] == client.get_run(seed).data.metrics["test_f1_macro"]
    assert rep["baseline_notes"] == []

    # markdown and console: the champion, then each baseline, as columns of one table; per-class F1 for each
    md = (out / "report.md").read_text()
    champ = rep["champion"]
    header = ["", f"champion (trial {champ['trial']}, resnet18)", "scratch (timm:resnet18)", "seed_recipe (resnet18)"]
    assert "| " + " | ".join(header) + " |" in md
    assert f"| run id | {champ['run_id']} | {scratch} | {seed} |" in md
    per_class = ["class", "test support", "champion val F1", "champion test F1", "scratch (timm:resnet18) val F1",
                 "scratch (timm:resnet18) test F1", "seed_recipe (resnet18) val F1", "seed_recipe (resnet18) test F1"]
    assert "| " + " | ".join(per_class) + " |" in md
    row = next(line for line in md.splitlines() if line.startswith("| stripes |"))
    assert len(row.split(" | ")) == len(per_class)
    assert "## Champion vs baselines" in md
    assert "tiny: champion vs scratch, seed_recipe" in md
    assert "<th>scratch (timm:resnet18)</th><th>seed_recipe (resnet18)</th>" in (out / "report.html").read_text()
    lines = console.splitlines()
    assert any(re.search(r"champion \(trial \d+, resnet18\).*scratch \(timm:resnet18\).*seed_recipe \(resnet18\)", ln)
               for ln in lines)
    assert any(champ["run_id"] in ln and scratch in ln and seed in ln for ln in lines)
    assert any("scratch (timm:resnet18) test F1" in ln and "seed_recipe (resnet18) test F1" in ln for ln in lines)

    # the parent run: a tag naming the baselines, and a metric per baseline beside the first one's unnamed keys
    run = client.get_run(parent)
    assert run.data.tags["report_baselines"] == "scratch (timm:resnet18), seed_recipe (resnet18)"
    assert run.data.tags["report_baseline_run_ids"] == f"{scratch}, {seed}"
    assert run.data.metrics["report_baseline_test_f1_macro"] == rep["baselines"][0]["test_f1_macro"]
    assert run.data.metrics["report_baseline_seed_recipe_test_f1_macro"] == rep["baselines"][1]["test_f1_macro"]
    assert run.data.metrics["report_baseline_scratch_val_f1_macro"] == rep["baselines"][0]["val_f1_macro"]


def studies_best_run(storage: str, name: str) -> str:
    return optuna.load_study(study_name=name, storage=make_storage(storage)).best_trial.user_attrs["mlflow_run_id"]


def test_without_the_default_baseline_the_report_says_how_to_make_one(studies):
    alone = f"journal:{studies.root / 'alone.journal'}"
    optuna.copy_study(from_study_name="tiny", from_storage=make_storage(studies.storage),
                      to_storage=make_storage(alone))
    # a trial with the best test F1 but a lower validation F1 (a real run's id): it must not become the champion
    study = optuna.load_study(study_name="tiny", storage=make_storage(alone))
    best = study.best_trial
    study.add_trial(optuna.trial.create_trial(
        value=best.value - 0.01, params=best.params, distributions=best.distributions,
        user_attrs={"mlflow_run_id": studies.study("seed_recipe").best_trial.user_attrs["mlflow_run_id"],
                    "test_f1_macro": 1.0}))
    out = studies.root / "alone"
    rep = report("tiny", storage_url=alone, out_dir=out, log=False)
    assert rep["champion"]["trial"] == best.number != 3 and rep["trials"][0]["number"] == best.number
    assert rep["counts"]["COMPLETE"] == 4
    assert rep["baseline"] is None and "sweeps/seed_recipe.yaml" in rep["baseline_note"]
    md = (out / "report.md").read_text()
    assert "no baseline" in md and "sweeps/seed_recipe.yaml" in md and rep["champion"]["run_id"] in md


def test_the_champions_figures_are_shown_or_a_note_says_its_run_predates_them(studies, tiny_version):
    """A champion whose run logged the split pictures (written by runlog with the test images and
    probabilities) gets all three beside the report; then a champion run without them (an older run) gets
    notes, and the earlier champion's figures are gone from the folder."""
    from optuna.trial import create_trial

    from research.data.versions import load_version
    from research.inputs.decoded import split_items
    from research.runlog import write_split_reports

    storage = f"journal:{studies.root / 'figures.journal'}"
    optuna.copy_study(from_study_name="tiny", from_storage=make_storage(studies.storage),
                      to_storage=make_storage(storage))
    study = optuna.load_study(study_name="tiny", storage=make_storage(storage))
    client = mlflow.MlflowClient()
    experiment = client.get_run(studies.parent).info.experiment_id
    version = load_version(tiny_version)
    paths, y_true = split_items(version, "test")
    y_pred = (y_true + np.arange(len(y_true)) % 2) % len(version.classes)  # every other test image wrong
    prob = np.linspace(0.4, 0.9, len(y_true))

    def champion(value: float, figures: Path | None) -> str:
        """A finished run with a best val macro F1 of `value`, as a trial that beats the study's best."""
        run_id = client.create_run(experiment, run_name=f"champion-{value}").info.run_id
        client.log_metric(run_id, "val_f1_macro", value, step=1)
        if figures is not None:
            figures.mkdir()
            write_split_reports({"y_true": y_true, "y_pred": y_pred}, version.classes, "test", version.name, figures,
                                paths=paths, prob=prob)
            client.log_artifacts(run_id, str(figures))
        client.set_terminated(run_id)
        best = study.best_trial
        study.add_trial(create_trial(value=value, params=best.params, distributions=best.distributions,
                                     user_attrs={"mlflow_run_id": run_id}))
        return run_id

    out, logged = studies.root / "figures", studies.root / "figures-logged"
    with_figures = champion(2.0, logged)
    rep = report("tiny", storage_url=storage, out_dir=out, log=False)
    assert rep["champion"]["run_id"] == with_figures
    assert rep["figures"] == ["confusion_matrix_test.png", "per_class_f1_test.png", "mistakes_test.png"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in rep["figures"]:
        assert (out / name).read_bytes() == (logged / name).read_bytes() and str(out / name) in rep["files"]
        assert f"<img src='{name}'" in page and f"]({name})" in md
    assert "## Champion's most confident test mistakes" in md

    older = champion(3.0, None)
    rep = report("tiny", storage_url=storage, out_dir=out, log=False)
    assert rep["champion"]["run_id"] == older and rep["figures"] == [] and not rep["png"]
    assert not any((out / name).exists() for name in ("per_class_f1_test.png", "mistakes_test.png"))
    md = (out / "report.md").read_text()
    assert "<img" not in (out / "report.html").read_text() and "](" not in md
    for name in ("per_class_f1_test.png", "mistakes_test.png"):
        assert f"- run {older} has no {name} (it predates it)" in md


def test_cli(studies, capsys):
    assert main(["report", "--study", "tiny", "--storage", studies.storage]) == 0
    out = capsys.readouterr().out
    assert (studies.root / "reports" / "tiny" / "report.html").exists()  # the default folder
    assert "report written to" in out and f"logged to MLflow run {studies.parent}" in out


def test_importances_with_pruned_trials_use_the_epochs_every_trial_reached():
    """With pruning, the survivors are a biased handful: every finished trial is scored at the last common epoch."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from research.report import importances

    study = optuna.create_study(direction="maximize")
    dists = {"dropout": FloatDistribution(0.0, 0.5), "loss": CategoricalDistribution(["ce", "focal"])}
    for i in range(8):
        dropout = i / 16
        curve = {epoch: (0.5 - dropout) * epoch / 10 for epoch in range(1, 11 if i == 0 else 7)}  # dropout hurts
        study.add_trial(create_trial(
            params={"dropout": dropout, "loss": ["ce", "focal"][i % 2]}, distributions=dists,
            intermediate_values=curve, value=max(curve.values()) if i == 0 else None,
            state=TrialState.COMPLETE if i == 0 else TrialState.PRUNED))
    values, note = importances(study)
    assert "up to epoch 6 of all 8 finished trials" in note
    assert set(values) == {"dropout", "loss"} and values["dropout"] > values["loss"]
    assert math.isclose(sum(values.values()), 1.0, abs_tol=1e-6)
    lone = optuna.create_study(direction="maximize")  # one completed trial, nothing pruned: no variance to split
    lone.add_trial(study.trials[0])
    assert importances(lone) == ({}, "not computed: needs at least 2 scored trials "
                                     "(the objective of the completed trials (1))")


def test_the_champions_leave_one_style_out_stands_beside_its_mixed_style_figures(studies, monkeypatch):
    out = studies.root / "styles-none"
    rep = report("tiny", storage_url=studies.storage, out_dir=out, log=False)
    champ = rep["champion"]["run_id"]
    assert rep["styles"] is None
    assert f"not measured for this champion: python -m research styles --run {champ}" in (out / "report.md").read_text()

    asked = []
    found = {"parent_run_id": "p" * 32, "mean_heldout_f1_macro": 0.45, "dataset_version": "tiny",
             "rows": [{"style": "ink", "val_f1_macro": 0.7, "heldout_f1_macro": 0.4, "members": "ink"},
                      {"style": "duo", "val_f1_macro": 0.6, "heldout_f1_macro": 0.5, "members": "flat, line"}]}
    monkeypatch.setattr(report_module.styles_mod, "latest_for_run",
                        lambda run_id, client: asked.append(run_id) or found)
    out = studies.root / "styles"
    rep = report("tiny", storage_url=studies.storage, out_dir=out, log=False)
    assert asked == [champ]
    md = (out / "report.md").read_text()
    assert "| ink | 0.7000 | 0.4000 |" in md and "| duo (flat, line) | 0.6000 | 0.5000 |" in md  # per family
    assert "| mean of held-out families |  | 0.4500 |" in md
    mixed = f"| {rep['champion']['val_f1_macro']:.4f} | {rep['champion']['test_f1_macro']:.4f} |"
    assert mixed in md.split("Leave one style family out")[1].split("##")[0]  # the mixed-style figures beside them
