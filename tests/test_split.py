"""Split stage: recipe counts, group integrity, digest determinism, the leakage guard, small classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from research.data.offline_augment import OfflineAugment, augment_image
from research.data.split import LeakageError, Recipe, build_version, check_leakage, load_recipe, shipped_recipes
from research.data.versions import load_version, mlflow_dataset
from research.errors import ConfigError

# class -> number of drawings; each drawing is two files (a re-render) in one group
CLASSES = {"ant": 20, "bee": 10, "cat": 6, "dog": 4}


def drawing(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A flat-colour 'drawing': a few random ellipses/rectangles on white (distinct ones hash far apart)."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 6)):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        box = [int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))]
        colour = tuple(int(c) for c in rng.integers(0, 230, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def write_clean_dir(root: Path, clean: Path, rows: list[dict]) -> Path:
    """A hand-written clean dir (manifest.csv + clean.json) for the files under `root`."""
    import hashlib

    for row in rows:
        row["sha256"] = hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()
    clean.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(clean / "manifest.csv", index=False)
    (clean / "clean.json").write_text(json.dumps({"source": str(root), "method": "test"}))
    return clean


@pytest.fixture
def clean_dir(tmp_path) -> Path:
    """Imbalanced classes of drawings; each drawing saved as a 32 px PNG and a 36 px RGBA re-render."""
    rng = np.random.default_rng(1)
    root = tmp_path / "src"
    rows = []
    for cls, n in CLASSES.items():
        (root / cls).mkdir(parents=True)
        for k in range(n):
            img, group = drawing(rng), f"{cls}-{k}"
            img.save(root / cls / f"{k:02d}.png")
            img.resize((36, 36)).convert("RGBA").save(root / cls / f"{k:02d}_big.png")
            for name in (f"{k:02d}.png", f"{k:02d}_big.png"):
                rows.append({"path": f"{cls}/{name}", "class": cls, "group": group, "emoji": f"{cls}-e{k % 3}",
                             "is_photo": 0})
    return write_clean_dir(root, tmp_path / "clean", rows)


def build(clean_dir, name, recipe=None, seed=0, **kw):
    out = clean_dir.parent / "versions"
    return build_version(clean_dir, name, recipe, seed=seed, out_root=out, progress=False, **kw)


def train_counts(version, kind="all"):
    df = version.split_frame("train")
    if kind == "original":
        df = df[df["augmented_from"] == ""]
    return df.groupby("class").size().to_dict()


def test_recipes_counts_follow_their_rules(clean_dir):
    """Every shipped recipe builds; caps/floors are in multiples of the plain split's median."""
    assert shipped_recipes() == ["v1", "v2", "v3", "v4", "v5"]
    versions = {v: load_version(build(clean_dir, v)) for v in shipped_recipes()}
    v1 = versions["v1"]
    assert v1.manifest["augmented_from"].eq("").all()
    base = train_counts(v1)
    median = float(np.median(list(base.values())))
    for name, version in versions.items():
        recipe = load_recipe(name)
        counts, originals = train_counts(version), train_counts(version, "original")
        info = version.info
        assert info["counts"]["train"] == {c: counts[c] for c in version.classes}
        if name == "v5":  # its own ratios: more training data, a non-empty val/test per class
            assert sum(counts.values()) > sum(base.values())
            assert all(n > 0 for s in ("val", "test") for n in info["counts"][s].values())
            continue
        for split in ("val", "test"):  # balancing touches the training split only
            assert info["counts"][split] == v1.info["counts"][split], (name, split)
        cap = recipe.balance.cap and round(recipe.balance.cap * median)
        floor = recipe.balance.floor and round(recipe.balance.floor * median)
        for cls, n in base.items():
            expected = n
            if cap and n > cap:
                expected = cap
            elif floor and n < floor:
                expected = min(floor, n * (1 + recipe.balance.max_augment_per_image))
            assert counts[cls] == expected, (name, cls, n, counts[cls])
            assert originals[cls] == min(n, cap or n)
    assert max(train_counts(versions["v4"]).values()) < max(train_counts(versions["v3"]).values())


