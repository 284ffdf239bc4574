"""Issue 35, holes of the third kind: files the project reads back, trusted without a check.

One verifier (research/verify.py) for every file read back: stored activations are rebuilt when damaged (as the
decoded-image cache already was); a model's model_meta.json, a run's config.yaml and a dataset version's files
(against the sha256 its manifest records) are one `error:` line naming the model, run or file and the fix.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from research.config import TrainConfig
from research.configfile import from_dict
from research.serving import model_meta
from tests.reliability import files_under, kill, refused, start_cli, tiny_train_config, wait_for

# ------------------------------------------------------------------------------ stored activations

def features_cfg(version: Path, tmp: Path, **changes) -> TrainConfig:
    return from_dict(TrainConfig, tiny_train_config(version, tmp / "ckpt", loader="features", experiment="feat",
                                                    **changes))


def store_dir(root: Path) -> Path:
    (found,) = [p for p in (root / "data/cache/features").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


@pytest.mark.parametrize("damage", ["truncate train.npy", "zero the header of val.npy", "delete test.npy",
                                    "delete key.json"])
def test_damaged_stored_activations_are_rebuilt(tiny_version, tmp_path, mlflow_store, monkeypatch, capsys, damage):
    """A truncated train.npy, a zeroed header or a deleted test.npy gave tracebacks, and every later run of that
    recipe failed: only key.json was checked."""
    from research.train import train

    monkeypatch.chdir(tmp_path)
    first = train(features_cfg(tiny_version, tmp_path))
    store = store_dir(tmp_path)
    expected = {s: np.load(store / f"{s}.npy") for s in ("train", "val", "test")}
    action, _, name = damage.partition(" the header of ") if "header" in damage else damage.partition(" ")
    if damage.startswith("truncate"):
        data = (store / name).read_bytes()
        (store / name).write_bytes(data[: len(data) // 2])
    elif "header" in damage:
        with open(store / name, "r+b") as f:
            f.write(b"\0" * 16)
    else:
        (store / name).unlink()
    capsys.readouterr()
    again = train(features_cfg(tiny_version, tmp_path))
    assert "rebuilding stored activations" in capsys.readouterr().err
    assert again.test == first.test  # the same stored activations, built again
    for split, array in expected.items():
        np.testing.assert_array_equal(np.load(store / f"{split}.npy"), array)


def test_a_killed_build_of_stored_activations_leaves_no_hidden_folder(tiny_version, tmp_path):
    """A killed build left a hidden temporary folder that nothing removed."""
    from tests.reliability import cli_env

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, tmp_path / "ckpt", loader="features",
                                                    feature_views=400)))
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    features = tmp_path / "data/cache/features"
    proc = start_cli("train", "--config", cfg, cwd=tmp_path, env=env, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: any(p.is_dir() for p in features.glob(".*")) if features.is_dir() else False, 180, 0.05,
                 "the build's temporary folder")
    finally:
        kill(proc, signal.SIGKILL)
    assert [p for p in features.iterdir() if p.is_dir() and p.name.startswith(".")]  # what the kill left
    proc = start_cli("train", "--config", cfg, "--set", "feature_views=1", cwd=tmp_path, env=env,
                     log=tmp_path / "next.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "next.log").read_text()[-3000:]
    assert [p.name for p in features.iterdir() if p.name.startswith(".")] == []  # its folder, and no lock file


# ------------------------------------------------------------------------------ a dataset version edited by hand

@pytest.mark.parametrize("edit", ["delete", "overwrite"])
def test_a_version_edited_after_split_is_one_error_naming_the_file(tiny_version, tmp_path, mlflow_store, monkeypatch,
                                                                   capsys, edit):
    """An image deleted or overwritten by hand gave a ValueError traceback when training at a new image size."""
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "versions" / "tiny"
    shutil.copytree(tiny_version, copy)
    victim = sorted((copy / "train").rglob("*.png"))[0]
    if edit == "delete":
        victim.unlink()
    else:
        shutil.copy(sorted((copy / "val").rglob("*.png"))[0], victim)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(copy, tmp_path / "ckpt", image_size=40)))
    err = refused(["train", "--config", cfg], capsys)
    rel = victim.relative_to(copy).as_posix()
    assert f"Version tiny at {copy}: {rel} {'is missing' if edit == 'delete' else 'differs from the sha256'}" in err
    assert "--version tiny --force" in err
    assert files_under(tmp_path / "data" / "cache") in ([], [p for p in files_under(tmp_path / "data" / "cache")
                                                             if not p.endswith((".u8", "meta.json"))])


# ------------------------------------------------------------------------------ a model's model_meta.json

CLASSES = ["circle", "square", "stripe"]


def good_meta() -> dict:
    return model_meta(classes=CLASSES, image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                      model="tiny", dataset_version="tiny", dataset_digest="0" * 12, channels_last=False)


@pytest.mark.parametrize("change, words", [
    ({"classes": CLASSES[:2]}, "lists 2 classes, but the model has 3 outputs"),
    ({"classes": [*CLASSES, "extra"]}, "lists 4 classes, but the model has 3 outputs"),
    ({"classes": "circle,square,stripe"}, "is not a list of two or more class names"),
    ({"classes": ["circle", "circle", "stripe"]}, "names class(es) ['circle'] twice"),
    ({"image_size": "abc"}, "image_size='abc' is not a positive whole number"),
    ({"temperature": "hot"}, "temperature='hot' is not a positive number"),
])
def test_a_damaged_model_meta_is_one_error_naming_the_model(tmp_path, mlflow_store, capsys, change, words):
    """19 or 21 classes, classes as a string, image_size "abc" or temperature "hot" gave a traceback; duplicate
    class names were served."""
    from research.registry import promote
    from tests.test_serving import log_tiny_model

    run_id = log_tiny_model(tmp_path / "m", meta=good_meta() | change)
    promote(run_id=run_id, name="damaged")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (30, 30), "white").save(image)
    for uri in ("models:/damaged@champion", f"runs:/{run_id}/model"):
        err = refused(["predict", image, "--model", uri], capsys)
        assert err.startswith(f"error: model {uri}") and words in err, err
        assert "/tmp" not in err and "promote --run" in err


def test_a_missing_model_file_names_the_model_not_a_temporary_folder(tmp_path, mlflow_store, capsys):
    """The message named a deleted temporary folder, not the model."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from research.registry import promote
    from tests.test_serving import log_tiny_model

    run_id = log_tiny_model(tmp_path / "m", meta=good_meta())
    promote(run_id=run_id, name="gone")
    client = mlflow.MlflowClient()
    source = client.get_model_version("gone", "1").source  # models:/<logged model id>
    repo = get_artifact_repository(client.get_logged_model(source.removeprefix("models:/")).artifact_location)

    def weights(path=None):
        for f in repo.list_artifacts(path):
            yield from weights(f.path) if f.is_dir else [f.path] if f.path.endswith(".pth") else []

    found = list(weights())
    assert found
    repo.delete_artifacts(found[0])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (30, 30), "white").save(image)
    err = refused(["predict", image, "--model", "models:/gone@champion"], capsys)
    assert err.startswith("error: model models:/gone@champion") and "cannot be loaded" in err
    assert "research-model-" not in err and "promote --run" in err


