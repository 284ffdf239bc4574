"""Leave one style out: `split --holdout-style` and `python -m research styles`, on real images in three styles."""

from __future__ import annotations

import hashlib
import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from research.config import ConfigError
from research.data.split import build_version
from research.data.versions import load_version
from research.styles import ensemble_by_style, latest_for_run, leave_one_style_out, parent_run
from tests.conftest import draw_image, tiny_cfg

STYLES = ("ink", "pastel", "mono")


@pytest.fixture(scope="module")
def styled_version(tmp_path_factory):
    """3 classes x 3 styles x 5 drawings; each drawing its own group (as the embedded dataset's style:emoji)."""
    root = tmp_path_factory.mktemp("styled")
    rng = np.random.default_rng(0)
    rows = []
    for cls, kind in (("circles", "circle"), ("squares", "square"), ("stripes", "stripe")):
        (root / "src" / cls).mkdir(parents=True)
        for style in STYLES:
            for i in range(5):
                img = draw_image(kind, 40, rng)
                if style == "mono":
                    img = img.convert("L").convert("RGB")
                elif style == "pastel":
                    img = img.point(lambda v: 128 + v // 2)
                rel = f"{cls}/{style}_{i}.png"
                img.save(root / "src" / rel)
                rows.append({"path": rel, "class": cls, "style": style, "group": f"{style}:{cls}:{i}",
                             "sha256": hashlib.sha256((root / "src" / rel).read_bytes()).hexdigest()})
    clean = root / "clean"
    clean.mkdir()
    pd.DataFrame(rows).to_csv(clean / "manifest.csv", index=False)
    (clean / "clean.json").write_text(json.dumps({"source": str((root / "src").resolve()), "method": "none"}))
    return build_version(clean, "sv", recipe="v1", out_root=root / "versions", progress=False)


def test_a_held_out_style_is_the_whole_test_split_and_nowhere_else(styled_version):
    base = load_version(styled_version)
    from research.config import from_dict
    from research.data.split import Recipe

    recipe = from_dict(Recipe, {**base.info["recipe"], "holdout_style": "mono"})
    out = build_version(base.info["source"], "sv-no-mono", recipe, out_root=styled_version.parent, progress=False)
    v = load_version(out)
    frame = v.manifest
    assert set(frame.loc[frame["split"] == "test", "style"]) == {"mono"}
    assert (frame["style"] == "mono").sum() == (frame["split"] == "test").sum() == 15  # every mono drawing
    assert set(frame.loc[frame["split"] != "test", "style"]) == {"ink", "pastel"}
    assert v.info["recipe"]["holdout_style"] == "mono" and v.digest != base.digest  # the digest says so
    with pytest.raises(ConfigError, match="holdout_style='crayon' is not a style.*ink, mono, pastel"):
        build_version(base.info["source"], "sv-no-crayon", from_dict(Recipe, {"holdout_style": "crayon"}),
                      out_root=styled_version.parent, progress=False)


def test_a_val_style_is_the_whole_val_split_and_training_sees_only_the_rest(styled_version):
    base = load_version(styled_version)
    from research.config import from_dict
    from research.data.split import Recipe

    recipe = from_dict(Recipe, {**base.info["recipe"], "holdout_style": "mono", "val_style": "pastel"})
    v = load_version(build_version(base.info["source"], "sv-no-mono-val-pastel", recipe,
                                   out_root=styled_version.parent, progress=False))
    frame = v.manifest
    assert {s: set(frame.loc[frame["split"] == s, "style"]) for s in ("train", "val", "test")} == {
        "train": {"ink"}, "val": {"pastel"}, "test": {"mono"}}
    assert (frame["split"] == "val").sum() == 15 and (frame["split"] == "train").sum() == 15
    plain = load_version(build_version(base.info["source"], "sv-no-mono-2", from_dict(
        Recipe, {**base.info["recipe"], "holdout_style": "mono"}), out_root=styled_version.parent, progress=False))
    assert v.digest != plain.digest
    for bad, match in (({"val_style": "pastel"}, "needs a different holdout_style"),
                       ({"holdout_style": "mono", "val_style": "mono"}, "needs a different holdout_style"),
                       ({"holdout_style": "mono", "val_style": "crayon"}, "val_style='crayon' is not a style")):
        with pytest.raises(ConfigError, match=match):
            build_version(base.info["source"], "sv-bad", from_dict(Recipe, bad), out_root=styled_version.parent,
                          progress=False)


def test_styles_trains_once_per_held_out_style_under_one_parent(styled_version, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(styled_version, tmp_path, epochs=1)
    out = leave_one_style_out(cfg, mixed_test_f1=0.5, source="test")
    assert [r["style"] for r in out["rows"]] == sorted(STYLES)
    client = mlflow.MlflowClient()
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["holdout_style"] for c in children) == sorted(STYLES)
    for c in children:  # each child tested on its held-out style: the logged figure is the parent's per-style one
        style = c.data.tags["holdout_style"]
        assert c.data.params["dataset_version"] == f"sv-no-{style}"
        assert parent.data.metrics[f"heldout_{style}_f1_macro"] == c.data.metrics["test_f1_macro"]
    mean = np.mean([parent.data.metrics[f"heldout_{s}_f1_macro"] for s in STYLES])
    assert parent.data.metrics["heldout_mean_f1_macro"] == pytest.approx(mean)
    assert parent.data.metrics["mixed_test_f1_macro"] == 0.5
    again = leave_one_style_out(cfg, styles=["ink"], source="run abc")  # the versions are reused, not rebuilt
    assert [r["style"] for r in again["rows"]] == ["ink"]
    latest = latest_for_run("abc")  # what `report` shows beside a champion (run abc) and its mixed-style test
    assert latest["parent_run_id"] == again["parent_run_id"] and latest["dataset_version"] == "sv"
    assert latest["rows"] == [{"style": "ink", "val_f1_macro": again["rows"][0]["val_f1_macro"],
                               "heldout_f1_macro": again["rows"][0]["heldout_f1_macro"]}]
    assert latest["mean_heldout_f1_macro"] == again["mean_heldout_f1_macro"]
    assert latest_for_run("other") is None


def test_an_ensemble_by_style_averages_the_runs_each_recipe_trained_without_that_style(styled_version, mlflow_store,
                                                                                       tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfgs = [tiny_cfg(styled_version, tmp_path, epochs=1), tiny_cfg(styled_version, tmp_path, epochs=1, seed=1)]
    outs = [leave_one_style_out(cfg, styles=["ink", "mono"], source=f"recipe {i}") for i, cfg in enumerate(cfgs)]
    ens = ensemble_by_style(outs)
    client = mlflow.MlflowClient()
    parent = client.get_run(ens["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["styles_source"] == "ensemble of recipe 0; recipe 1"
    assert [r["style"] for r in ens["rows"]] == ["ink", "mono"]
    for i, row in enumerate(ens["rows"]):
        run = client.get_run(row["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["holdout_style"] == row["style"]
        # its members: each recipe's run without that style, tested on that style's drawings as the ensemble is
        assert run.data.tags["ensemble_of"] == ",".join(o["rows"][i]["run_id"] for o in outs)
        assert run.data.params["dataset_version"] == f"sv-no-{row['style']}"
        assert parent.data.metrics[f"heldout_{row['style']}_f1_macro"] == run.data.metrics["test_f1_macro"]
    assert parent.data.metrics["heldout_mean_f1_macro"] == pytest.approx(np.mean([r["heldout_f1_macro"]
                                                                                 for r in ens["rows"]]))
    with pytest.raises(ConfigError, match="same styles"):
        ensemble_by_style([outs[0], leave_one_style_out(cfgs[0], styles=["ink"])])


def test_a_call_that_stops_half_way_never_reads_as_a_result(mlflow_store):
    client = mlflow.MlflowClient()
    for exc, status in ((RuntimeError("a child failed"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(exc)), parent_run("styles", "run abc", {"styles": "ink"}, "styles") as parent_id:
            raise exc
        assert client.get_run(parent_id).info.status == status
    assert latest_for_run("abc") is None  # report shows no half-done call beside a champion
    with parent_run("styles", "run abc", {"styles": ""}, "styles") as parent_id:
        pass
    assert latest_for_run("abc")["parent_run_id"] == parent_id


def test_the_cli_refuses_an_ensemble_of_one_recipe_before_training(mlflow_store, capsys):
    from research.cli import main

    assert main(["styles", "--spec", "sweeps/demo.yaml", "--ensemble"]) == 2
    assert "pass two or more --run RUN_ID" in capsys.readouterr().err
