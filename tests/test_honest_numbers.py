"""Validation chooses, test reports; the served model is the model measured.

Real training runs on the session's tiny dataset version, a real sqlite store and registry, the real
pyfunc through `models:/...`: an amp run and the stored-features path (VGG16_v2, and EfficientNet-Lite0 with
its ImageNet weights from the pinned package) each reproduce their logged test figures image for image.
The promote gate is checked on real logged models whose val and test figures disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from research import tracking
from research.cli import main
from research.errors import ConfigError
from research.predict import evaluate_served
from research.registry import CHAMPION, PromotionRefused, promote
from research.serving import META_FILE, model_meta, pip_requirements
from research.train import train
from tests.conftest import tiny_cfg
from tests.test_serving import CLASSES, HALF, tiny_module


def served_check(run_id: str, name: str, version: Path) -> dict:
    """Promote the run under `name`, then predict the version's whole test split through @champion."""
    promote(run_id=run_id, name=name, force=True)
    return evaluate_served(f"models:/{name}@{CHAMPION}", str(version))


def assert_served_equals_logged(out: dict, run_id: str) -> None:
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert out["run_id"] == run_id and out["images"] > 0
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert out["served"][key] == logged[f"test_{key}"], key  # exactly: the same computation
    assert out["mismatched_images"] == []  # image for image, against the run's predictions_test.csv
    assert out["max_probability_difference"] < 1e-6  # bf16 (amp) evaluation would differ at ~1e-3
    assert out["equal"] is True


# ------------------------------------------------------------------------------ served equals measured