# ------------------------------------------------------------------------------ a run without config.yaml

def test_a_run_without_config_is_one_error_naming_the_run(tmp_path, mlflow_store, capsys, monkeypatch):
    """An ensemble run passed to `styles --run`, or a member without config.yaml, gave MlflowException's
    traceback."""
    from research import tracking
    from research.ensemble import build_ensemble
    from research.runquery import Candidate
    from tests.test_serving import log_tiny_model

    monkeypatch.chdir(tmp_path)
    with mlflow.start_run(experiment_id=tracking.experiment_id("bare"), tags={"ensemble_of": "a,b"}) as run:
        mlflow.log_metric("val_f1_macro", 0.5)
    err = refused(["styles", "--run", run.info.run_id], capsys)
    assert f"Run {run.info.run_id} has no config.yaml (an ensemble of a,b, not a training run)" in err
    assert "styles --run" in err

    client = mlflow.MlflowClient()
    members = [Candidate(client.get_run(log_tiny_model(tmp_path / f"m{i}", meta=good_meta())), 0.5, "val_f1_macro")
               for i in range(2)]
    from research.errors import ConfigError

    with pytest.raises(ConfigError, match=f"Run {members[0].run_id} has no config.yaml .*a member of an ensemble"):
        build_ensemble(members, None)
