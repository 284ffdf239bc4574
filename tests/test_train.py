"""Training: one real run in a private MLflow store on a tiny dataset version (32 px)."""

from __future__ import annotations

import mlflow
import pytest

from research import configfile
from research.config import TrainConfig
from research.errors import ConfigError
from research.runlog import EPOCH_METRICS
from research.train import resume, train

REQUIRED_PARAMS = ("model", "dataset_version", "dataset_digest", "batch_size", "lr", "lr_schedule", "loss",
                   "sampler", "epochs", "image_size", "seed", "optimizer")
TEST_METRICS = ("test_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro")


def tiny_cfg(version_dir, tmp_path, **changes) -> TrainConfig:
    base = dict(model="resnet18", dataset=str(version_dir), image_size=32, epochs=2, batch_size=8, lr=0.05,
                lr_schedule="cosine", loss="focal", sampler="weighted", experiment="test-train",
                checkpoint_dir=str(tmp_path / "ckpt"), device="cpu")
    return configfile.from_dict(TrainConfig, base | changes)


def artifact_paths(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(artifact_paths(client, run_id, f.path) if f.is_dir else [f.path])
    return out


@pytest.mark.slow
def test_two_epoch_run_logs_params_metrics_artifacts(tiny_version, mlflow_store, tmp_path, monkeypatch):
    import research.train as train_mod

    # scripted val figures: epoch 1 has the better macro F1 (its weights are kept), epoch 2 the lower val loss
    scripted = {1: {"val_f1_macro": 0.7, "val_loss": 0.9}, 2: {"val_f1_macro": 0.5, "val_loss": 0.1}}
    run_epoch = train_mod.run_epoch
    monkeypatch.setattr(train_mod, "run_epoch", lambda parts, epoch, *a: run_epoch(parts, epoch, *a) | scripted[epoch])
    result = train(tiny_cfg(tiny_version, tmp_path))
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # the selection figures are the kept epoch's, not each metric's best over epochs
    assert run.data.metrics["best_epoch"] == 1 and run.data.metrics["selected_val_f1_macro"] == 0.7
    assert run.data.metrics["selected_val_loss"] == 0.9
    for key in REQUIRED_PARAMS:
        assert key in run.data.params, key
    assert run.data.params["model"] == "resnet18" and run.data.params["loss"] == "focal"
    for key in EPOCH_METRICS:
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    for key in TEST_METRICS:
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert any(k.startswith("test_f1_") and k not in TEST_METRICS for k in run.data.metrics)  # per class
    assert {"git_commit", "host", "device"} <= set(run.data.tags)
    arts = artifact_paths(client, result.run_id)
    for name in ("config.yaml", "confusion_matrix.png", "confusion_matrix_val.png", "classification_report_val.csv",
                 "classification_report_test.csv", "confusion_matrix_test.csv", "model_meta.json",
                 "per_class_f1_val.png", "per_class_f1_test.png", "mistakes_test.png"):
        assert name in arts, (name, arts)
    inputs = run.inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs}  # the version's mlflow.data datasets
    assert {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"} >= {"training", "validation"}
    # MLflow 3 keeps the model as a LoggedModel of the run; runs:/<id>/model resolves to it
    torch_model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    import torch

    torch_model.train()  # pickle format: a plain nn.Module that can be fine-tuned
    torch_model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in torch_model.parameters() if p.requires_grad)
    assert torch_model.head.out_features == len(__import__("json").loads(
        (tiny_version / "version.json").read_text())["classes"])


@pytest.mark.slow
def test_interrupt_and_resume_matches_uninterrupted(tiny_version, mlflow_store, tmp_path):
    full = train(tiny_cfg(tiny_version, tmp_path, epochs=3, run_name="full"))

    def stop_after_2(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_version, tmp_path, epochs=3, run_name="interrupted"), on_epoch=stop_after_2)
    client = mlflow.MlflowClient()
    killed = client.search_runs([client.get_experiment_by_name("test-train").experiment_id],
                                "attributes.run_name = 'interrupted'")[0]
    assert killed.info.status == "KILLED"
    resumed = resume(killed.info.run_id, checkpoint_root=str(tmp_path / "ckpt"))
    assert resumed.run_id == killed.info.run_id
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(resumed.run_id, key)) == [1, 2, 3], key
    for key in ("train_loss", "val_loss", "val_f1_macro"):
        a = [m.value for m in sorted(client.get_metric_history(full.run_id, key), key=lambda m: m.step)]
        b = [m.value for m in sorted(client.get_metric_history(resumed.run_id, key), key=lambda m: m.step)]
        assert a == pytest.approx(b, abs=1e-6), key
    assert resumed.test["test_f1_macro"] == pytest.approx(full.test["test_f1_macro"], abs=1e-9)