@pytest.mark.slow
def test_an_amp_run_serves_its_logged_test_figures_image_for_image(tiny_version, mlflow_store, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = train(tiny_cfg(tiny_version, tmp_path, amp=True, epochs=1))
    assert mlflow.MlflowClient().get_run(result.run_id).data.params["amp"] == "True"  # bf16 autocast trained it
    out = served_check(result.run_id, "served-amp", tiny_version)
    assert_served_equals_logged(out, result.run_id)

    capsys.readouterr()  # the command a reviewer runs says the same, as JSON, exit 0
    assert main(["predict", "--model", f"models:/served-amp@{CHAMPION}", "--evaluate", str(tiny_version),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["equal"] is True


@pytest.mark.parametrize("model, pretrained, image_size", [("vgg16_v2", False, 32), ("efficientnet_lite0", True, 64)])
@pytest.mark.slow
def test_the_stored_features_path_serves_its_logged_test_figures(model, pretrained, image_size, tiny_version,
                                                                  mlflow_store, tmp_path, monkeypatch):
    """VGG16_v2 (the seed's head on the 25088 pooled features) and a pretrained trunk, trained on stored features."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tiny_version, tmp_path, model=model, pretrained=pretrained, image_size=image_size,
                   loader="features", epochs=1, lr=1e-3, compile=True)
    result = train(cfg)
    params = mlflow.MlflowClient().get_run(result.run_id).data.params
    assert params["compile"] == "False"  # only the head trains on stored features: nothing was compiled
    out = served_check(result.run_id, f"served-{model}", tiny_version)
    assert_served_equals_logged(out, result.run_id)


@pytest.mark.slow
def test_a_run_that_trains_its_last_stage_on_stored_activations_serves_its_logged_test_figures(
        tiny_version, mlflow_store, tmp_path, monkeypatch):
    """trainable_stages > 0: the last stage trains on stored fp16 activations; the served model is the whole fp32
    model, its trained stage included, and reproduces the logged test figures image for image."""
    from research.models import build_model, stage_split

    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tiny_version, tmp_path, model="efficientnet_lite0", pretrained=True, image_size=32,
                   loader="features", trainable_stages=1, feature_views=1, epochs=1, lr=1e-3)
    result = train(cfg)
    out = served_check(result.run_id, "served-stages", tiny_version)
    assert_served_equals_logged(out, result.run_id)
    served = mlflow.pytorch.load_model(f"models:/served-stages@{CHAMPION}", map_location="cpu")
    start = build_model("efficientnet_lite0", 3, pretrained=True)
    (served_prefix, served_suffix), (start_prefix, start_suffix) = stage_split(served, 1), stage_split(start, 1)
    assert all(torch.equal(a, b) for a, b in zip(served_prefix.state_dict().values(),
                                                 start_prefix.state_dict().values()))  # frozen: as it came
    trained = [n for (n, a), b in zip(served_suffix.named_parameters(), start_suffix.parameters())
               if not torch.equal(a, b)]
    assert any(n.startswith("0.") for n in trained)  # the last stage itself (suffix module 0) is what trained


@pytest.mark.slow
def test_a_run_that_serves_other_answers_is_caught(tiny_version, mlflow_store, tmp_path, monkeypatch, capsys):
    """The check can fail: a model served at another temperature than the run measured (every label the same) exits
    1 and says by how much; a run whose logged predictions disagree with its model exits 1 and names the images."""
    import research.serving as serving
    from research.predict import PROBABILITY_TOLERANCE

    monkeypatch.chdir(tmp_path)
    result = train(tiny_cfg(tiny_version, tmp_path, epochs=1))
    client = mlflow.MlflowClient()
    promote(run_id=result.run_id, name="served-temperature", force=True)
    read_meta = serving.read_meta
    monkeypatch.setattr(serving, "read_meta", lambda d: read_meta(d) | {"temperature": read_meta(d)["temperature"] * 2})
    out = evaluate_served(f"models:/served-temperature@{CHAMPION}", str(tiny_version))
    assert out["mismatched_images"] == [] and out["served"] == out["logged"]  # labels and figures agree
    assert out["max_probability_difference"] > 10 * PROBABILITY_TOLERANCE and out["equal"] is False
    capsys.readouterr()
    assert main(["predict", "--model", f"models:/served-temperature@{CHAMPION}", "--evaluate", str(tiny_version)]) == 1
    assert "served differs from logged" in capsys.readouterr().out
    monkeypatch.setattr(serving, "read_meta", read_meta)

    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                             artifact_path="predictions_test.csv"))
    logged.loc[0, "label"] = next(c for c in sorted(set(logged["true"])) if c != logged.loc[0, "label"])
    edited = tmp_path / "edited" / "predictions_test.csv"
    edited.parent.mkdir()
    logged.to_csv(edited, index=False)
    client.log_artifact(result.run_id, str(edited))  # overwrites the run's file
    promote(run_id=result.run_id, name="served-edited", force=True)
    capsys.readouterr()
    assert main(["predict", "--model", f"models:/served-edited@{CHAMPION}", "--evaluate", str(tiny_version)]) == 1
    out = capsys.readouterr().out
    assert "served differs from logged" in out and logged.loc[0, "file"] in out


@pytest.mark.slow
def test_a_pretrained_run_records_where_its_weights_came_from(tiny_version, mlflow_store, tmp_path, monkeypatch):
    from research.pretrained import PACKAGE_SOURCES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty caches: the pinned package supplies the weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = tiny_cfg(tiny_version, tmp_path, model="efficientnet_lite0", pretrained=True, image_size=32,
                   loader="features", epochs=1)
    params = mlflow.MlflowClient().get_run(train(cfg).run_id).data.params
    source = PACKAGE_SOURCES["tf_efficientnet_lite0"]
    assert params["pretrained.source"].startswith(f"package {source.requirement}")
    assert params["pretrained.sha256"] == source.sha256


def test_cached_weights_whose_digest_does_not_match_their_name_are_refused(tmp_path):
    from research.pretrained import verified_cache_file

    good = tmp_path / "resnet18-5f3a9c1e.pth"  # torch hub names end in the first hex digits of the sha256
    good.write_bytes(b"weights")
    import hashlib

    digest = hashlib.sha256(b"weights").hexdigest()
    named = tmp_path / f"resnet18-{digest[:8]}.pth"
    named.write_bytes(b"weights")
    assert verified_cache_file(named).sha256 == digest
    with pytest.raises(ConfigError, match="sha256 mismatch.*resnet18-5f3a9c1e"):
        verified_cache_file(good)


def other_value(value):
    """A different value of a config field's type (validity does not matter: the key only reads it)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    return 1 if value is None else None


def test_stored_activations_are_keyed_by_each_input_and_by_nothing_else():
    """A stored activation depends on the data, the prefix's weights, k, the preprocessing and the views, and with
    augmented views on the augmentation and the seed: each changes the key; no other config field does (a lr or a
    loss must find the same store; a changed input must never)."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from research.config import TrainConfig
    from research.inputs.features import features_key, weights_digest
    from research.models import Preprocessing

    data, weights, prep = SimpleNamespace(digest="a" * 64), "w" * 16, Preprocessing(32, HALF, HALF, "bilinear")
    declared = {"feature_views", "trainable_stages"}
    augmented = declared | {"seed", "augment"}
    for views, inputs in ((0, declared), (2, augmented)):
        cfg = tiny_cfg(Path("v"), Path("."), model="efficientnet_lite0", loader="features", feature_views=views,
                       trainable_stages=1)
        key = features_key(data, weights, prep, cfg)
        assert features_key(SimpleNamespace(digest="b" * 64), weights, prep, cfg) != key, "data"
        assert features_key(data, "v" * 16, prep, cfg) != key, "weights"
        for field in ("image_size", "mean", "std", "interpolation"):
            value = getattr(prep, field)
            changed = value + 1 if field == "image_size" else "bicubic" if field == "interpolation" else (0.4,) * 3
            assert features_key(data, weights, dataclasses.replace(prep, **{field: changed}), cfg) != key, field
        for field in dataclasses.fields(TrainConfig):
            if field.name == "augment":
                changes = [{"augment": dataclasses.replace(cfg.augment, **{f.name: other_value(getattr(cfg.augment,
                                                                                                    f.name))})}
                           for f in dataclasses.fields(cfg.augment)]
            else:
                changes = [{field.name: other_value(getattr(cfg, field.name))}]
            for change in changes:
                changed = features_key(data, weights, prep, dataclasses.replace(cfg, **change)) != key
                assert changed == (field.name in inputs), (views, change)

    # the prefix's weights: every parameter and buffer (frozen batch-norm statistics shape its output), nothing else
    prefix = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    digest = weights_digest(prefix)
    prefix.train().requires_grad_(False)
    assert weights_digest(prefix) == digest
    for tensor in (prefix[0].weight, prefix[1].running_mean):
        with torch.no_grad():
            tensor[0] += 1e-3
        assert weights_digest(prefix) != digest
        digest = weights_digest(prefix)


# ------------------------------------------------------------------------------ validation chooses

def log_run(tmp: Path, *, val_f1: float, test_f1: float, digest: str = "d" * 64, study: str | None = None) -> str:
    """A FINISHED run with a real (tiny) model whose logged val and test figures are given: the gate reads those."""
    meta = model_meta(classes=CLASSES, image_size=24, mean=HALF, std=HALF, interpolation="bilinear", model="tiny",
                      dataset_version="vt", dataset_digest=digest, channels_last=False)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / META_FILE).write_text(json.dumps(meta))
    tags = {"optuna_study": study, "optuna_trial": "0"} if study else {}
    with mlflow.start_run(experiment_id=tracking.experiment_id("gate"), tags=tags) as run:
        mlflow.log_params({"model": "tiny", "dataset_digest": digest})
        mlflow.log_metrics({"val_f1_macro": val_f1, "test_f1_macro": test_f1})
        mlflow.pytorch.log_model(tiny_module(), name="model", serialization_format="pickle",
                                 pip_requirements=pip_requirements(), extra_files=[str(tmp / META_FILE)])
    return run.info.run_id


def champion_run(name: str) -> str:
    return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).tags["source_run_id"]


@pytest.mark.slow
def test_promote_gates_on_val_and_never_on_test(mlflow_store, tmp_path, capsys):
    champ = log_run(tmp_path / "a", val_f1=0.60, test_f1=0.50)
    higher_test_lower_val = log_run(tmp_path / "b", val_f1=0.55, test_f1=0.70)
    higher_val_lower_test = log_run(tmp_path / "c", val_f1=0.65, test_f1=0.40)
    promote(run_id=champ, name="gate")

    with pytest.raises(PromotionRefused, match=r"val_f1_macro 0\.5500 .*, not better than the champion.s 0\.6000"):
        promote(run_id=higher_test_lower_val, name="gate")
    assert champion_run("gate") == champ
    capsys.readouterr()
    assert main(["promote", "--run", higher_test_lower_val, "--name", "gate"]) == 2
    err = capsys.readouterr().err
    assert "never compared" in err and "--force" in err and len(err.strip().splitlines()) == 1

    p = promote(run_id=higher_val_lower_test, name="gate")
    assert champion_run("gate") == higher_val_lower_test and p.previous_version == "1"
    assert (p.score, p.previous_score) == (0.65, 0.60)


@pytest.mark.slow
def test_a_test_metric_cannot_choose(mlflow_store, tmp_path, capsys):
    run = log_run(tmp_path / "a", val_f1=0.6, test_f1=0.5)
    with pytest.raises(ConfigError, match="test split reports, it never chooses"):
        promote(run_id=run, name="gate-metric", metric="test_f1_macro")
    capsys.readouterr()
    assert main(["promote", "--experiment", "gate", "--metric", "test_accuracy", "--name", "gate-metric"]) == 2
    assert "validation metric only" in capsys.readouterr().err
    assert not mlflow.MlflowClient().search_model_versions("name = 'gate-metric'")  # nothing registered


@pytest.mark.slow
def test_runs_chosen_on_other_data_or_metrics_are_not_compared(mlflow_store, tmp_path):
    champ = log_run(tmp_path / "a", val_f1=0.5, test_f1=0.5, digest="a" * 64)
    other_data = log_run(tmp_path / "b", val_f1=0.9, test_f1=0.9, digest="b" * 64)
    promote(run_id=champ, name="gate-like")
    with pytest.raises(PromotionRefused, match="Not comparable.*digest aaaaaaaaaaaa.*digest bbbbbbbbbbbb"):
        promote(run_id=other_data, name="gate-like")
    with pytest.raises(PromotionRefused, match="Not comparable.*selected on val_f1_macro.*on val_accuracy"):
        promote(run_id=other_data, name="gate-like", metric="val_accuracy")
    promote(run_id=other_data, name="gate-like", force=True)
    assert champion_run("gate-like") == other_data


@pytest.mark.slow
def test_promote_with_a_study_ranks_by_the_studys_objective(mlflow_store, tmp_path):
    low_loss = log_run(tmp_path / "a", val_f1=0.4, test_f1=0.4, study="by-loss")
    high_f1 = log_run(tmp_path / "b", val_f1=0.8, test_f1=0.8, study="by-loss")
    client = mlflow.MlflowClient()
    client.log_metric(low_loss, "val_loss", 0.2)
    client.log_metric(high_f1, "val_loss", 0.9)
    parent = client.create_run(tracking.experiment_id("gate"), tags={"optuna_study": "by-loss",
                                                                     "optuna_role": "parent"})
    client.log_param(parent.info.run_id, "objective", "minimize val_loss")
    p = promote(study="by-loss", name="gate-study")
    assert (p.run_id, p.metric, p.score) == (low_loss, "val_loss", 0.2)


def log_epochs(tmp: Path, f1: list[float], loss: list[float], *, selected: bool) -> str:
    """A run with a real model and per-epoch val figures, its weights from the best-F1 epoch, as train.py logs it
    (`selected: False`: as it logged before selected_* existed, best_epoch alone)."""
    run_id = log_run(tmp, val_f1=f1[0], test_f1=0.5)
    client, chosen = mlflow.MlflowClient(), max(range(len(f1)), key=lambda i: (f1[i], -i))
    for epoch, (f, v) in enumerate(zip(f1, loss), start=1):
        client.log_metric(run_id, "val_f1_macro", f, step=epoch)
        client.log_metric(run_id, "val_loss", v, step=epoch)
    client.log_metric(run_id, "best_epoch", chosen + 1)
    if selected:
        client.log_metric(run_id, "selected_val_f1_macro", f1[chosen])
        client.log_metric(run_id, "selected_val_loss", loss[chosen])
    return run_id


@pytest.mark.slow
def test_a_run_is_ranked_and_gated_on_the_epoch_whose_weights_it_kept(mlflow_store, tmp_path):
    """Its best val loss over epochs may belong to weights it did not keep: the figure is the chosen epoch's (what
    train.py logs as selected_*, tests/test_registry.py; for a run logged before, read at step best_epoch)."""
    client = mlflow.MlflowClient()
    # lowest val loss 0.2 at epoch 2, but the weights are epoch 3's (F1 0.6), whose val loss is 0.5
    kept_late = log_epochs(tmp_path / "a", f1=[0.3, 0.4, 0.6], loss=[0.9, 0.2, 0.5], selected=False)
    steady = log_epochs(tmp_path / "b", f1=[0.5, 0.6], loss=[0.8, 0.3], selected=True)
    p = promote(experiment="gate", metric="val_loss", name="gate-epoch")
    assert (p.run_id, p.score) == (steady, 0.3)
    version = client.get_model_version_by_alias("gate-epoch", CHAMPION)
    assert version.tags["selection_metric"] == "val_loss" and float(version.tags["selected_val_loss"]) == 0.3
    with pytest.raises(PromotionRefused, match=r"val_loss 0\.5000 \(at its kept epoch\), not better than .* 0\.3000"):
        promote(run_id=kept_late, name="gate-epoch", metric="val_loss")


@pytest.mark.slow
def test_the_demo_keeps_a_better_champion_and_goes_on_with_it(mlflow_store, tmp_path, capsys):
    from research.demo import promote_or_keep

    better = log_run(tmp_path / "a", val_f1=0.70, test_f1=0.60, study="transfer")
    demo_best = log_run(tmp_path / "b", val_f1=0.55, test_f1=0.65, study="demo")
    promote(run_id=better, name="illustration-classifier")
    capsys.readouterr()
    kept, was_kept = promote_or_keep("demo")
    out = capsys.readouterr().out
    assert was_kept and kept.run_id == better and kept.uri.endswith("@champion")
    assert "kept the registry's champion: its val_f1_macro 0.7" in out and "beats" in out
    assert "0.55" in out and demo_best in out
    assert champion_run("illustration-classifier") == better


@pytest.mark.slow
def test_the_demo_keeps_a_champion_chosen_on_other_data_and_says_so(mlflow_store, tmp_path, capsys):
    from research.demo import promote_or_keep

    other = log_run(tmp_path / "a", val_f1=0.40, test_f1=0.30, digest="e" * 64, study="elsewhere")
    log_run(tmp_path / "b", val_f1=0.60, test_f1=0.60, study="demo")
    promote(run_id=other, name="illustration-classifier")
    capsys.readouterr()
    kept, was_kept = promote_or_keep("demo")
    out = capsys.readouterr().out
    assert was_kept and kept.run_id == other
    assert "not comparable" in out and "--force" in out and "beats" not in out
