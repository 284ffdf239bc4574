"""Split a cleaned dataset into a versioned, leakage-checked ImageFolder tree.

`python -m research split CLEAN_DIR --version NAME [--recipe v3|FILE] [--seed S]`

Steps (each a function below):
1. groups: every image gets a group (labels `group` column, or `emoji`, or one per file), and
   perceptual-hash near-duplicates (flips and 90-degree turns included) are merged into one group;
2. splits: per class, whole groups go to train/val/test so image counts approach the ratios;
   a class with >= 3 groups gets at least one group in every split, fewer is a ConfigError;
3. balance (training split only): undersample classes above a cap, augment classes below a floor;
   val and test keep the natural distribution;
4. write into a temp dir next to the target (removing those a killed run left), run `check_leakage`,
   write manifest.csv and version.json, then rename into place: a failed build leaves nothing
   half-written. The version name is a plain name, and `outputs.check_folder` keeps the version out
   of the clean dir and the source tree, and off another stage's output. Every file goes through
   `outputs.output_path` (the manifest's `class` and `path` are plain names before they become paths),
   and an old version or a killed split's temp folder goes only through `outputs.remove_own`: the
   files the marker lists, nothing else.

The same clean manifest, recipe and seed give the same files, bytes and digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image

from research import configfile
from research.data import outputs
from research.data.image import SPLITS, open_rgb, to_rgb
from research.data.offline_augment import OfflineAugment, png_bytes, write_augmented
from research.data.pool import pmap, workers_for
from research.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"
MANIFEST_COLUMNS = ["path", "class", "split", "group", "sha256", "source_path", "augmented_from", "style", "family"]
VERSION_FILES = ("manifest.csv", "version.json")
IMAGE_MODE = "RGB"  # every file in a version decodes to RGB without transparency
COPY_AS_IS = {("PNG", "RGB"), ("JPEG", "RGB")}  # anything else is re-encoded as RGB PNG on white
AUGMENT_DRAWS = 8  # tries for an augmented copy that does not hash like a val/test image (`_write_files`)


class LeakageError(ConfigError):
    """A val/test image, or something derived from it, is also (nearly) in training."""


# ---------------------------------------------------------------------------------------
# Recipes


@dataclasses.dataclass
class Balance:
    """Training-split balancing. `cap` and `floor` are in `units`:

    - "median": multiples of the median per-class training count of the plain split
      (portable: 1.0 means "the median class" on 1,600 or on 23,000 images);
    - "images": absolute image counts.
    """

    units: Literal["median", "images"] = "median"
    cap: float | None = None  # undersample (seeded) training classes above this; null = no cap
    floor: float | None = None  # augment training classes below this up to it; null = no augmentation
    max_augment_per_image: int = 4  # at most this many augmented copies of one training image

    def validate(self) -> None:
        for key in ("cap", "floor"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"balance.{key}={value} must be > 0, or null to turn it off.")
        if self.cap is not None and self.floor is not None and self.cap < self.floor:
            raise ConfigError(f"balance.cap={self.cap} is below balance.floor={self.floor}: "
                              "a cap must be >= the floor.")
        if self.max_augment_per_image < 1:
            raise ConfigError(f"balance.max_augment_per_image={self.max_augment_per_image} must be >= 1.")

    def limits(self, train_counts: dict[str, int]) -> tuple[int | None, int | None, float]:
        """(cap, floor) in images for these per-class training counts, and their median."""
        median = float(np.median(list(train_counts.values()))) if train_counts else 0.0
        scale = median if self.units == "median" else 1.0

        def images(value: float | None) -> int | None:
            return None if value is None else max(1, int(round(value * scale)))

        return images(self.cap), images(self.floor), median


@dataclasses.dataclass
class Recipe:
    """How a dataset version is made from a clean manifest (YAML under research/data/recipes/)."""

    description: str = ""
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.6, 0.2, 0.2])  # train, val, test
    group_by: Literal["group", "emoji", "file"] = "group"  # "group" falls back to "file" without labels
    merge_near_duplicates: bool = True  # perceptual-hash near-duplicates share a group
    phash_threshold: int = 4  # hamming distance (of 64 bits) that counts as a near-duplicate
    exclude_classes: list[str] = dataclasses.field(default_factory=list)
    # leave-one-style-out (DomainBed's protocol): every drawing of this style family (a style, or the renderings
    # of one design: `family` in labels.csv) is the test split; train and val come from the other families
    # (their share of `ratios`' test joins train)
    holdout_style: str | None = None
    # leave-one-style-out *validation* (DomainBed's training-domain-out selection): with holdout_style, every
    # drawing of this second style is the val split and training sees only the remaining styles, so a study
    # chooses by how well a recipe carries to a style it never trained on, and the test style stays unseen
    val_style: str | None = None
    balance: Balance = dataclasses.field(default_factory=Balance)
    augment: OfflineAugment = dataclasses.field(default_factory=OfflineAugment)

    def validate(self) -> None:
        if len(self.ratios) != 3 or any(r <= 0 for r in self.ratios):
            raise ConfigError(f"ratios={self.ratios} must be three numbers > 0 (train, val, test), "
                              "e.g. [0.6, 0.2, 0.2].")
        if abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ConfigError(f"ratios={self.ratios} sum to {sum(self.ratios):g}; they must sum to 1.")
        if not 0 <= self.phash_threshold <= 32:
            raise ConfigError(f"phash_threshold={self.phash_threshold} must be in 0..32 (bits of 64); 4 is typical.")
        for key in ("holdout_style", "val_style"):
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                raise ConfigError(f"{key}={getattr(self, key)!r} names no style (an unset shell variable?); name "
                                  f"one, e.g. --{key.replace('_', '-')} twemoji, or leave the option out.")
        if self.val_style is not None and self.holdout_style in (None, self.val_style):
            raise ConfigError(f"val_style={self.val_style!r} needs a different holdout_style (the test style), e.g. "
                              f"--holdout-style twemoji --val-style {self.val_style}: val and test must be two "
                              "styles that training never sees.")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """A shipped recipe by name (`v3`), a YAML file, or the defaults (None), plus overrides."""
    if recipe is None:
        return configfile.load(Recipe, None, overrides)
    path = Path(recipe)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise ConfigError(f"No recipe {recipe!r}: give a YAML file or one of {', '.join(shipped_recipes())}.")
    return configfile.load(Recipe, path, overrides)


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return configfile.to_dict(recipe)


# ---------------------------------------------------------------------------------------
# Reading the clean stage's output


def read_clean_dir(clean_dir: str | Path) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
    """(manifest, source root, clean.json) of a clean dir; paths in the manifest are relative to the root."""
    clean_dir = Path(clean_dir)
    manifest, info_path = clean_dir / "manifest.csv", clean_dir / "clean.json"
    if not manifest.is_file() or not info_path.is_file():
        raise ConfigError(
            f"{clean_dir} is not a clean dir (needs manifest.csv and clean.json). "
            f"Make one with `python -m research clean <source tree>`."
        )
    info = json.loads(info_path.read_text())
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = {"path", "class", "sha256"} - set(df.columns)
    if missing:
        raise ConfigError(f"{manifest} lacks column(s) {', '.join(sorted(missing))}; rerun `python -m research clean`.")
    if df.empty:
        raise ConfigError(f"{manifest} lists no images: nothing to split.")
    for cls in df["class"].unique():
        outputs.plain_name(cls, f"class in {manifest}")
    for path in df["path"]:
        outputs.relative_path(path, f"path in {manifest}")
    if "source" not in info:
        raise ConfigError(f"{info_path} has no 'source' (the source root); rerun `python -m research clean`.")
    root = Path(info["source"])
    if not root.is_dir():
        raise ConfigError(f"Source root {root} (from {info_path}) does not exist.")
    return df.sort_values("path", ignore_index=True), root, info


def source_digest(df: pd.DataFrame, info: dict[str, Any]) -> str:
    """A digest of the clean dir as read (`read_clean_dir`): every manifest row (files, hashes, labels), and the
    clean stage's inventory digest of the tree. A re-clean that keeps other images changes it, and so does a
    rebuilt source tree; the recipe does not (it is taken before a recipe filters anything)."""
    rows = df.sort_values("path").to_csv(index=False)
    return hashlib.sha256(f"{info.get('inventory_digest', '')}\n{rows}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Perceptual hashes: 8 per image (the dihedral group), so flipped or turned copies match too


def phash_variants(image: Image.Image) -> np.ndarray:
    """Perceptual hashes of the image and its 7 flips/90-degree turns, as 8 uint64 (index 0 = as is).

    imagehash.phash's algorithm (32x32 grey, 2-D DCT, 8x8 low frequencies > their median; index 0
    equals `imagehash.phash(image)`), run on the 8 variants at once: about 5x faster than 8 calls.
    """
    import scipy.fftpack

    small = np.asarray(to_rgb(image).convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    variants = np.stack([np.rot90(small, k) for k in range(4)] + [np.rot90(small[:, ::-1], k) for k in range(4)])
    dct = scipy.fftpack.dct(scipy.fftpack.dct(variants.astype(float), axis=1), axis=2)[:, :8, :8].reshape(8, 64)
    bits = dct > np.median(dct, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def hash_file(path: Path) -> tuple[str, np.ndarray]:
    """(sha256 of the bytes, phash variants) of one image file."""
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), phash_variants(open_rgb(data))


def near_matches(queries: np.ndarray, targets: np.ndarray, threshold: int, chunk: int = 256):
    """Yield (i, j, distance) where some variant of queries[i] is within `threshold` of targets[j] as is.

    queries: (n, 8) uint64 variants; targets: (m,) uint64 (variant 0).
    """
    for start in range(0, len(queries), chunk):
        block = queries[start : start + chunk]
        best = np.full((len(block), len(targets)), 255, np.uint8)
        for v in range(block.shape[1]):
            np.minimum(best, np.bitwise_count(block[:, v, None] ^ targets[None, :]), out=best)
        for i, j in zip(*np.nonzero(best <= threshold)):
            yield start + int(i), int(j), int(best[i, j])


def _map(fn, items, workers: int | None, progress: bool, label: str) -> list:
    """fn over items on threads: Pillow, zlib and hashlib release the GIL, and closures need no pickling."""
    items = list(items)
    return pmap(fn, items, workers=workers_for(workers, cap=4), progress=progress and len(items) > 200,
                label=label, threads=True)


# ---------------------------------------------------------------------------------------
# 1. groups


def base_groups(df: pd.DataFrame, group_by: str) -> pd.Series:
    """The group each image starts in, before near-duplicates are merged."""
    if group_by == "emoji":
        if "emoji" not in df.columns or (df["emoji"] == "").all():
            raise ConfigError("--group-by emoji needs an 'emoji' column in the clean manifest (labels.csv); "
                              "use --group-by group or file.")
        column = "emoji"
    elif group_by == "group" and "group" in df.columns and (df["group"] != "").any():
        column = "group"
    else:  # "file", or "group" on data without labels: every file alone, near-duplicates merge below
        return "file:" + df["path"]
    # images without a label value stay alone rather than pooling into one '' group
    return pd.Series(np.where(df[column] != "", f"{column}:" + df[column], "file:" + df["path"]), index=df.index)


def merge_groups(base: pd.Series, hashes: np.ndarray, threshold: int | None) -> pd.Series:
    """Connected components of 'same base group' + 'perceptual near-duplicate' (when threshold is set).

    Each component is named after its smallest base group, so unmerged groups keep their names.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(base)
    codes = pd.factorize(base)[0]
    rows, cols = list(range(n)), list(codes + n)  # image -> its base group node
    if threshold is not None:
        for i, j, _ in near_matches(hashes, hashes[:, 0], threshold):
            if i != j:
                rows.append(i)
                cols.append(j)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n + codes.max() + 1,) * 2)
    _, label = connected_components(graph, directed=False)
    comp = pd.Series(label[:n], index=base.index)
    names = base.groupby(comp).min()
    return comp.map(names)


