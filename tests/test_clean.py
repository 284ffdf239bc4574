"""clean: finds the photos in a small mixed tree, leaves the source byte-identical, logs to MLflow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from research.data.clean import clean
from research.errors import ConfigError

SPEC = {"cat": ("circle", 14), "dog": ("square", 12), "cat_photo": ("photo", 3), "dog_photo": ("photo", 3)}


def _mixed_tree(make_tree) -> Path:
    """Two classes of flat drawings with a few noisy 'photos' mixed into each, plus labels.csv."""
    root = make_tree({k: v for k, v in SPEC.items()}, size=40)
    rows = []
    for folder, cls in (("cat_photo", "cat"), ("dog_photo", "dog")):  # move photos into the classes
        for p in sorted((root / folder).iterdir()):
            p.rename(root / cls / p.name)
        (root / folder).rmdir()
    for p in sorted(root.rglob("*.png")):
        rel = p.relative_to(root).as_posix()
        rows.append({"path": rel, "class": p.parent.name, "is_photo": int("photo" in p.name)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # unreadable
    return root


def _tree_hashes(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method,features", [("agglomerative", "photo"), ("gmm", "photo"), ("score", "photo")])
def test_method_finds_the_photos(make_tree, tmp_path, method, features):
    root = _mixed_tree(make_tree)
    info = clean(root, method=method, features=features, out=tmp_path / "out", log=False, progress=False, workers=1)
    quarantine = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    photos = pd.read_csv(root / "labels.csv").query("is_photo == 1")["path"]
    assert sorted(quarantine["path"]) == sorted(str(p) for p in photos)
    assert info["metrics"]["f1"] == 1.0 and info["metrics"]["drawings_lost"] == 0
    assert set(quarantine.columns) >= {"path", "class", "cluster", "score", "reason"}


@pytest.mark.slow
def test_auto_cleans_logs_and_leaves_source_untouched(make_tree, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    root = _mixed_tree(make_tree)
    before = _tree_hashes(root)
    out = tmp_path / "clean"
    info = clean(root, method="auto", out=out, progress=False, workers=1)
    assert _tree_hashes(root) == before  # nothing written, moved or deleted in the source

    manifest = pd.read_csv(out / "manifest.csv")
    quarantine = pd.read_csv(out / "quarantine.csv")
    unreadable = pd.read_csv(out / "unreadable.csv")
    assert set(manifest.columns) >= {"path", "class", "sha256", "width", "height", "is_photo"}
    assert manifest["is_photo"].eq(0).all() and len(quarantine) == 6 and len(manifest) == 26
    assert unreadable["path"].tolist() == ["dog/broken.png"]  # reported, not fatal
    meta = json.loads((out / "clean.json").read_text())
    assert meta["source"] == str(root.resolve()) and meta["inventory_digest"] and meta["method"] != "auto"
    assert {r["method"] for r in meta["table"]} >= {"dbscan", "agglomerative", "gmm", "score"}
    assert meta["metrics"]["f1"] == 1.0

    client = MlflowClient()
    run = client.get_run(info["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "cleansing"
    assert run.data.params["inventory_digest"] == meta["inventory_digest"]
    assert run.data.metrics["f1"] == 1.0 and run.data.metrics["n_unreadable"] == 1
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.csv", "quarantine.csv", "clean.json", "unreadable.csv", "dendrogram.png"} <= logged or \
        {"manifest.csv", "quarantine.csv", "clean.json", "unreadable.csv", "score_hist.png"} <= logged
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == len(meta["table"])
    assert all("f1" in c.data.metrics and "drawings_lost" in c.data.metrics for c in children)


def test_bad_input_names_the_fix(tmp_path, make_tree):
    with pytest.raises(ConfigError, match="not a folder"):
        clean(tmp_path / "missing", log=False, progress=False)
    root = make_tree({"a": ("circle", 3)})
    with pytest.raises(ConfigError, match="inside the source"):
        clean(root, out=root / "clean", log=False, progress=False)
