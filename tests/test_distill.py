"""Distillation (research/inputs/teacher.py): a registered model teaches the student on the student's own view.

Real runs in the module's private store (tests/conftest.py `store`: resnet18 `good` and `weak` at 32 px on the tiny
version). `good` is registered as the teacher; the tests check, batch by batch, that the logits beside each
training batch are the registered teacher's on that batch's own view (so a swapped teacher or a misaligned view
fails them), that the loss is the one the config asks for on exactly those logits, and that a distilled run serves
what it measured.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from research.errors import ConfigError
from research.registry import PromotionRefused, promote
from research.train import build_parts, train
from tests.conftest import EXPERIMENT, tiny_cfg

AUGMENTED = {"crop_scale_min": 0.5, "hflip": 0.5, "rotation": 15.0, "color_jitter": 0.3, "grayscale": 0.2,
             "hue": 0.1, "mixup": 0.2}


@pytest.fixture(scope="module")
def teachers(store):
    """`teacher`: the good run; `teacher-ens`: good and weak averaged (an ensemble teacher)."""
    promote(run_id=store.good, name="teacher")
    ensemble = promote(experiment=EXPERIMENT, ensemble=2, name="teacher-ens")
    return {"models:/teacher@champion": store.good, "models:/teacher-ens@champion": ensemble.run_id}


def served_logits(run_id: str, x: torch.Tensor) -> torch.Tensor:
    """What the run's registered model serves for the normalised batch x, as logits: module output over the
    temperature the run logged (read here from the run's metrics, not from the code under test)."""
    module = mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()
    temperature = mlflow.MlflowClient().get_run(run_id).data.metrics["temperature"]
    with torch.no_grad():
        return module(x).float() / temperature


def distill_cfg(store, **changes):
    """A distilled resnet18 at 32 px; amp off, so the teacher's logits compare exactly (bf16 differs by ~0.02)."""
    return tiny_cfg(store.version, store.workdir, **{"teacher": "models:/teacher@champion", "distill_weight": 0.7,
                                                     "distill_temperature": 3.0, "augment": AUGMENTED, "amp": False,
                                                     **changes})


@pytest.mark.parametrize("uri", ["models:/teacher@champion", "models:/teacher-ens@champion"])
def test_each_batch_carries_the_registered_teachers_logits_on_its_own_view(store, teachers, uri):
    """Student and teacher read 32 px ImageNet-normalised images, so the teacher's view is the student's batch
    itself: its logits must be the registered teacher's on exactly that batch (crop, flip, rotation, colour, hue
    and mixup included), and the loss must be the config's mix on exactly those."""
    parts = build_parts(distill_cfg(store, teacher=uri))
    other = store.weak if uri == "models:/teacher@champion" else store.good
    w, t = 0.7, 3.0
    (parts.route.stored / "epoch-1.npz").unlink(missing_ok=True)  # as if no run had drawn these views before
    for computed in (True, False):  # the teacher runs on the epoch's views, then they are read back from its store
        assert (parts.route.stored / "epoch-1.npz").is_file() is not computed
        batches = 0
        for batch in parts.data.train.epoch(1):
            x, y = batch
            expected = served_logits(teachers[uri], x)
            np.testing.assert_allclose(batch.extras["teacher"].numpy(), expected.numpy(), atol=1e-4)
            assert not torch.allclose(batch.extras["teacher"], served_logits(other, x), atol=1e-2)  # swapped teacher
            logits = torch.randn(len(y), expected.shape[1])
            kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(expected / t, 1), reduction="batchmean")
            want = (1 - w) * parts.criterion(logits, y) + w * t * t * kl
            assert parts.route.loss(parts.criterion, logits, batch).item() == pytest.approx(want.item(), rel=1e-4)
            batches += 1
        assert batches == len(parts.data.train) > 1