# ---------------------------------------------------------------------------------------
# 2. splits


def stable_int(*parts: Any) -> int:
    """A 63-bit integer from the parts, stable across runs and machines (Python's hash() is not)."""
    return int(hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def _assign_class(cls: str, units: pd.Series, ratios: list[float], seed: int) -> dict[str, str]:
    """Groups of one class (group -> image count) to splits: seeded shuffle, then greedy fill.

    Larger groups are placed first, each into the split furthest below its target; once the
    groups left are as few as the empty splits, they go to the empty splits.
    """
    if len(units) < len(SPLITS):
        raise ConfigError(
            f"Class {cls!r} has {len(units)} group(s) ({int(units.sum())} images): a group never straddles "
            f"splits, so it needs at least {len(SPLITS)} groups for train/val/test (a group shared with other "
            f"classes counts for its largest class). Add images to it, drop it with "
            f"--exclude-class {cls!r}, or, if near-duplicate merging joined them, lower phash_threshold."
        )
    rng = np.random.default_rng(stable_int(seed, "split", cls))
    order = units.iloc[rng.permutation(len(units))]
    order = order.iloc[np.argsort(-order.to_numpy(), kind="stable")]
    target = np.array(ratios) * units.sum()
    count, filled = np.zeros(len(SPLITS)), np.zeros(len(SPLITS), int)
    out = {}
    for k, (group, size) in enumerate(order.items()):
        empty = np.flatnonzero(filled == 0)
        candidates = empty if len(empty) >= len(order) - k else np.arange(len(SPLITS))
        s = candidates[np.argmax((target - count)[candidates])]
        out[group] = SPLITS[s]
        count[s] += size
        filled[s] += 1
    return out


def assign_splits(df: pd.DataFrame, ratios: list[float], seed: int) -> pd.Series:
    """Split of every row; a group spanning classes goes with its majority class (ties: first by name)."""
    sizes = df.groupby(["group", "class"]).size().reset_index(name="n")
    sizes = sizes.sort_values(["group", "n", "class"], ascending=[True, False, True])
    primary = sizes.drop_duplicates("group").set_index("group")["class"]
    group_size = df.groupby("group").size()
    split_of: dict[str, str] = {}
    for cls in sorted(df["class"].unique()):
        groups = primary[primary == cls].index
        split_of.update(_assign_class(cls, group_size[groups].sort_index(), ratios, seed))
    return df["group"].map(split_of)


def styles_of(df: pd.DataFrame) -> list[str]:
    """The drawing styles a clean manifest holds (its `style` column; photos are not a style)."""
    if "style" not in df.columns:
        return []
    return sorted(set(df["style"]) - {"", "photo"})


def family_column(df: pd.DataFrame) -> pd.Series:
    """Each row's style family: the `family` column where it says one, else the style (a family of one)."""
    style = df["style"] if "style" in df.columns else pd.Series("", index=df.index)
    if "family" not in df.columns:
        return style
    return df["family"].where(df["family"] != "", style)


def families_of(df: pd.DataFrame) -> dict[str, list[str]]:
    """family -> its styles, for the drawings of a manifest: what leave-one-style-out holds out, one at a time.
    Renderings of one design (Fluent's flat and high contrast) are one family: holding out one of them alone
    would test a re-colouring of drawings that training saw."""
    if "style" not in df.columns:
        return {}
    drawn = df["style"].isin(styles_of(df))
    pairs = pd.DataFrame({"family": family_column(df)[drawn], "style": df.loc[drawn, "style"]}).drop_duplicates()
    return {f: sorted(g["style"]) for f, g in pairs.groupby("family")}


def _holdout_rows(df: pd.DataFrame, name: str, key: str) -> pd.Series:
    """Rows of the family `name` (a family, or a style that is a family of its own); refuses a style that is
    one rendering of a larger family, and a name that is neither, saying what to pass instead."""
    families = families_of(df)
    if name in families:
        return family_column(df) == name
    family = next((f for f, members in families.items() if name in members), None)
    if family is not None:
        raise ConfigError(f"{key}={name!r} is one rendering of the style family {family!r} "
                          f"({', '.join(families[family])}: the same drawings); hold out the family: "
                          f"--{key.replace('_', '-')} {family}.")
    have = f"its style families are {', '.join(families)}" if families else "it has no `style` column"
    raise ConfigError(f"{key}={name!r} is not a style family of this clean manifest ({have}).")


def holdout_splits(df: pd.DataFrame, style: str, ratios: list[float], seed: int,
                   val_style: str | None = None) -> pd.Series:
    """Every drawing of the style family `style` -> test; the other families split group-aware into train and
    val, their would-be test share joining train. Drawings of other families that share a group with a held-out
    one (near-duplicates, merged by perceptual hash) -> "" (left out): they would carry the test into training.
    With `val_style`, every drawing of that family (but near-duplicates of the test family) -> val and the
    remaining families -> train, again without the near-duplicates of either held-out family."""
    held = _holdout_rows(df, style, "holdout_style")
    val_rows = _holdout_rows(df, val_style, "val_style") if val_style is not None else None
    split = pd.Series("", index=df.index)
    split[held] = "test"
    out = held | (~held & df["group"].isin(set(df.loc[held, "group"])))
    if val_rows is not None:
        val = ~out & val_rows
        split[val] = "val"
        out |= val | df["group"].isin(set(df.loc[val, "group"]))
        split[~out] = "train"
        return split
    rest = df[~out]
    split[rest.index] = assign_splits(rest, ratios, seed).replace({"test": "train"})
    return split


def check_trainable(df: pd.DataFrame, recipe: Recipe) -> None:
    """The rule of a plain split, for every kind of split (leave-one-style-out, a val style): two classes or
    more, and each class in train, val and test (a class with no training image cannot be learnt, one without
    val or test images cannot be measured). A ConfigError naming the class and the fix otherwise."""
    held = f" with --holdout-style {recipe.holdout_style}" if recipe.holdout_style else ""
    held += f" --val-style {recipe.val_style}" if recipe.val_style else ""
    classes = sorted(df["class"].unique())
    if len(classes) < 2:
        raise ConfigError(f"The split{held} holds {len(classes)} class(es) ({', '.join(classes) or 'none'}); a "
                          "classifier needs two or more. Add images, or drop fewer classes (exclude_classes).")
    counts = df.groupby(["class", "split"])["group"].nunique().unstack(fill_value=0).reindex(
        index=classes, columns=list(SPLITS), fill_value=0)
    for cls, row in counts.iterrows():
        empty = [s for s in SPLITS if row[s] == 0]
        if empty:
            where = ("drawings of other styles" if recipe.holdout_style else "images")
            raise ConfigError(
                f"Class {cls!r} has no image in {' or '.join(empty)} of the split{held} (groups: "
                f"{', '.join(f'{s} {row[s]}' for s in SPLITS)}): every class needs a group in each of train, val "
                f"and test, as in a plain split. Add {where} to it, drop it with --exclude-class {cls!r}"
                + (", or hold out another style." if recipe.holdout_style else "."))


# ---------------------------------------------------------------------------------------
# 3. balance


def plan_balance(df: pd.DataFrame, balance: Balance, seed: int) -> tuple[pd.DataFrame, list[tuple[int, int]], dict]:
    """(rows kept after the cap, augmentation plan [(parent row index, copy number)], summary).

    Only training rows are capped or augmented. Parents are taken round-robin over a seeded
    order, so copies spread evenly over a class's images.
    """
    train = df[df["split"] == "train"]
    counts = train.groupby("class").size().to_dict()
    cap, floor, median = balance.limits(counts)
    dropped: dict[str, int] = {}
    keep = pd.Series(True, index=df.index)
    plan: list[tuple[int, int]] = []
    added: dict[str, int] = {}
    for cls in sorted(counts):
        rows = train.index[train["class"] == cls]  # df is sorted by path, so this order is stable
        if cap is not None and len(rows) > cap:
            rng = np.random.default_rng(stable_int(seed, "cap", cls))
            chosen = set(rng.choice(len(rows), cap, replace=False).tolist())
            drop = [r for k, r in enumerate(rows) if k not in chosen]
            keep[drop] = False
            dropped[cls] = len(drop)
        elif floor is not None and len(rows) < floor:
            need = min(floor - len(rows), balance.max_augment_per_image * len(rows))
            rng = np.random.default_rng(stable_int(seed, "augment", cls))
            parents = rows[rng.permutation(len(rows))]
            plan += [(parents[k % len(rows)], k // len(rows)) for k in range(need)]
            added[cls] = need
    summary = {"train_median": median, "cap": cap, "floor": floor, "undersampled": dropped, "augmented": added}
    return df[keep], plan, summary


# ---------------------------------------------------------------------------------------
# 4. writing


def _flat_name(path: str, cls: str) -> str:
    """File name in the version: the source path under its class folder, '/' -> '__'."""
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == cls:
        parts = parts[1:]
    return "__".join(parts)


def output_names(df: pd.DataFrame) -> pd.Series:
    """Unique file names per class (hence per split dir too); clashing stems get a short hash of the source path.

    Stems, not names, must be unique: a file re-encoded to PNG changes its suffix.
    """
    names = pd.Series([_flat_name(p, c) for p, c in zip(df["path"], df["class"])], index=df.index)
    stems = names.str.rsplit(".", n=1).str[0].str.lower()
    clash = stems.groupby([df["class"], stems]).transform("size") > 1
    for i in names.index[clash]:
        stem, dot, suffix = names[i].rpartition(".")
        tag = hashlib.sha256(df.at[i, "path"].encode()).hexdigest()[:8]
        names[i] = f"{stem}-{tag}.{suffix}" if dot else f"{names[i]}-{tag}"
    return names


def _as_png(rel: str) -> str:
    """Where a re-encoded file goes: its suffix (if any) replaced by .png."""
    return (rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel) + ".png"


def _write_original(source: Path, root: Path, rel: str, expected_sha: str) -> tuple[str, str]:
    """Copy one source image to root/rel; re-encoded as RGB PNG (suffix .png) unless already RGB PNG/JPEG.

    Returns (path relative to root as written, sha256 of the written bytes).
    """
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha and sha != expected_sha:
        raise ConfigError(f"{source} changed since cleansing (sha256 {sha[:12]} != {expected_sha[:12]}); "
                          "rerun `python -m research clean`.")
    with Image.open(io.BytesIO(data)) as image:  # the header decides; pixels are decoded only to re-encode
        as_is = (image.format, image.mode) in COPY_AS_IS
    if not as_is:
        data = png_bytes(open_rgb(data))
        rel = _as_png(rel)
    out = outputs.output_path(root, rel)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return rel, hashlib.sha256(data).hexdigest()


def version_digest(manifest: pd.DataFrame, recipe: dict[str, Any], seed: int) -> str:
    """sha256 over the sorted (path, class, split, sha256) rows + the recipe + the seed.

    Truncated to 32 hex digits (128 bits): MLflow caps a dataset digest at 36 characters, and the
    mlflow.data dataset carries this exact digest.
    """
    h = hashlib.sha256()
    for row in sorted(zip(manifest["path"], manifest["class"], manifest["split"], manifest["sha256"])):
        h.update(("\t".join(row) + "\n").encode())
    # holdout_style None leaves the digest as it was before the key existed: the same data, the same digest
    recipe = {k: v for k, v in recipe.items()
              if k != "description" and not (k in ("holdout_style", "val_style") and v is None)}
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(f"seed={seed}".encode())
    return h.hexdigest()[:32]


def counts_table(manifest: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, int]]:
    return {
        s: {c: int(n) for c, n in
            manifest[manifest["split"] == s].groupby("class").size().reindex(classes, fill_value=0).items()}
        for s in SPLITS
    }


def imbalance(counts: dict[str, int]) -> float:
    values = [n for n in counts.values()]
    return max(values) / min(values) if values and min(values) > 0 else float("inf")


def check_leakage(manifest_df: pd.DataFrame, root: str | Path, phash_threshold: int = 4,
                  workers: int | None = None) -> dict[str, int]:
    """Raise LeakageError when a val/test image, or anything derived from it, is (nearly) in training.

    Checks, on the files under `root` (the version dir; manifest paths are relative to it):
    a group in more than one split; an augmented image in another split than its parent (or a
    missing parent); a sha256 shared by a training and a val/test file; a val/test image whose
    perceptual hash, or that of a flip/90-degree turn of it, is within `phash_threshold` bits of a
    training image's. Also fails when a file's sha256 is not the manifest's. Returns check counts.
    """
    root = Path(root)
    df = manifest_df.reset_index(drop=True)
    problems: list[str] = []

    splits_per_group = df.groupby("group")["split"].nunique()
    for group in splits_per_group.index[splits_per_group > 1]:
        where = sorted(df.loc[df["group"] == group, "split"].unique())
        problems.append(f"group {group!r} is in {', '.join(where)}")

    split_of = dict(zip(df["path"], df["split"]))
    derived = df[df["augmented_from"].fillna("") != ""]
    for path, parent, split in zip(derived["path"], derived["augmented_from"], derived["split"]):
        if parent not in split_of:
            problems.append(f"{path} is augmented from {parent}, which is not in the manifest")
        elif split_of[parent] != split or split != "train":
            problems.append(f"{path} ({split}) is augmented from {parent} ({split_of[parent]})")

    hashed = _map(lambda p: hash_file(root / p), df["path"], workers, False, "leakage check")
    shas = pd.Series([h[0] for h in hashed], index=df.index)
    stale = df.index[shas != df["sha256"]]
    problems += [f"{df.at[i, 'path']} does not match its manifest sha256" for i in stale]

    is_train = (df["split"] == "train").to_numpy()
    train_sha = set(shas[is_train])
    for i in np.flatnonzero(~is_train):
        if shas[i] in train_sha:
            problems.append(f"{df.at[i, 'path']} is byte-identical to a training image")

    phashes = np.stack([h[1] for h in hashed]) if hashed else np.zeros((0, 8), np.uint64)
    train_idx, eval_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    near = 0
    for i, j, dist in near_matches(phashes[eval_idx], phashes[train_idx, 0], phash_threshold):
        near += 1
        problems.append(f"{df.at[eval_idx[i], 'path']} ~ {df.at[train_idx[j], 'path']} (phash distance {dist})")

    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LeakageError(
            f"Leakage between training and val/test ({len(problems)} problem(s)):\n  {shown}{more}\n"
            "A test score on this data measures memory, not recognition. Augment only after splitting, "
            "and keep copies of one drawing in one group (merge_near_duplicates: true)."
        )
    return {"images": len(df), "groups": int(df["group"].nunique()), "near_matches": near}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@outputs.holding
def build_version(
    clean_dir: str | Path,
    name: str,
    recipe: Recipe | str | Path | None = None,
    seed: int = 0,
    out_root: str | Path = "data/versions",
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Build dataset version `name` under `out_root` from a clean dir; returns the version dir.

    `recipe`: a Recipe, a shipped recipe name, a YAML path, or None (the shipped recipe named
    like the version if there is one, else the plain defaults).
    """
    if recipe is None:
        recipe = name if name in shipped_recipes() else "v1"
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    target = Path(out_root) / outputs.check_name(name)
    df, source_root, info = read_clean_dir(clean_dir)
    read_digest = source_digest(df, info)  # before any recipe filters rows
    outputs.check_folder("split", target, [clean_dir, source_root])
    outputs.claim(target, "split")  # one split of a version at a time, --force or not
    if target.exists() and not force:
        raise ConfigError(f"Version {target} exists; pick another --version name or pass --force to rebuild it.")
    if target.exists():
        outputs.check_removable(target, "split", "the version")  # before any work: --force replaces only split's files

    unknown = sorted(set(recipe.exclude_classes) - set(df["class"]))
    if unknown:
        raise ConfigError(f"exclude_classes names unknown class(es) {unknown}; "
                          f"classes are {sorted(df['class'].unique())}.")
    df = df[~df["class"].isin(recipe.exclude_classes)].reset_index(drop=True)

    sources = [source_root / p for p in df["path"]]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} file(s) in the clean manifest are gone, e.g. {missing[0]}; "
                          "rerun `python -m research clean`.")
    threshold = recipe.phash_threshold if recipe.merge_near_duplicates else None
    hashes = None
    if threshold is not None:
        hashes = np.stack(_map(lambda p: hash_file(p)[1], sources, workers, progress, "hashing"))
    df["group"] = merge_groups(base_groups(df, recipe.group_by), hashes, threshold)
    if recipe.holdout_style is None:
        df["split"] = assign_splits(df, recipe.ratios, seed)
    else:
        df["split"] = holdout_splits(df, recipe.holdout_style, recipe.ratios, seed, recipe.val_style)
        df = df[df["split"] != ""].reset_index(drop=True)
    check_trainable(df, recipe)  # every split kind: before any file is written
    df, plan, summary = plan_balance(df, recipe.balance, seed)

    tmp = target.parent / f".{name}.tmp-{os.getpid()}"
    _remove_stale_temps(target)
    try:
        manifest = _write_files(df, plan, source_root, tmp, recipe, seed, workers, progress)
        check_leakage(manifest, tmp, recipe.phash_threshold, workers)
        outputs.mark(tmp, "split", [*manifest["path"], *VERSION_FILES])  # what it wrote, exactly
        classes = sorted(manifest["class"].unique())
        manifest.to_csv(tmp / "manifest.csv", index=False)
        rdict = recipe_dict(recipe)
        _write_json(
            tmp / "version.json",
            {
                "name": name,
                "recipe": rdict,
                "seed": seed,
                "classes": classes,
                "counts": counts_table(manifest, classes),
                "source_digest": read_digest,
                "style_families": families_of(manifest),
                "digest": version_digest(manifest, rdict, seed),
                "image_mode": IMAGE_MODE,
                "source": str(Path(clean_dir).resolve()),
                "balance": summary,
            },
        )
        _swap_in(tmp, target)
    except BaseException:
        with contextlib.suppress(ConfigError, OSError):  # the error that got here is the one to show
            outputs.remove_own(tmp, "split", "this split's temporary folder")
        raise
    return target


def _write_files(df, plan, source_root: Path, tmp: Path, recipe: Recipe, seed: int, workers, progress) -> pd.DataFrame:
    """Copy originals and write augmented copies under `tmp`; returns the manifest."""
    names = output_names(df)
    sources = [source_root / p for p in df["path"]]
    jobs = [(src, f"{s}/{c}/{n}", sha)
            for src, s, c, n, sha in zip(sources, df["split"], df["class"], names, df["sha256"])]
    pos = {idx: k for k, idx in enumerate(df.index)}
    aug_paths = [f"train/{df.at[idx, 'class']}/{_stem(jobs[pos[idx]][1])}__aug{copy}.png" for idx, copy in plan]
    # marked before the first file with every file it may write, so a killed split's folder can be removed
    planned = [p for _, rel, _ in jobs for p in (rel, _as_png(rel))] + aug_paths + list(VERSION_FILES)
    outputs.mark(tmp, "split", planned)
    written = _map(lambda j: _write_original(j[0], tmp, j[1], j[2]), jobs, workers, progress, "copying")
    out_paths, shas = [w[0] for w in written], [w[1] for w in written]
    manifest = pd.DataFrame(
        {
            "path": out_paths,
            "class": df["class"].to_numpy(),
            "split": df["split"].to_numpy(),
            "group": df["group"].to_numpy(),
            "sha256": shas,
            "source_path": [s.resolve().as_posix() for s in sources],
            "augmented_from": "",
            "style": df["style"].to_numpy() if "style" in df.columns else "",  # what --holdout-style reads
            "family": family_column(df).to_numpy() if "style" in df.columns else "",
        }
    )
    aug_rows = []
    for (parent_idx, _), path in zip(plan, aug_paths):
        parent = manifest.iloc[pos[parent_idx]]
        aug_rows.append({**parent.to_dict(), "path": path, "augmented_from": parent["path"]})
    if aug_rows:
        aug = pd.DataFrame(aug_rows)
        held = manifest["split"] != "train"  # the leakage guard compares every training image with these
        held_hashes = np.stack(_map(lambda p: hash_file(tmp / p)[1], manifest.loc[held, "path"], workers, False,
                                    "hashing")) if held.any() else np.zeros((0, 8), np.uint64)

        def write(row) -> str:
            """One augmented copy, drawn again (next seed) while it happens to hash within phash_threshold of a
            val/test image: a crop of a peacock can hash like a basketball, and the guard would rightly refuse
            the version. Its parent is training data, so no draw can be a true copy of a held-out image."""
            for attempt in range(AUGMENT_DRAWS):
                out_seed = stable_int(seed, "augment", row["augmented_from"], row["path"], *([attempt] * (attempt > 0)))
                data = write_augmented(tmp / row["augmented_from"], outputs.output_path(tmp, row["path"]),
                                       recipe.augment, out_seed)
                as_is = phash_variants(open_rgb(data))[:1]  # what check_leakage compares, the same way round
                if next(near_matches(held_hashes, as_is, recipe.phash_threshold), None) is None:
                    break
            return hashlib.sha256(data).hexdigest()

        aug["sha256"] = _map(write, [r for _, r in aug.iterrows()], workers, progress, "augmenting")
        manifest = pd.concat([manifest, aug], ignore_index=True)
    if manifest["path"].duplicated().any():
        dup = manifest.loc[manifest["path"].duplicated(), "path"].iloc[0]
        raise ConfigError(f"Two images would be written to {dup}; rename one of the source files.")
    return manifest.sort_values("path", ignore_index=True)[MANIFEST_COLUMNS]


def _stem(rel: str) -> str:
    """A written file's name without its suffix (the same before and after `_as_png`)."""
    return rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _remove_stale_temps(target: Path) -> None:
    """The temp and old folders of this version (`_swap_in`'s names) whose split process is gone, e.g. killed;
    only what their marker lists (`outputs.remove_own`), so a folder holding anything else is a refusal."""
    import psutil

    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)")
    for folder in target.parent.glob(f".{target.name}.*"):
        found = pattern.fullmatch(folder.name)
        if found and (int(found[2]) == os.getpid() or not psutil.pid_exists(int(found[2]))):
            outputs.remove_own(folder, "split", "a killed split's temporary folder")


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished temp dir to the target; an old version is removed only after that."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        outputs.remove_own(old, "split", "the previous version")


# ---------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("clean_dir", help="a clean dir (data/clean/<name>/ with manifest.csv and clean.json)")
    parser.add_argument("--version", required=True, help="name of the version to write, e.g. v3")
    parser.add_argument(
        "--recipe",
        help=f"a recipe YAML or a shipped name ({', '.join(shipped_recipes())}); "
             "default: the shipped recipe named like --version, else v1",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-by", choices=["group", "emoji", "file"], help="override the recipe's group_by")
    parser.add_argument("--exclude-class", action="append", default=None, help="leave a class out (repeatable)")
    parser.add_argument("--holdout-style", metavar="FAMILY",
                        help="leave one style family out: its drawings are the test split, train/val come from the "
                             "others (the embedded dataset's: openmoji, twemoji, noto, fluent, fxemoji, streamline)")
    parser.add_argument("--val-style", metavar="FAMILY",
                        help="with --holdout-style: this family's drawings are the val split and training sees only "
                             "the remaining families (a study then chooses by a style it never trained on)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. balance.cap=1.5")
    parser.add_argument("--out", default="data/versions", help="where versions live (default data/versions)")
    parser.add_argument("--force", action="store_true", help="replace an existing version of that name")
    parser.add_argument("--workers", type=int, default=None)


def run(args) -> int:
    overrides = configfile.parse_overrides(args.set)
    if args.group_by:
        overrides["group_by"] = args.group_by
    if args.exclude_class:
        overrides["exclude_classes"] = args.exclude_class
    if args.holdout_style is not None:  # '' is refused by name, never read as "no style held out"
        overrides["holdout_style"] = args.holdout_style
    if args.val_style is not None:
        overrides["val_style"] = args.val_style
    name = args.recipe or (args.version if args.version in shipped_recipes() else "v1")
    recipe = load_recipe(name, overrides)
    start = time.perf_counter()
    target = build_version(args.clean_dir, args.version, recipe, args.seed, args.out, args.force, args.workers)
    print_summary(target, time.perf_counter() - start)
    return 0


def print_summary(target: Path, seconds: float | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    info = json.loads((target / "version.json").read_text())
    table = Table(title=f"{info['name']}  digest {info['digest']}")
    table.add_column("class")
    for s in SPLITS:
        table.add_column(s, justify="right")
    for c in info["classes"]:
        table.add_row(c, *(str(info["counts"][s][c]) for s in SPLITS))
    table.add_row("total", *(str(sum(info["counts"][s].values())) for s in SPLITS), style="bold")
    table.add_row("max/min", *(f"{imbalance(info['counts'][s]):.2f}" for s in SPLITS), style="bold")
    console = Console()
    console.print(table)
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    console.print(f"wrote {target}{took}")
