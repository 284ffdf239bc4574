"""Artifact economy: each kept model's weights stored once, a study keeps its top k, `gc` frees the rest.

Counts come from listing artifacts through MLflow (run artifacts and every logged model's), never
from the local folder, so the same listing holds behind `mlflow server`.
"""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
import pytest
from PIL import Image

from research import artifacts, registry, runquery
from research.cli import main
from research.errors import ConfigError
from research.store import Objective, study_objective
from research.sweep import sweep
from tests.conftest import tiny_cfg
from tests.test_sweep import tiny_spec

WEIGHT_FILES = ("model.pth", "best.pt", "last.pt")


def all_files(client) -> list[tuple[str, str, int]]:
    """(owner, path, bytes) of every artifact of every run and live logged model, through MLflow."""
    from mlflow.entities import ViewType

    from research.store import search_all_runs

    ids = [e.experiment_id for e in client.search_experiments()]
    out = []

    def walk(list_fn, owner, path=None):
        for f in list_fn(path):
            if f.is_dir:
                walk(list_fn, owner, f.path)
            else:
                out.append((owner, f.path, int(f.file_size or 0)))

    for run in search_all_runs(client, ids, "", run_view_type=ViewType.ALL):
        walk(lambda p, rid=run.info.run_id: client.list_artifacts(rid, p), run.info.run_id)
    for model in artifacts.logged_models(client, ids):
        walk(lambda p, mid=model.model_id: client.list_logged_model_artifacts(mid, p), model.source_run_id)
    return out


def weight_owners(client) -> list[str]:
    """The run behind each stored weights file (one entry per copy)."""
    return [owner for owner, path, _ in all_files(client) if path.rsplit("/", 1)[-1] in WEIGHT_FILES]


def white_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "white").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.slow
def test_a_run_stores_its_weights_once_and_promote_adds_no_copy(tiny_version, mlflow_store, tmp_path):
    from research.train import train

    run_id = train(tiny_cfg(tiny_version, tmp_path, epochs=1)).run_id
    client = mlflow.MlflowClient()
    assert weight_owners(client) == [run_id]
    assert not (tmp_path / "ckpt" / run_id).exists()  # the local checkpoints go when the run finishes

    p = registry.promote(run_id=run_id, name="once")
    assert weight_owners(client) == [run_id]  # the version is the run's own model, not a copy
    version = client.get_model_version("once", p.version)
    assert version.source == f"models:/{runquery.run_model(client, run_id).model_id}", version

    served = registry.load_model("models:/once@champion").predict(pd.DataFrame({"image": [white_png()]}))
    assert list(served.columns[:2]) == ["label", "probability"] and served["error"].iloc[0] == ""
    module = mlflow.pytorch.load_model("models:/once@champion")  # the same model, as a module to fine-tune
    module.train()
    assert any(p.requires_grad for p in module.parameters())


@pytest.mark.slow
def test_a_study_keeps_the_weights_of_its_top_k_trials_and_the_champion(tiny_version, mlflow_store, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = f"journal:{tmp_path / 'study.journal'}"
    spec = tiny_spec(tiny_version, tmp_path, n_trials=5, keep_top_k=2, pruner={"name": "none"},
                     base={"epochs": 1})
    sweep(spec, storage)
    client = mlflow.MlflowClient()
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.optuna_role = 'parent'")[0]
    assert parent.data.params["keep_top_k"] == "2"
    assert study_objective(parent) == Objective("maximize", "val_f1_macro")  # recorded as values, not a string
    assert "objective" not in parent.data.params
    trials = artifacts.trial_runs(client, parent)
    assert len(trials) == 5
    ranked = sorted(trials, key=lambda r: (-r.data.metrics["objective"], r.info.start_time))  # ties: earlier first
    kept = sorted(r.info.run_id for r in ranked[:2])
    assert sorted(weight_owners(client)) == kept
    for run in ranked[2:]:  # dropped: the weights, and nothing else
        assert run.data.tags[artifacts.WEIGHTS_DELETED] == "true"
        files = {path for owner, path, _ in all_files(client) if owner == run.info.run_id}
        assert {"config.yaml", "confusion_matrix_test.csv", "classification_report_test.csv"} <= files
        assert "test_f1_macro" in run.data.metrics

    # the champion is the best trial; a promote of a dropped trial says why it cannot be
    champion = registry.promote(study="tiny", name="kept")
    assert champion.run_id == ranked[0].info.run_id
    with pytest.raises(ConfigError, match="keep_top_k"):
        registry.promote(run_id=ranked[-1].info.run_id, name="kept")

    # gc with k=1 would drop the runner-up, never the registered champion; dry run first
    items = artifacts.plan(keep_top_k=1, override=True)
    assert [i.what for i in items if i.kind == "weights"] == [ranked[1].info.run_id]
    assert sorted(weight_owners(client)) == kept  # a plan frees nothing
    assert main(["gc", "--keep-top-k", "1", "--yes"]) == 0
    assert weight_owners(client) == [ranked[0].info.run_id]
    assert main(["gc", "--keep-top-k", "0"]) == 2  # a bad value is an error, not "keep nothing"
    out = registry.load_model("models:/kept@champion").predict(pd.DataFrame({"image": [white_png()]}))
    assert out["error"].iloc[0] == ""


@pytest.mark.slow
def test_gc_frees_deleted_runs_and_stale_checkpoints_but_keeps_resumable_ones(tiny_version, mlflow_store, tmp_path,
                                                                              monkeypatch, capsys):
    from research.train import train

    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient()
    gone = train(tiny_cfg(tiny_version, tmp_path, epochs=1, run_name="gone")).run_id
    client.delete_run(gone)
    registered = train(tiny_cfg(tiny_version, tmp_path, epochs=1, run_name="registered")).run_id
    registry.promote(run_id=registered, name="keepme")
    client.delete_run(registered)  # deleted by hand in the UI: its version still needs the weights

    # local checkpoint folders: one of a finished run (stale), one of a KILLED run (resumable)
    exp = client.get_experiment_by_name("test-registry").experiment_id
    killed = client.create_run(exp, run_name="killed").info.run_id
    client.set_terminated(killed, "KILLED")
    root = tmp_path / "mlruns" / "checkpoints"
    for rid in (registered, killed):
        (root / rid).mkdir(parents=True)
        (root / rid / "last.pt").write_bytes(b"x" * 1000)

    assert main(["gc"]) == 0
    out = capsys.readouterr().out
    assert gone in out and "--yes" in out
    assert client.get_run(gone).info.lifecycle_stage == "deleted"  # shown, not freed
    items = artifacts.plan()
    expected = {("deleted run", gone), ("checkpoint", f"mlruns/checkpoints/{registered}")}
    assert {(i.kind, i.what) for i in items} == expected

    assert main(["gc", "--yes"]) == 0
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_run(gone)  # hard-deleted by mlflow gc
    assert not (root / registered).exists() and (root / killed / "last.pt").is_file()
    assert registered in weight_owners(client)  # the registered version's weights stay
    out = registry.load_model("models:/keepme@champion").predict(pd.DataFrame({"image": [white_png()]}))
    assert out["error"].iloc[0] == ""