def test_the_teacher_sees_the_same_crop_at_its_own_resolution():
    """A drawing decoded at 32 px (the student) and at 64 px (the teacher): the augmentation drawn for the student,
    its crop box scaled, gives the teacher the same view at twice the pixels, not another crop of the image."""
    from research.config import AugmentConfig
    from research.inputs.loaders import BatchAugment
    from research.inputs.teacher import scaled_box

    yy, xx = np.mgrid[:64, :64] / 63.0
    big = np.stack([xx * 255, yy * 255, (xx * yy) * 255], -1).astype(np.uint8)  # a smooth, asymmetric image
    small = big.reshape(32, 2, 32, 2, 3).mean((1, 3)).round().astype(np.uint8)
    aug = AugmentConfig(crop_scale_min=0.3, hflip=0.5, rotation=20.0, color_jitter=0.0)
    cpu = torch.device("cpu")
    student, teacher = BatchAugment(aug, 32, cpu), BatchAugment(aug, 64, cpu)
    n = 16
    as_batch = lambda a: torch.from_numpy(np.repeat(a[None], n, 0)).permute(0, 3, 1, 2)  # noqa: E731
    params = student.params(n, torch.Generator().manual_seed(3))
    seen_small = student.apply(as_batch(small), params)
    seen_big = teacher.apply(as_batch(big), scaled_box(params, 2.0))
    unscaled = teacher.apply(as_batch(big), params)
    same = (F.avg_pool2d(seen_big, 2) - seen_small).abs().mean().item()
    other = (F.avg_pool2d(unscaled, 2) - seen_small).abs().mean().item()
    assert same < 0.05 < other


def test_stored_views_get_the_teachers_logits_on_the_same_stored_view(store, tmp_path, monkeypatch):
    """loader=features with augmented views: a lite0 teacher whose trunk is the student's (ImageNet, frozen on
    stored features) gives, for each stored view, teacher.head(the student's stored features of that view); its plain
    view is what the registered teacher serves on the training files, and it saw no val or test image."""
    from research.data.versions import load_version
    from research.inputs.decoded import split_items
    from research.serving import load_model

    lite = dict(model="efficientnet_lite0", pretrained=True, loader="features", epochs=2, batch_size=8, amp=False)
    teacher_run = train(tiny_cfg(store.version, store.workdir, run_name="lite teacher", **lite)).run_id
    promote(run_id=teacher_run, name="lite-teacher")
    parts = build_parts(tiny_cfg(store.version, store.workdir, teacher="models:/lite-teacher@champion",
                                 feature_views=2, augment={k: v for k, v in AUGMENTED.items() if k != "mixup"},
                                 **lite))
    assert parts.route.stored is not None and sorted(p.name for p in parts.route.stored.iterdir()) == [
        "key.json", "train.npy"]  # training views only
    stored = np.load(parts.route.stored / "train.npy")
    n_train = len(parts.data.train_labels)
    assert stored.shape == (3, n_train, len(parts.data.classes))

    head = mlflow.pytorch.load_model(f"runs:/{teacher_run}/model").eval().head
    temperature = mlflow.MlflowClient().get_run(teacher_run).data.metrics["temperature"]
    views = set()
    for batch in parts.data.train.epoch(1):
        with torch.no_grad():
            expected = head(batch[0]) / temperature
        np.testing.assert_allclose(batch.extras["teacher"].numpy(), expected.numpy(), atol=1e-3)
        views |= set(batch.extras["view"].tolist())
    assert views == {0, 1, 2}

    version = load_version(store.version)
    paths, _ = split_items(version, "train")
    images = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
    served = load_model("models:/lite-teacher@champion").predict(images)[[f"p_{c}" for c in version.classes]]
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(stored[0]), 1).numpy(), served.to_numpy(), atol=1e-4)


def test_a_distilled_run_records_its_teacher_and_serves_what_it_measured(store, teachers):
    from research.predict import evaluate_served

    result = train(distill_cfg(store, run_name="student", epochs=2))
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["teacher"] == "models:/teacher/1"  # the alias pinned to the version it named
    assert params["teacher.uri"] == "models:/teacher@champion" and params["teacher.version"] == "1"
    assert params["teacher.run_id"] == store.good and params["teacher.outputs"] == "on each batch"
    assert params["teacher.dataset_digest"] == params["dataset_digest"]
    assert params["distill_weight"] == "0.7" and params["distill_temperature"] == "3.0"
    assert tags["distilled_from"] == "models:/teacher/1"

    p = promote(run_id=result.run_id, name="student")
    out = evaluate_served("models:/student@champion", str(store.version))
    assert out["equal"] is True and out["mismatched_images"] == [] and out["run_id"] == result.run_id
    version = client.get_model_version("student", p.version)
    assert version.tags["teacher_run_id"] == store.good and version.tags["teacher"] == "models:/teacher/1"
    assert "Distilled from models:/teacher/1" in version.description

    # the teacher is part of the recipe: a run without one is not compared with this champion
    with pytest.raises(PromotionRefused, match="distilled from models:/teacher/1, run .* from no teacher") as refused:
        promote(run_id=store.weak, name="student")
    assert refused.value.comparable is False