def test_groups_never_straddle_splits_and_augmented_copies_follow_their_parent(clean_dir):
    version = load_version(build(clean_dir, "v3"))
    df = version.manifest
    assert (df.groupby("group")["split"].nunique() == 1).all()
    aug = df[df["augmented_from"] != ""]
    assert len(aug) > 0 and (aug["split"] == "train").all()
    parents = df.set_index("path").loc[aug["augmented_from"]]
    assert (parents["group"].to_numpy() == aug["group"].to_numpy()).all()
    for split in ("train", "val", "test"):  # ImageFolder layout, every listed file present
        assert sorted(p.name for p in (version.dir / split).iterdir()) == version.classes
    assert all((version.dir / p).is_file() for p in df["path"])
    with Image.open(version.dir / df["path"].iloc[0]) as im:  # RGBA sources were flattened to RGB
        assert im.mode == "RGB"
    # --group-by emoji: a whole emoji (across 'styles') stays in one split
    strict = load_version(build(clean_dir, "strict", Recipe(group_by="emoji")))
    assert (strict.manifest.groupby("group")["split"].nunique() == 1).all()
    assert strict.manifest["group"].str.startswith("emoji:").all()


def test_digest_is_deterministic_and_changes_with_any_input(clean_dir, tmp_path):
    first = load_version(build(clean_dir, "a", "v2"))
    again = load_version(build(clean_dir, "a", "v2", force=True))
    assert first.digest == again.digest and len(first.digest) == 32
    aug = first.manifest[first.manifest["augmented_from"] != ""]["path"].iloc[0]
    copy = load_version(build(clean_dir, "b", "v2"))  # same bytes, under another name
    assert (copy.dir / aug).read_bytes() == (first.dir / aug).read_bytes()
    assert copy.digest == first.digest
    assert load_version(build(clean_dir, "c", "v2", seed=1)).digest != first.digest
    assert load_version(build(clean_dir, "d", "v3")).digest != first.digest

    # change one source image (and its manifest sha256, as a re-clean would): new digest
    source = Path(json.loads((clean_dir / "clean.json").read_text())["source"])
    manifest = pd.read_csv(clean_dir / "manifest.csv", dtype=str, keep_default_na=False)
    target = source / manifest["path"].iloc[0]
    drawing(np.random.default_rng(99)).save(target)
    with pytest.raises(ConfigError, match="changed since cleansing"):  # a stale manifest is refused
        build(clean_dir, "e", "v2")
    assert not (tmp_path / "versions" / "e").exists()
    write_clean_dir(source, clean_dir, manifest.drop(columns="sha256").to_dict("records"))
    assert load_version(build(clean_dir, "f", "v2")).digest != first.digest


def test_seeds_bug_augment_then_split_is_stopped(clean_dir, tmp_path):
    """The seed augmented every image first and split afterwards: copies of val images landed in train."""
    source = Path(json.loads((clean_dir / "clean.json").read_text())["source"])
    manifest = pd.read_csv(clean_dir / "manifest.csv", dtype=str, keep_default_na=False)
    polluted = tmp_path / "augmented_first"
    rows = []
    mild = OfflineAugment(hflip=0.5, rotation=0.0, crop_scale_min=1.0, color_jitter=0.2)
    for k, rel in enumerate(manifest["path"]):
        (polluted / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source / rel) as im:
            im.save(polluted / rel)
            augment_image(im, mild, seed=k).save(polluted / rel.replace(".png", "_aug.png"))
        cls = rel.split("/")[0]
        rows += [{"path": rel, "class": cls}, {"path": rel.replace(".png", "_aug.png"), "class": cls}]
    bad_clean = write_clean_dir(polluted, tmp_path / "clean_polluted", rows)

    seed_way = Recipe(group_by="file", merge_near_duplicates=False)  # groups unknown, every file alone
    with pytest.raises(LeakageError, match="phash distance|byte-identical"):
        build(bad_clean, "leaky", seed_way)
    versions = tmp_path / "versions"
    assert not (versions / "leaky").exists() and not list(versions.glob(".leaky*"))  # nothing half-written

    # the default (no labels -> near-duplicate groups) keeps each image with its copy instead
    fixed = load_version(build(bad_clean, "fixed", Recipe(group_by="file")))
    assert (fixed.manifest.groupby("group")["split"].nunique() == 1).all()


