"""`promote --ensemble K`: the K best runs as one served model, measured the way it is served."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from research.cli import main
from research.ensemble import Ensemble
from research.errors import ConfigError
from research.predict import evaluate_served
from research.registry import CHAMPION, Champion, PromotionRefused, gate, promote
from research.runquery import pick_run
from tests.conftest import EXPERIMENT
from tests.test_calibration import assert_temperature_fitted_on_val


def test_an_ensemble_of_two_runs_is_registered_and_serves_its_logged_figures(store, tmp_path):
    p = promote(experiment=EXPERIMENT, ensemble=2, name="ens")
    client = mlflow.MlflowClient()
    run = client.get_run(p.run_id)
    assert set(run.data.tags["ensemble_of"].split(",")) == {store.good, store.weak}
    assert p.run_id not in (store.good, store.weak) and "val_f1_macro" in run.data.metrics
    # ranked and gated on its val macro F1, never on a val loss measured at temperatures fitted on that val
    assert p.metric == "val_f1_macro" and p.score == run.data.metrics["selected_val_f1_macro"]
    assert "selected_val_loss" not in run.data.metrics

    out = evaluate_served(f"models:/ens@{CHAMPION}", str(store.version))
    assert out["equal"] is True and out["mismatched_images"] == [] and out["run_id"] == p.run_id

    # recalibrated as a whole on val: the served temperature is the logged one, with ECE before/after and the diagram
    meta = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{p.run_id}/model_meta.json",
                                                                dst_path=str(tmp_path))).read_text())
    metrics = run.data.metrics
    assert meta["temperature"] == metrics["temperature"] != 1.0
    assert_temperature_fitted_on_val(p.run_id, store.version, tmp_path / "val")  # the NLL minimiser on its val
    assert {"val_ece", "val_ece_uncalibrated", "test_ece", "test_ece_uncalibrated"} <= set(metrics)
    assert "reliability_test.png" in {f.path for f in client.list_artifacts(p.run_id)}

    # the torch module is the average of its members' calibrated probabilities
    module = mlflow.pytorch.load_model(f"runs:/{p.run_id}/model").eval()
    assert isinstance(module, Ensemble) and len(module.members) == 2
    members = {rid: mlflow.pytorch.load_model(f"runs:/{rid}/model").eval() for rid in (store.good, store.weak)}
    temps = {rid: client.get_run(rid).data.metrics["temperature"] for rid in members}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = np.mean([torch.softmax(m(x) / temps[rid], 1).numpy() for rid, m in members.items()], axis=0)
        np.testing.assert_allclose(torch.softmax(module(x), 1).numpy(), expected, atol=1e-6)


def test_an_ensemble_larger_than_the_scope_is_refused(store, capsys):
    with pytest.raises(ConfigError, match="--ensemble 5: the scope holds 2"):
        promote(experiment=EXPERIMENT, ensemble=5, name="ens-big")
    assert main(["promote", "--run", store.good, "--ensemble", "2", "--name", "ens-big"]) == 2
    assert "not --run" in capsys.readouterr().err


def test_an_ensemble_is_never_ranked_or_gated_on_a_val_loss(store, capsys):
    """Its val loss is measured at temperatures fitted on that same val, a single run's at temperature 1."""
    client = mlflow.MlflowClient()
    before = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])}
    with pytest.raises(ConfigError, match="--metric 'val_loss': an ensemble's val loss.*not comparable"):
        promote(experiment=EXPERIMENT, ensemble=2, metric="val_loss", name="ens-loss")
    assert main(["promote", "--experiment", EXPERIMENT, "--ensemble", "2", "--metric", "val_loss",
                 "--name", "ens-loss"]) == 2
    assert "use --metric val_f1_macro" in capsys.readouterr().err
    after = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])}
    assert after == before  # refused before any ensemble was built

    # a champion that is an ensemble (registered before this rule) is not compared with a run on a val loss
    champ = Champion("3", "e" * 32, "val_loss", 0.1, "d", "tiny", None, None, ensemble=True)
    cand = pick_run(client, run_id=store.good, metric="val_loss")
    with pytest.raises(PromotionRefused, match="Not comparable.*the champion is an ensemble") as refused:
        gate(champ, cand, "ens-loss")
    assert refused.value.comparable is False
    on_f1 = dataclasses.replace(champ, metric="val_f1_macro", score=0.0, dataset_digest=cand.dataset_digest)
    gate(on_f1, dataclasses.replace(cand, metric="val_f1_macro"), "ens-f1")  # on macro F1 they compare: it beats 0
