"""Issue 35, holes of the second kind: every check a command can make from its arguments and the files it reads
runs before any training or caching.

Bounds with a reason (stored views against memory, batch size against BatchNorm and the training set, sweep
workers against cores), the members of `styles --ensemble`, and the minimum groups per class for every kind of
split (leave-one-style-out and a val style too). Each refusal is exit code 2 and one `error:` line, and
nothing was trained, cached or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import yaml

from research.cli import main
from tests.conftest import make_version
from tests.reliability import (
    cli_env,
    files_under,
    refused,
    run_cli,
    styled_clean_dir,
    tiny_sweep_spec,
    tiny_train_config,
)


def runs_in(experiment: str) -> list:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


# ------------------------------------------------------------------------------ bounds with a reason

def test_stored_views_that_cannot_fit_are_refused_before_anything_is_cached(tiny_version, tmp_path):
    """`--set feature_views=1000000000` used to run 10 minutes, memory growing, until killed."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, tmp_path / "ckpt", loader="features")))
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out, seconds = run_cli("train", "--config", cfg, "--set", "feature_views=1000000000", cwd=tmp_path, env=env,
                           timeout=90)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: feature_views=1000000000: the stored activations would take" in out.stderr
    assert "of memory available" in out.stderr and "--set feature_views=" in out.stderr
    assert "Traceback" not in out.stderr and seconds < 60
    assert files_under(tmp_path / "data") == []  # no decoded cache, no stored activations
    assert not (tmp_path / "ckpt").exists()


def test_a_batch_of_one_is_refused_where_batchnorm_needs_two(tiny_version, tmp_path, mlflow_store, capsys,
                                                             monkeypatch):
    """`--batch-size 1` ended in BatchNorm's ValueError traceback; on a one-image training set the pre-check
    suggested exactly that batch size."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, tmp_path / "ckpt", experiment="bn")))
    err = refused(["train", "--config", cfg, "--batch-size", "1"], capsys)
    assert "batch_size=1: resnet18 has BatchNorm layers, which need at least 2 images per batch" in err
    assert "--batch-size 2" in err

    one = make_version(tmp_path, {"train": {"a": 1}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}, name="one")
    cfg.write_text(yaml.safe_dump(tiny_train_config(one, tmp_path / "ckpt", experiment="bn")))
    err = refused(["train", "--config", cfg], capsys)
    assert "The training set of one holds 1 image(s)" in err and "--batch-size 1" not in err
    assert runs_in("bn") == [] and files_under(tmp_path / "data") == []


def test_sweep_workers_are_between_one_and_the_cores(tiny_version, tmp_path, mlflow_store, capsys, monkeypatch):
    """`--workers 0` or `-1` quietly meant 1, and there was no upper bound."""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_sweep_spec(tiny_version, tmp_path / "ckpt", "w", 1, 1)))
    storage = f"journal:{tmp_path / 'w.journal'}"
    cores = len(os.sched_getaffinity(0))
    for workers, words in (("0", "at least one worker"), ("-1", "at least one worker"),
                           (str(cores + 1), f"this machine has {cores} core(s)")):
        err = refused(["sweep", spec, "--storage", storage, "--workers", workers], capsys)
        assert f"--workers {workers}: " in err and words in err
    assert not (tmp_path / "w.journal").exists() and runs_in("sweep-w") == []


# ------------------------------------------------------------------------------ styles --ensemble's members

def fake_run(version: Path, experiment: str, **changes) -> str:
    """A finished run holding only a config.yaml (all `styles --run` reads before training)."""
    from research import tracking

    cfg = tiny_train_config(version, Path("ckpt"), **changes)
    with mlflow.start_run(experiment_id=tracking.experiment_id(experiment)) as run:
        mlflow.log_text(yaml.safe_dump(cfg), "config.yaml")
    return run.info.run_id


def test_styles_refuses_ensemble_members_that_read_images_differently_before_training(
        tiny_version, tmp_path, mlflow_store, capsys, monkeypatch):
    """`styles --run A --run B --ensemble` trained every recipe for every style, then refused members whose
    preprocessing differs (with promote's advice)."""
    monkeypatch.chdir(tmp_path)
    a, b = fake_run(tiny_version, "recipes", image_size=32), fake_run(tiny_version, "recipes", image_size=48)
    err = refused(["styles", "--run", a, "--run", b, "--ensemble"], capsys)
    assert "styles --ensemble: the recipes differ in image_size" in err
    assert f"run {a}: 32" in err and f"run {b}: 48" in err and "--ensemble K" not in err  # not promote's advice
    assert runs_in("styles") == []  # no parent run, nothing trained
    assert main(["styles", "--run", a, "--run", b, "--ensemble", "--set", "image_size=32"]) == 2  # agree: next check
    assert "differ in" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ every kind of split

@pytest.fixture
def styled_clean(tmp_path) -> Path:
    """A clean dir of 4 classes in three styles: `ink`, `pastel`, `mono`; class `moon` is drawn in mono only,
    class `star` has no ink drawing."""
    return styled_clean_dir(tmp_path, {"circles": {"ink": 4, "pastel": 3, "mono": 3},
                                       "squares": {"ink": 4, "pastel": 3, "mono": 3},
                                       "moon": {"mono": 3}, "star": {"pastel": 4, "mono": 2}})


@pytest.mark.parametrize("extra, words", [
    # leave one style out: `moon` exists only in mono, so it has no training image
    (["--holdout-style", "mono", "--exclude-class", "star"], "Class 'moon' has no image in train or val"),
    # a val style: `star` has no ink drawing, so training never sees it
    (["--holdout-style", "mono", "--val-style", "pastel", "--exclude-class", "moon"], "Class 'star' has no image in "
                                                                                       "train"),
    # an empty style name (an unset shell variable) quietly built a mixed split
    (["--holdout-style", ""], "holdout_style='' names no style"),
    (["--holdout-style", "mono", "--val-style", " "], "val_style=' ' names no style"),
])
def test_splits_that_cannot_train_are_refused_for_every_kind(styled_clean, tmp_path, extra, words, capsys):
    err = refused(["split", styled_clean, "--version", "v", "--recipe", "v1", "--out", tmp_path / "versions",
                   "--workers", "1", "--set", "merge_near_duplicates=false", *extra], capsys)
    assert words in err
    assert files_under(tmp_path / "versions") == []


def test_a_split_of_one_class_is_refused(styled_clean, tmp_path, capsys):
    err = refused(["split", styled_clean, "--version", "v", "--recipe", "v1", "--out", tmp_path / "versions",
                   "--workers", "1", "--holdout-style", "mono", "--val-style", "pastel",
                   "--exclude-class", "moon", "--exclude-class", "star", "--exclude-class", "squares"], capsys)
    assert "holds 1 class(es) (circles)" in err


def test_splits_that_can_train_still_build(styled_clean, tmp_path):
    from research.data.versions import load_version

    assert main(["split", str(styled_clean), "--version", "v", "--recipe", "v1", "--out", str(tmp_path / "versions"),
                 "--workers", "1", "--set", "merge_near_duplicates=false", "--holdout-style", "mono",
                 "--val-style", "pastel", "--exclude-class", "moon", "--exclude-class", "star"]) == 0
    frame = load_version(tmp_path / "versions" / "v").manifest
    assert {s: set(frame.loc[frame["split"] == s, "style"]) for s in ("train", "val", "test")} == {
        "train": {"ink"}, "val": {"pastel"}, "test": {"mono"}}
