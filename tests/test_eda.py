"""eda: the plots exist and are valid PNGs, summary.json is right, the MLflow run holds them all."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from research.eda import run_eda


@pytest.mark.slow
def test_eda_writes_plots_summary_and_logs(make_tree, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    root = make_tree({"big-class-with-a-long-name": ("circle", 12), "small": ("square", 3), "photos": ("photo", 4)})
    (root / "small" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out, summary = run_eda(root, out=tmp_path / "eda", workers=1, progress=False)

    for name in ("class_counts.png", "samples.png", "sizes.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    saved = json.loads((out / "summary.json").read_text())
    assert saved["class_counts"] == {"big-class-with-a-long-name": 12, "photos": 4, "small": 3}
    assert saved["imbalance_ratio"] == 4.0 and saved["n_images"] == 19 and saved["n_classes"] == 3
    assert saved["n_unreadable"] == 1 and saved["unreadable"][0]["path"] == "small/broken.jpg"
    assert saved["width_quantiles"]["q50"] == 48
    assert (out / "formats.csv").read_text().splitlines()[1].startswith("PNG,RGB,19")

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "eda"
    assert run.data.params["inventory_digest"] == saved["inventory_digest"]
    assert run.data.params["data_dir"] == str(root.resolve())
    assert run.data.metrics["imbalance_ratio"] == 4.0 and run.data.metrics["n_images"] == 19
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert logged >= {"class_counts.png", "samples.png", "sizes.png", "formats.csv", "summary.json"}


def test_eda_cli_without_mlflow(make_tree, tmp_path, capsys):
    from research.cli import main

    root = make_tree({"a": ("circle", 2), "b": ("square", 2)})
    assert main(["eda", str(root), "--out", str(tmp_path / "o"), "--no-log", "--workers", "1"]) == 0
    assert "PNG" in capsys.readouterr().out
    assert main(["eda", str(tmp_path / "nope"), "--no-log"]) == 2