def test_the_report_shows_a_distilled_champions_teacher_beside_it(store, teachers):
    from research import configfile
    from research.report import report
    from research.sweep import SweepSpec, sweep

    storage = f"journal:{store.workdir / 'distill.journal'}"
    base = configfile.to_dict(distill_cfg(store, epochs=1)) | {"experiment": "distill-study"}
    spec = configfile.from_dict(SweepSpec, {"study_name": "distill", "n_trials": 1, "base": base, "space": {},
                                            "pruner": {"name": "none"}})
    sweep(spec, storage)
    rep = report("distill", baseline=[store.weak], storage_url=storage, out_dir=store.workdir / "report", log=False)
    teacher = rep["teacher"]
    good = mlflow.MlflowClient().get_run(store.good)
    assert teacher["run_id"] == store.good and teacher["test_f1_macro"] == good.data.metrics["test_f1_macro"]
    page = (store.workdir / "report" / "report.md").read_text()
    assert "teacher models:/teacher/1 (resnet18)" in page and "distilled from models:/teacher/1" in page


def test_a_run_without_a_teacher_logs_the_params_it_always_did():
    from research.config import TrainConfig
    from research.train import flat_params

    params = flat_params(TrainConfig())
    assert not {"teacher", "distill_weight", "distill_temperature"} & set(params)
    assert {"teacher", "distill_weight", "distill_temperature"} <= set(flat_params(TrainConfig(teacher="models:/t/1")))


def test_a_teacher_trained_on_other_data_is_refused_in_one_line(store, teachers, version, capsys):
    from research.cli import main

    cfg = tiny_cfg(version.dir, store.workdir, teacher="models:/teacher@champion", experiment="refused")
    path = store.workdir / "refused.yaml"
    from research import configfile

    configfile.save(cfg, path)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacher models:/teacher@champion (version 1") and "Traceback" not in err, err
    assert "could be this run's val or test images" in err
    assert mlflow.MlflowClient().get_experiment_by_name("refused") is None  # nothing was started


@pytest.mark.parametrize("changes, needle", [
    ({"teacher": "runs:/abc/model"}, "give a registered model, models:/NAME@ALIAS"),
    ({"teacher": "models:/teacher@champion", "loader": "folder"}, "loader=folder"),
    ({"distill_weight": 0.3}, "distill_weight=0.3 only applies to a teacher"),
    ({"teacher": "models:/nobody@champion"}, "no such registered model version"),
])
def test_teacher_configs_that_cannot_work_are_refused(store, teachers, changes, needle):
    with pytest.raises(ConfigError, match=needle):
        build_parts(tiny_cfg(store.version, store.workdir, **changes))


def test_a_batchs_mix_depends_on_its_seed_alone():
    """The teacher replays the student's MixUp/CutMix from the batch's seed; torch's global generator (shared by the
    prefetch thread and the training thread's dropout) must play no part in the draw."""
    from research.config import AugmentConfig
    from research.inputs.loaders import BatchMix

    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    for aug in (AugmentConfig(mixup=0.4), AugmentConfig(cutmix=1.0), AugmentConfig(mixup=0.4, cutmix=1.0)):
        mix = BatchMix(aug, 3)
        torch.manual_seed(1)
        first = mix(x, y, 123)
        torch.manual_seed(2)
        torch.rand(100)  # another thread's draws
        again = mix(x, y, 123)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        mixed, target = first
        lam = target[0, 0].item()  # y[0] = 0, the rolled-in y[-1] = 2: the weight of the image's own class
        assert target.sum(1).allclose(torch.ones(6)) and 0 < lam <= 1
        if aug.cutmix == 0:  # MixUp: the same weight on the pixels
            assert mixed.allclose(lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    mixup = BatchMix(AugmentConfig(mixup=0.4), 3)
    assert not torch.equal(mixup(x, y, 124)[0], mixup(x, y, 123)[0])  # another batch, another draw
