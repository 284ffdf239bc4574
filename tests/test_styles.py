"""Leave one style out: `split --holdout-style` and `python -m research styles`, on real images in three styles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest

from research.data.split import build_version
from research.data.versions import load_version
from research.errors import ConfigError
from research.styles import ensemble_by_style, latest_for_run, leave_one_style_out, parent_run
from tests.conftest import draw_image, private_store, tiny_cfg

STYLES = ("ink", "pastel", "mono")
COPIED = "circles/pastel_0.png"  # the pastel rendering of circles/ink_0.png's drawing: a near-copy across styles


def styled_clean(root: Path) -> Path:
    """A clean dir: 3 classes x 3 styles x 5 drawings, each drawing its own group (as the embedded dataset's
    style:emoji), all drawn independently but one: COPIED is ink_0's drawing in pastel (as two artists' renderings
    of one emoji can be nearly alike), which only the perceptual hash joins to it."""
    rng = np.random.default_rng(0)
    rows = []
    for cls, kind in (("circles", "circle"), ("squares", "square"), ("stripes", "stripe")):
        (root / "src" / cls).mkdir(parents=True)
        drawn = {}
        for style in STYLES:
            for i in range(5):
                rel = f"{cls}/{style}_{i}.png"
                img = drawn[i] if rel == COPIED else draw_image(kind, 40, rng)
                drawn.setdefault(i, img)
                if style == "mono":
                    img = img.convert("L").convert("RGB")
                elif style == "pastel":
                    img = img.point(lambda v: 128 + v // 2)
                img.save(root / "src" / rel)
                rows.append({"path": rel, "class": cls, "style": style, "group": f"{style}:{cls}:{i}",
                             "sha256": hashlib.sha256((root / "src" / rel).read_bytes()).hexdigest()})
    clean = root / "clean"
    clean.mkdir()
    pd.DataFrame(rows).to_csv(clean / "manifest.csv", index=False)
    (clean / "clean.json").write_text(json.dumps({"source": str((root / "src").resolve()), "method": "none"}))
    return clean


@pytest.fixture(scope="module")
def styled_version(tmp_path_factory):
    root = tmp_path_factory.mktemp("styled")
    return build_version(styled_clean(root), "sv", recipe="v1", out_root=root / "versions", progress=False)


def test_a_held_out_style_is_the_whole_test_split_and_nowhere_else(styled_version):
    base = load_version(styled_version)
    from research.configfile import from_dict
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
    from research.configfile import from_dict
    from research.data.split import Recipe

    recipe = from_dict(Recipe, {**base.info["recipe"], "holdout_style": "mono", "val_style": "pastel"})
    v = load_version(build_version(base.info["source"], "sv-no-mono-val-pastel", recipe,
                                   out_root=styled_version.parent, progress=False))
    frame = v.manifest
    assert {s: set(frame.loc[frame["split"] == s, "style"]) for s in ("train", "val", "test")} == {
        "train": {"ink"}, "val": {"pastel"}, "test": {"mono"}}
    # ink_0 of circles is left out of training: its pastel near-copy is in val
    assert (frame["split"] == "val").sum() == 15 and (frame["split"] == "train").sum() == 14
    assert not any(p.endswith("/circles/ink_0.png") for p in frame["source_path"])
    plain = load_version(build_version(base.info["source"], "sv-no-mono-2", from_dict(
        Recipe, {**base.info["recipe"], "holdout_style": "mono"}), out_root=styled_version.parent, progress=False))
    assert v.digest != plain.digest
    for bad, match in (({"val_style": "pastel"}, "needs a different holdout_style"),
                       ({"holdout_style": "mono", "val_style": "mono"}, "needs a different holdout_style"),
                       ({"holdout_style": "mono", "val_style": "crayon"}, "val_style='crayon' is not a style")):
        with pytest.raises(ConfigError, match=match):
            build_version(base.info["source"], "sv-bad", from_dict(Recipe, bad), out_root=styled_version.parent,
                          progress=False)


def sources(version) -> set[str]:
    """The clean tree's files a version holds (`class/file.png`)."""
    return {"/".join(p.split("/")[-2:]) for p in version.manifest["source_path"]}


