"""Pick a run, promote it, load it by alias / stage / version: real trained runs in a private store.

Two real training runs (resnet18, 32 px, on the session's tiny dataset version) are shared by
the module (the `store` fixture, tests/conftest.py): `good` (2 epochs at lr 1e-3) and `weak` (1 epoch at a
learning rate too small to learn). Each test registers under its own model name, so tests do not see each
other's aliases.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from research.cli import main
from research.errors import ConfigError
from research.registry import CHAMPION, PREVIOUS, PromotionRefused, promote
from research.runquery import pick_run
from tests.conftest import EXPERIMENT, Store, tiny_cfg
from tests.test_serving import free_port


def metric(run_id: str, key: str) -> float:
    return mlflow.MlflowClient().get_run(run_id).data.metrics[key]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def split_images(version: Path) -> tuple[list[Path], list[str]]:
    """The version's test split in the loaders' order (decoded.split_items) and the true classes."""
    from research.data.versions import load_version
    from research.inputs.decoded import split_items

    v = load_version(version)
    paths, labels = split_items(v, "test")
    return paths, [v.classes[i] for i in labels]


def training_probabilities(store: Store, run_id: str) -> np.ndarray:
    """Calibrated softmax of the run's torch model on the trainer's own test batches (training's decode and
    normalisation).

    The loaders get the preprocessing the run trained with (its model_meta.json): the architecture's own.
    """
    from research.data.versions import load_version
    from research.inputs.loaders import build_loaders
    from research.models import Preprocessing

    meta = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model_meta.json")).read_text())
    prep = Preprocessing(meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]), meta["interpolation"])
    cfg = tiny_cfg(store.version, store.workdir, loader="cached")
    loaders = build_loaders(load_version(store.version), cfg, torch.device("cpu"),
                            cache_root=store.workdir / "data/cache", prep=prep)
    module = mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()
    t = meta["temperature"]  # fitted on val by the run; the served probabilities are softmax(logits / t)
    with torch.no_grad():
        return np.concatenate([torch.softmax(module(x) / t, 1).numpy() for x, _ in loaders.test])


# ------------------------------------------------------------------------------ promote + load

@pytest.mark.slow
def test_promote_then_load_by_alias_stage_and_version_matches_training(store):
    name = "clf-load"
    p = promote(run_id=store.good, name=name)
    assert (p.version, p.previous_version, p.already_champion) == ("1", None, False)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(name, CHAMPION)
    run = client.get_run(store.good)
    assert str(version.version) == "1" and version.current_stage == "Production"
    assert version.tags["source_run_id"] == store.good
    assert version.tags["dataset_version"] == "tiny"  # the version's name, also when trained from its path
    assert version.tags["dataset_digest"] == run.data.params["dataset_digest"]
    assert float(version.tags["test_f1_macro"]) == pytest.approx(run.data.metrics["test_f1_macro"], abs=1e-6)
    assert version.tags["torch_model_uri"] == f"runs:/{store.good}/model"
    assert run.info.status == "FINISHED"  # logging the pyfunc into the run left it as training did

    paths, truth = split_images(store.version)
    frame = pd.DataFrame({"image": [b64(p) for p in paths]})
    expected = training_probabilities(store, store.good)
    classes = json.loads((store.version / "version.json").read_text())["classes"]
    prob_cols = [f"p_{c}" for c in classes]
    for uri in (f"models:/{name}@champion", f"models:/{name}/Production", f"models:/{name}/1"):
        out = mlflow.pyfunc.load_model(uri).predict(frame)
        assert list(out.columns) == ["label", "probability", *prob_cols, "error"], uri
        np.testing.assert_allclose(out[prob_cols].to_numpy(), expected, atol=1e-5, err_msg=uri)
        assert list(out["label"]) == [classes[i] for i in expected.argmax(1)]
        assert (out["error"] == "").all()
    accuracy = float(np.mean(np.array(out["label"]) == np.array(truth)))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)

    torch_module = mlflow.pytorch.load_model(version.tags["torch_model_uri"])  # still loadable to fine-tune
    assert isinstance(torch_module, torch.nn.Module)
    torch_module.train()
    assert sum(p.requires_grad for p in torch_module.parameters()) > 0


def test_a_trained_run_logs_the_val_figures_of_the_epoch_whose_weights_it_kept(store):
    """selected_<metric>: what promote ranks and gates on, whichever val metric (tests/test_honest_numbers.py)."""
    client = mlflow.MlflowClient()
    for run_id in (store.good, store.weak):
        run = client.get_run(run_id)
        f1 = {m.step: m.value for m in client.get_metric_history(run_id, "val_f1_macro")}
        chosen = int(run.data.metrics["best_epoch"])
        assert chosen == min(e for e, v in f1.items() if v == max(f1.values()))  # the first epoch at the best F1
        for key in ("val_loss", "val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro"):
            at = [m.value for m in client.get_metric_history(run_id, key) if m.step == chosen]
            assert run.data.metrics[f"selected_{key}"] == at[-1], key


def by_val(store) -> tuple[str, str]:
    """(worse, better) of the module's two runs by best-epoch val macro F1, read from MLflow: what promote ranks by
    (on this tiny set the run that tests better may validate worse: the gate must not care)."""
    client = mlflow.MlflowClient()
    best = {rid: max(m.value for m in client.get_metric_history(rid, "val_f1_macro"))
            for rid in (store.good, store.weak)}
    assert best[store.good] != best[store.weak]
    return tuple(sorted(best, key=best.get))


def test_promotion_moves_aliases_refuses_worse_and_is_idempotent(store, capsys):
    name = "clf-aliases"
    worse, better = by_val(store)
    client = mlflow.MlflowClient()

    first = promote(run_id=worse, name=name)
    assert first.version == "1"
    again = promote(run_id=worse, name=name)
    assert again.already_champion and again.version == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1  # nothing new registered

    second = promote(run_id=better, name=name)
    assert (second.version, second.previous_version) == ("2", "1")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == "1"
    assert client.get_model_version(name, "1").current_stage == "Archived"
    assert client.get_model_version(name, "2").current_stage == "Production"

    with pytest.raises(PromotionRefused, match="not better than the champion's.*--force"):
        promote(run_id=worse, name=name)
    capsys.readouterr()
    assert main(["promote", "--run", worse, "--name", name]) == 2
    assert "--force" in capsys.readouterr().err
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"

    forced = promote(run_id=worse, name=name, force=True)
    assert forced.version == "1" and forced.reused_version  # the run's existing version, not a copy
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == "2"

    capsys.readouterr()
    assert main(["promote", "--run", worse, "--name", name]) == 0
    assert "already the champion" in capsys.readouterr().out


def test_pick_best_run_by_best_val_f1_with_model_filter(store):
    client = mlflow.MlflowClient()
    best = {rid: max(m.value for m in client.get_metric_history(rid, "val_f1_macro"))
            for rid in (store.good, store.weak)}
    cand = pick_run(client, experiment=EXPERIMENT, model_filter="resnet18")
    assert cand.run_id == max(best, key=best.get) and cand.score == pytest.approx(max(best.values()))
    assert pick_run(client).run_id == cand.run_id  # the default: any architecture
    assert pick_run(client, model_filter="any").run_id == cand.run_id
    with pytest.raises(ConfigError, match="No FINISHED run.*model='vgg16_v2'.*--model vgg16_v2.*drop --model-filter"):
        pick_run(client, model_filter="vgg16_v2")  # the seed's choice, on request: no vgg16_v2 here
    with pytest.raises(ConfigError, match="No MLflow experiment named 'nope'"):
        pick_run(client, experiment="nope")
    assert main(["promote", "--experiment", EXPERIMENT, "--name", "clf-cli"]) == 0
    assert client.get_model_version_by_alias("clf-cli", CHAMPION).tags["source_run_id"] == cand.run_id
    # --study: only that study's trials (the tag a sweep puts on its child runs)
    worse = store.weak if cand.run_id == store.good else store.good
    client.set_tag(worse, "optuna_study", "pick-study")
    assert pick_run(client, study="pick-study", model_filter="resnet18").run_id == worse
    with pytest.raises(ConfigError, match="study='other'"):
        pick_run(client, study="other", model_filter="resnet18")


def test_promote_fails_fast_when_the_tracking_server_is_down(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on any more
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert main(["promote"]) == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and uri in err and time.monotonic() - start < 30
    assert list(tmp_path.iterdir()) == []  # no mlruns/ left behind