def test_bad_choices_name_the_valid_ones(tiny_version, tmp_path):
    with pytest.raises(ConfigError, match="resnet18"):
        tiny_cfg(tiny_version, tmp_path, model="resnet19")
    with pytest.raises(ConfigError, match="focal"):
        tiny_cfg(tiny_version, tmp_path, loss="focall")
    with pytest.raises(ConfigError, match="weighted"):
        tiny_cfg(tiny_version, tmp_path, sampler="balanced")
    with pytest.raises(ConfigError, match="1e-3"):
        tiny_cfg(tiny_version, tmp_path, lr_schedule="1e-3:ten")
    with pytest.raises(ConfigError, match="Unknown config key 'learning_rate'.*Valid keys:.* lr,"):
        configfile.from_dict(TrainConfig, {"learning_rate": 0.1})


@pytest.mark.slow
def test_missing_version_names_the_split_command(mlflow_store, tmp_path):
    cfg = tiny_cfg(tmp_path / "nope", tmp_path, dataset="v9", data_root=str(tmp_path))
    with pytest.raises(ConfigError, match="research split"):
        train(cfg)


@pytest.mark.slow
def test_batch_larger_than_train_set(tiny_version, mlflow_store, tmp_path):
    with pytest.raises(ConfigError, match="batch_size=100000"):
        train(tiny_cfg(tiny_version, tmp_path, batch_size=100000))


# ------------------------------------------------------------------------- transfer learning

def lite_cfg(version_dir, tmp_path, **changes) -> TrainConfig:
    """ImageNet EfficientNet-Lite0 (weights from the installed package) at 32 px, a few epochs."""
    return tiny_cfg(version_dir, tmp_path, **{"model": "efficientnet_lite0", "pretrained": True, "optimizer": "adamw",
                                             "lr": 3e-3, "loss": "ce", "sampler": "shuffle", "epochs": 3, **changes})


@pytest.mark.slow
def test_features_loader_trains_the_head_on_stored_embeddings(tiny_version, mlflow_store, tmp_path, monkeypatch):
    """loader=features: the trunk is embedded once, only the head trains, the logged model is whole
    and gives on images what the head gave on the features."""
    import json

    import torch

    from research.data.versions import load_version
    from research.inputs.decoded import split_items
    from research.serving import classifier_from_torch_dir

    monkeypatch.chdir(tmp_path)  # data/cache/ under the test's folder
    first = train(lite_cfg(tiny_version, tmp_path, loader="features", feature_views=1, batch_size=16))
    stored = sorted(p for p in (tmp_path / "data/cache/features").iterdir() if p.is_dir())
    assert len(stored) == 1 and json.loads((stored[0] / "key.json").read_text())["views"] == 1
    again = train(lite_cfg(tiny_version, tmp_path, loader="features", feature_views=1, batch_size=16, lr=1e-3))
    assert sorted(p for p in (tmp_path / "data/cache/features").iterdir() if p.is_dir()) == stored  # embedded once
    client = mlflow.MlflowClient()
    params = client.get_run(first.run_id).data.params
    assert params["loader"] == "features" and params["freeze_epochs"] == "3" and params["image_size"] == "32"
    assert params["preprocess.mean"] == "[0.5, 0.5, 0.5]" and params["preprocess.interpolation"] == "bicubic"
    assert again.test["test_f1_macro"] == client.get_run(again.run_id).data.metrics["test_f1_macro"]
    # the whole model, as served: its test predictions reproduce the run's test accuracy
    local = mlflow.artifacts.download_artifacts(f"runs:/{first.run_id}/model", dst_path=str(tmp_path / "m"))
    clf = classifier_from_torch_dir(local)
    assert clf.meta["mean"] == [0.5, 0.5, 0.5] and clf.meta["interpolation"] == "bicubic"
    paths, labels = split_items(load_version(str(tiny_version)), "test")
    frame = __import__("pandas").DataFrame({"image": [p.read_bytes() for p in paths]})
    predicted = clf.predict_frame(frame)["label"].tolist()
    accuracy = sum(p == clf.classes[y] for p, y in zip(predicted, labels)) / len(labels)
    assert accuracy == first.test["test_accuracy"]  # exactly: the logged test figure is the served one
    assert isinstance(mlflow.pytorch.load_model(f"runs:/{first.run_id}/model").trunk, torch.nn.Module)


