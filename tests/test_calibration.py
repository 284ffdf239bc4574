"""Probabilities that mean something: a temperature fitted on val, served with the model, ECE before and after."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from research.metrics import expected_calibration_error, fit_temperature, tempered
from research.train import train
from tests.conftest import tiny_cfg


def overconfident(n: int = 4000, classes: int = 5, true_t: float = 2.5, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / true_t): softmax(logits) is overconfident by true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes))
    p = tempered(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), true_t)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return torch.softmax(torch.from_numpy(logits), 1).numpy(), y


def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    probs, y = overconfident()
    t = fit_temperature(probs, y)
    assert t == pytest.approx(2.5, rel=0.1)
    before, after = expected_calibration_error(probs, y), expected_calibration_error(tempered(probs, t), y)
    assert after < before / 2
    assert (tempered(probs, t).argmax(1) == probs.argmax(1)).all()  # the answers stay; only their confidence moves


def test_ece_of_a_perfectly_calibrated_and_of_an_always_sure_classifier():
    y = np.array([0, 1, 0, 1])
    sure = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # always 100 % sure, right half the time
    assert expected_calibration_error(sure, y) == pytest.approx(0.5)
    half = np.full((4, 2), 0.5) + np.array([[1e-9, 0]] * 4)  # 50 % sure, right half the time
    assert expected_calibration_error(half, y) == pytest.approx(0.0, abs=1e-6)


def test_a_run_serves_probabilities_at_its_val_temperature(tiny_version, mlflow_store, tmp_path, monkeypatch):
    from research.data.versions import load_version
    from research.inputs.decoded import split_items
    from research.serving import classifier_from_torch_dir

    monkeypatch.chdir(tmp_path)
    result = train(tiny_cfg(tiny_version, tmp_path, epochs=2))
    run = mlflow.MlflowClient().get_run(result.run_id)
    t = run.data.metrics["temperature"]
    assert t > 0 and {"val_ece", "val_ece_uncalibrated", "test_ece", "test_ece_uncalibrated"} <= set(run.data.metrics)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model", dst_path=str(tmp_path / "m")))
    assert json.loads((local / "extra_files" / "model_meta.json").read_text())["temperature"] == t
    assert "reliability_test.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}

    # served probabilities = softmax(logits / T) of the bare torch module on the same pixels
    served = classifier_from_torch_dir(local, "cpu")  # the served classifier around the run's logged model
    paths, _ = split_items(load_version(tiny_version), "test")
    arrays = [served.pixels(p.read_bytes()) for p in paths[:8]]
    with torch.no_grad():
        logits = served.module(served.tensor(arrays)).float()
    np.testing.assert_allclose(served.probabilities(arrays), torch.softmax(logits / t, 1).numpy(), atol=1e-6)
    if abs(t - 1) > 0.05:  # and not the raw softmax
        assert not np.allclose(served.probabilities(arrays), torch.softmax(logits, 1).numpy(), atol=1e-3)