def test_a_drawing_copied_into_another_style_is_left_out_when_either_style_is_held_out(styled_version):
    """Holding ink out, COPIED (pastel, ink_0's drawing) would put a test drawing into training: it goes, and so
    does ink_0 when pastel is held out; no other drawing is left out, and no image kept outside test is a
    perceptual near-match of a test image."""
    from research.configfile import from_dict
    from research.data.split import Recipe, hash_file, near_matches

    base = load_version(styled_version)
    every = sources(base)
    assert {COPIED, "circles/ink_0.png"} <= every and len(every) == 45
    assert base.manifest.set_index("path")["group"].nunique() == 44  # the base version merged the two
    for held, copy in (("ink", COPIED), ("pastel", "circles/ink_0.png"), ("mono", None)):
        recipe = from_dict(Recipe, {**base.info["recipe"], "holdout_style": held})
        v = load_version(build_version(base.info["source"], f"sv-no-{held}-copies", recipe,
                                       out_root=styled_version.parent, progress=False))
        assert every - sources(v) == ({copy} if copy else set()), held
        frame = v.manifest
        hashes = np.stack([hash_file(v.dir / p)[1] for p in frame["path"]])
        test = (frame["split"] == "test").to_numpy()
        assert not list(near_matches(hashes[~test], hashes[test, 0], base.info["recipe"]["phash_threshold"]))


def test_styles_reuses_a_held_out_version_only_when_split_from_the_same_clean_data(tmp_path):
    """`<base>-no-<style>` is reused when recipe, seed and source digest match; after a re-clean (one image more
    quarantined) the stale base is refused, and once the base is rebuilt, so is the stale held-out version."""
    from research.styles import holdout_version

    clean = styled_clean(tmp_path)
    base = load_version(build_version(clean, "sv", recipe="v1", out_root=tmp_path / "versions", progress=False))
    first = holdout_version(base, "mono")
    stamp = (first.dir / "version.json").stat().st_mtime_ns
    again = holdout_version(base, "mono")
    assert again.digest == first.digest and (again.dir / "version.json").stat().st_mtime_ns == stamp  # reused

    manifest = pd.read_csv(clean / "manifest.csv")
    manifest[manifest["path"] != "squares/ink_4.png"].to_csv(clean / "manifest.csv", index=False)  # a re-clean
    with pytest.raises(ConfigError, match=r"changed since sv was split.*rebuild sv first"):
        holdout_version(base, "mono")
    base = load_version(build_version(clean, "sv", recipe="v1", out_root=tmp_path / "versions", force=True,
                                      progress=False))
    with pytest.raises(ConfigError, match=r"sv-no-mono exists but was not split from sv's clean data"):
        holdout_version(base, "mono")  # same recipe and seed: only the source digest tells it is stale
    assert (first.dir / "version.json").stat().st_mtime_ns == stamp  # refused, never silently rebuilt


@pytest.fixture(scope="module")
def left_out(styled_version, tmp_path_factory) -> SimpleNamespace:
    """The trainings of the two tests below, once, in a store of the module: one recipe left one style out on every
    style (`every`), then again on ink alone as `run abc`'s (`again`: the versions are reused); a second recipe
    (seed 1) on ink and mono (`other`)."""
    root = tmp_path_factory.mktemp("left-out")
    with pytest.MonkeyPatch.context() as mp:
        private_store(mp, root)
        cfg = tiny_cfg(styled_version, root, epochs=1)
        every = leave_one_style_out(cfg, mixed_test_f1=0.5, source="test")
        again = leave_one_style_out(cfg, styles=["ink"], source="run abc")
        other = leave_one_style_out(dataclasses.replace(cfg, seed=1), styles=["ink", "mono"], source="recipe 1")
    return SimpleNamespace(root=root, every=every, again=again, other=other)


@pytest.fixture
def in_left_out(left_out, monkeypatch) -> SimpleNamespace:
    """`left_out`'s store as the current one, for one test."""
    private_store(monkeypatch, left_out.root)
    return left_out