@pytest.mark.slow
def test_freeze_epochs_hold_the_trunk_and_its_batch_norm_then_release_it(tiny_version, mlflow_store, tmp_path,
                                                                          monkeypatch):
    import torch

    import research.train as train_mod
    from research import models

    reference = models.build_model("efficientnet_lite0", 4, pretrained=True).trunk.state_dict()
    seen, built = {}, []
    build_parts = train_mod.build_parts
    monkeypatch.setattr(train_mod, "build_parts", lambda cfg: built.append(build_parts(cfg)) or built[-1])

    def snapshot(epoch, row):  # the live model of this run (not any other lite0 an earlier test left in memory)
        seen[epoch] = {k: v.clone() for k, v in built[0].model.trunk.state_dict().items()}

    train(lite_cfg(tiny_version, tmp_path, epochs=2, freeze_epochs=1, layer_decay=0.8, head_lr_scale=5.0),
          on_epoch=snapshot)
    frozen, released = seen[1], seen[2]
    for key in ("conv_stem.weight", "bn1.running_mean", "bn1.running_var", "blocks.3.0.bn1.running_mean"):
        assert torch.equal(frozen[key], reference[key]), key  # epoch 1: weights and statistics untouched
    assert not torch.equal(released["conv_stem.weight"], reference["conv_stem.weight"])
    assert not torch.equal(released["bn1.running_mean"], reference["bn1.running_mean"])


@pytest.mark.slow
def test_ema_weights_are_the_ones_evaluated_and_logged(tiny_version, mlflow_store, tmp_path):
    """With ema_decay the kept checkpoint is the EMA's (not the raw weights), and the logged model holds it."""
    import torch

    def kept_head(cfg) -> tuple[str, dict]:
        started, kept = [], {}

        def on_epoch(epoch, row):  # the local best.pt, read while the run is still in progress
            kept.update(torch.load(tmp_path / "ckpt" / started[0] / "best.pt", weights_only=True)["kept"])

        result = train(cfg, on_start=started.append, on_epoch=on_epoch)
        return result.run_id, kept

    run_id, ema = kept_head(lite_cfg(tiny_version, tmp_path, epochs=2, ema_decay=0.9, loader="features"))
    _, raw = kept_head(lite_cfg(tiny_version, tmp_path, epochs=2, loader="features"))
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["ema_decay"] == "0.9"
    assert ema.keys() == raw.keys() and not torch.equal(ema["weight"], raw["weight"])  # same seed, other weights
    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model").head.state_dict()
    assert all(torch.equal(logged[k], ema[k]) for k in ema)


def test_amp_left_unset_follows_the_hardware_and_an_explicit_one_on_emulated_bf16_warns(monkeypatch, capsys):
    import sys
    from pathlib import Path

    import torch

    from research import models
    from research import train as train_mod

    cpu = torch.device("cpu")
    if sys.platform == "linux" and Path("/proc/cpuinfo").is_file():  # oneDNN's check agrees with the CPU's flags
        flags = set(Path("/proc/cpuinfo").read_text().split())
        if flags & {"avx512_bf16", "amx_bf16"}:  # bf16 in hardware
            assert train_mod.native_bf16(cpu)
        if not flags & {"avx512bw", "avx_ne_convert", "amx_bf16"}:  # AVX2 at most: no oneDNN bf16 kernels
            assert not train_mod.native_bf16(cpu)
    model = models.build_model("resnet18", 3)
    for native in (False, True):
        monkeypatch.setattr(train_mod, "native_bf16", lambda device, native=native: native)
        assert train_mod.resolved(TrainConfig(model="resnet18"), cpu, model).amp is native
        assert train_mod.resolved(TrainConfig(model="resnet18", amp=False), cpu, model).amp is False
        capsys.readouterr()
        assert train_mod.resolved(TrainConfig(model="resnet18", amp=True), cpu, model).amp is True  # the user's call
        assert ("without native bf16" in capsys.readouterr().out) is not native  # ... said to be slow where it is