def test_check_leakage_on_its_own(clean_dir):
    version = load_version(build(clean_dir, "v1"))
    df = version.manifest.copy()
    assert check_leakage(df, version.dir)["images"] == len(df)

    straddle = df.copy()  # one group's image moved (in the manifest only) from val to train
    row = straddle.index[straddle["split"] == "val"][0]
    straddle.loc[row, "split"] = "train"
    with pytest.raises(LeakageError, match="is in"):
        check_leakage(straddle, version.dir)

    derived = df.copy()  # a training file claims a val parent
    train_row = derived.index[derived["split"] == "train"][0]
    derived.loc[train_row, "augmented_from"] = df.loc[row, "path"]
    with pytest.raises(LeakageError, match="augmented from"):
        check_leakage(derived, version.dir)


def test_too_small_class_is_a_clear_error(clean_dir, tmp_path):
    source = Path(json.loads((clean_dir / "clean.json").read_text())["source"])
    manifest = pd.read_csv(clean_dir / "manifest.csv", dtype=str, keep_default_na=False)
    tiny = manifest[(manifest["class"] != "dog") | manifest["group"].isin(["dog-0", "dog-1"])]
    small = write_clean_dir(source, tmp_path / "clean_small", tiny.drop(columns="sha256").to_dict("records"))
    with pytest.raises(ConfigError, match=r"'dog' has 2 group\(s\).*--exclude-class 'dog'"):
        build(small, "v1")
    assert not (tmp_path / "versions" / "v1").exists()
    version = load_version(build(small, "v1", Recipe(exclude_classes=["dog"])))
    assert version.classes == ["ant", "bee", "cat"]


def test_recipe_keys_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratios: [0.6, 0.2, 0.2]\nbalance:\n  flor: 1.0\n")
    with pytest.raises(ConfigError, match="flor.*Did you mean 'balance.floor'|flor.*floor"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="sum to"):
        load_recipe("v1", {"ratios": [0.6, 0.3, 0.3]})
    with pytest.raises(ConfigError, match="No recipe 'v9'"):
        load_recipe("v9")


@pytest.mark.slow
def test_load_version_and_mlflow_dataset(clean_dir, mlflow_store):
    import mlflow

    version = load_version(build(clean_dir, "v1"))
    assert load_version("v1", clean_dir.parent / "versions").digest == version.digest
    counts = version.class_counts("train")
    assert counts == [version.info["counts"]["train"][c] for c in version.classes]
    frame = version.split_frame("val")
    assert set(frame["split"]) == {"val"} and frame["label"].max() < len(version.classes)
    ds = mlflow_dataset(version, "train")
    assert ds.digest == version.digest and ds.name == "v1-train"
    with mlflow.start_run() as run:
        mlflow.log_input(ds, context="train")
    logged = mlflow.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
    assert logged.digest == version.digest
    with pytest.raises(ConfigError, match="python -m research split"):
        load_version("v7", clean_dir.parent / "versions")


def test_cli_builds_a_shipped_recipe_by_version_name(clean_dir, capsys):
    from research.cli import main

    out = clean_dir.parent / "versions"
    assert main(["split", str(clean_dir), "--version", "v2", "--out", str(out), "--set", "balance.floor=0.5"]) == 0
    info = json.loads((out / "v2" / "version.json").read_text())
    assert info["recipe"]["balance"]["floor"] == 0.5 and "max/min" in capsys.readouterr().out
    assert main(["split", str(clean_dir), "--version", "v2", "--out", str(out)]) == 2  # exists: --force
    assert "--force" in capsys.readouterr().err


def test_phash_variants_are_imagehash_phash_of_each_flip():
    import imagehash

    from research.data.split import phash_variants

    img = drawing(np.random.default_rng(5), size=48)
    hashes = phash_variants(img)
    assert int(str(imagehash.phash(img)), 16) == int(hashes[0])
    flipped = int(str(imagehash.phash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), 16)
    assert flipped in {int(h) for h in hashes}