@pytest.mark.slow
def test_styles_trains_once_per_held_out_style_under_one_parent(in_left_out):
    out, again = in_left_out.every, in_left_out.again
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
    assert [r["style"] for r in again["rows"]] == ["ink"] and again["rows"][0]["version"] == "sv-no-ink"
    latest = latest_for_run("abc")  # what `report` shows beside a champion (run abc) and its mixed-style test
    assert latest["parent_run_id"] == again["parent_run_id"] and latest["dataset_version"] == "sv"
    assert latest["rows"] == [{"style": "ink", "val_f1_macro": again["rows"][0]["val_f1_macro"],
                               "heldout_f1_macro": again["rows"][0]["heldout_f1_macro"], "members": "ink"}]
    assert latest["mean_heldout_f1_macro"] == again["mean_heldout_f1_macro"]
    assert latest_for_run("other") is None


@pytest.mark.slow
def test_an_ensemble_by_style_averages_the_runs_each_recipe_trained_without_that_style(in_left_out):
    every = in_left_out.every  # the first recipe's runs without ink and without mono
    first = every | {"rows": [r for r in every["rows"] if r["style"] in ("ink", "mono")], "source": "recipe 0"}
    outs = [first, in_left_out.other]
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
        ensemble_by_style([first, in_left_out.again])


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_cli_refuses_an_ensemble_of_one_recipe_before_training(mlflow_store, capsys):
    from research.cli import main

    assert main(["styles", "--spec", "sweeps/demo.yaml", "--ensemble"]) == 2
    assert "pass two or more --run RUN_ID" in capsys.readouterr().err


def test_a_style_family_is_held_out_whole(tmp_path):
    """Two renderings of one design (a family: the embedded dataset's Fluent flat and high contrast) share each
    drawing's group: held out together, or one of them alone is refused; the other families train and validate."""
    from research.data.split import families_of

    rng = np.random.default_rng(1)
    rows = []
    for cls, kind in (("circles", "circle"), ("squares", "square"), ("stripes", "stripe")):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(4):
            drawing = draw_image(kind, 40, rng)
            for style, family, img in (("ink", "ink", draw_image(kind, 40, rng)),
                                       ("pastel", "pastel", draw_image(kind, 40, rng)),
                                       ("flat", "duo", drawing), ("line", "duo", drawing.convert("L").convert("RGB"))):
                rel = f"{cls}/{style}_{i}.png"
                img.save(tmp_path / "src" / rel)
                rows.append({"path": rel, "class": cls, "style": style, "family": family,
                             "group": f"{family}:{cls}:{i}",
                             "sha256": hashlib.sha256((tmp_path / "src" / rel).read_bytes()).hexdigest()})
    clean = tmp_path / "clean"
    clean.mkdir()
    frame = pd.DataFrame(rows)
    frame.to_csv(clean / "manifest.csv", index=False)
    (clean / "clean.json").write_text(json.dumps({"source": str((tmp_path / "src").resolve()), "method": "none"}))
    assert families_of(frame) == {"duo": ["flat", "line"], "ink": ["ink"], "pastel": ["pastel"]}

    mixed = load_version(build_version(clean, "mixed", recipe="v1", out_root=tmp_path / "v", progress=False))
    twins = mixed.manifest[mixed.manifest["family"] == "duo"].groupby("group")["split"].nunique()
    assert (twins == 1).all()  # a drawing and its re-colouring never straddle splits
    assert mixed.info["style_families"] == {"duo": ["flat", "line"], "ink": ["ink"], "pastel": ["pastel"]}

    from research.configfile import from_dict
    from research.data.split import Recipe

    recipe = from_dict(Recipe, {**mixed.info["recipe"], "holdout_style": "duo"})
    held = load_version(build_version(clean, "no-duo", recipe, out_root=tmp_path / "v", progress=False)).manifest
    assert set(held.loc[held["split"] == "test", "style"]) == {"flat", "line"} and (held["split"] == "test").sum() == 24
    assert set(held.loc[held["split"] != "test", "family"]) == {"ink", "pastel"}
    with pytest.raises(ConfigError, match="one rendering of the style family 'duo'.*--holdout-style duo"):
        build_version(clean, "no-line", from_dict(Recipe, {**mixed.info["recipe"], "holdout_style": "line"}),
                      out_root=tmp_path / "v", progress=False)
