"""Every shipped study spec (`sweeps/*.yaml`) runs for real: its enqueued trials (or one), one epoch, 32 px, the
tiny dataset.

The spec's own base config, search space, sampler, pruner and enqueued trials are kept; only what sizes the
run for a test changes (see `sized_overrides`). A distillation spec's teacher is a 1-epoch run registered under
the name its `teacher` URI names (`register_teacher`). A spec added later is picked up by the glob.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from research.sweep import load_spec, make_storage, sweep

# ~2-3 min on 2 shared CPU cores: a VGG16_v2 trial takes 15-30 s, mostly writing ~0.5 GB checkpoints and models
pytestmark = pytest.mark.slow
SPECS = sorted((Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))
# keys a spec may search that must point at the test's data and size instead: searched (or enqueued), they
# are pinned to the test's value; the rest of the space and of the enqueued trials stays as the spec has it
PINNED = ("dataset", "image_size", "epochs", "batch_size", "warmup_epochs")


def sized_overrides(path: Path, version: Path, checkpoint_dir: Path) -> dict:
    """One trial of one epoch at 32 px on the tiny version. Batch 8: the tiny version trains on ~27 images
    and the trainer refuses a batch larger than the training set. No warm-up: it must be shorter than the run."""
    sized = {"dataset": str(version), "image_size": 32, "epochs": 1, "batch_size": 8, "warmup_epochs": 0}
    raw = load_spec(path)
    return {
        # every enqueued trial runs (a spec may enqueue a curve), else one TPE/random trial
        "study_name": f"shipped-{path.stem}", "experiment": f"shipped-{path.stem}",
        "n_trials": max(1, len(raw.enqueue)),
        "base": {**sized, "device": "cpu", "checkpoint_dir": str(checkpoint_dir)},
        "space": {key: {"type": "categorical", "choices": [sized[key]]} for key in PINNED if key in raw.space},
        "enqueue": [{**params, **{key: sized[key] for key in PINNED if key in params}} for params in raw.enqueue],
        # hyperband's smallest rung must fit the one epoch (the spec's own pruner is checked against its epochs)
        "pruner": {"min_resource": min(raw.pruner.min_resource, sized["epochs"])},
    }


def register_teacher(uri: str, version: Path, tmp_path: Path) -> str:
    """A distillation spec's teacher, made for the test: a 1-epoch resnet18 on the tiny version, registered under the
    name (and alias) the spec's `teacher` URI names. Returns its run id."""
    from research.inputs.teacher import parse_uri
    from research.registry import promote
    from research.train import train
    from tests.conftest import tiny_cfg

    name, kind, ref = parse_uri(uri)
    run_id = train(tiny_cfg(version, tmp_path, epochs=1, experiment="teacher")).run_id
    registered = promote(run_id=run_id, name=name)
    if kind == "alias":
        mlflow.MlflowClient().set_registered_model_alias(name, ref, registered.version)
    return run_id


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_runs_one_trial(path, tiny_version, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stored images and features (data/cache/) land in the test's folder
    teacher = load_spec(path).base.get("teacher")
    teacher_run = register_teacher(teacher, tiny_version, tmp_path) if teacher else None
    spec = load_spec(path, sized_overrides(path, tiny_version, tmp_path / "ckpt"))
    storage = f"journal:{tmp_path / 'study.journal'}"
    summary = sweep(spec, storage)

    study = optuna.load_study(study_name=spec.study_name, storage=make_storage(storage))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * spec.n_trials, summary["counts"]
    for trial in trials:
        run = mlflow.MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        assert run.info.status == "FINISHED" and "val_f1_macro" in run.data.metrics
        assert run.data.params.get("teacher.run_id") == teacher_run  # a distillation spec's student names its teacher
