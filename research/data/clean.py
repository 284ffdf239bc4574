"""Find the wrongly collected photographs in a class-per-folder tree of drawings; quarantine them.

`python -m research clean DIR --method M --features F` writes `data/clean/<name>/`:
`manifest.csv` (kept files), `quarantine.csv` (removed: path, class, cluster, score, reason),
`unreadable.csv` (path, error), `clean.json`, `dendrogram.png` (agglomerative), one
`cluster_<c>.png` sample grid per cluster and `score_hist.png`. Nothing under DIR is written,
moved or deleted: the outputs are lists of paths relative to DIR, and `--out` may be neither inside
DIR nor another stage's folder (`outputs.check_folder`).

Methods (the seed's three first):

- `dbscan` on `pca` (PCA(100) of 32x32 raw pixels): the seed's first try;
- `agglomerative` (Ward) on `pca` or `raw` (32x32x3 pixels, no PCA) with `--k 2`: the seed's pick;
- `gmm`: a `--k`-component Gaussian mixture on `photo` features (standardised handcrafted
  colour/flatness/gradient/frequency statistics, see `photo_features`);
- `score`: a single photo-ness score per image cut in two by a 2-component 1-D Gaussian mixture;
- `auto`: runs every candidate in `CANDIDATES` and keeps the one whose kept/quarantined split is
  best separated (silhouette in the standardised `photo` feature space); labels never decide.

Bounded memory (the seed had 23,000+ images; Ward is O(n^2) in memory): agglomerative clusters a
random sample of at most `--sample` images (default 3,000) and assigns every other image to the
nearest cluster centroid (Euclidean, in the same feature space). DBSCAN runs on the same kind of
sample; an image outside it takes the label of its nearest core sample when that one lies within
`eps`, else it is noise. GMM fits on the sample and predicts everyone. Pixels are held as uint8.

Which cluster holds the photographs (no labels): every image gets a photo-ness score
(`photo_features.photo_score`: many unique colours, high colour entropy, little mass in the 8
main colours, few exactly flat pixels, much gentle gradient). A cluster (DBSCAN noise counts as
one) is a photo cluster when its mean score lies above the midpoint between the lowest and the
highest cluster mean AND its median `flat_fraction` is below `MAX_PHOTO_FLAT` (most pixels of a
drawing sit in exactly flat colour; almost none of a photograph's do). Size plays no part, so a
minority cluster of drawings is not taken for photographs, and a tree with no photographs
quarantines nothing.

With `labels.csv` (column `is_photo`) under DIR, every method is scored: photo precision, recall,
F1 and `drawings_lost` (drawings wrongly quarantined). Everything goes to MLflow experiment
`cleansing` (one run; `auto` adds a child run per candidate).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from research.data import outputs
from research.data import photo_features as pf
from research.errors import ConfigError

METHODS = ("agglomerative", "dbscan", "gmm", "score", "auto")
FEATURES = ("raw", "pca", "photo")
DEFAULT_FEATURES = {"agglomerative": "raw", "dbscan": "pca", "gmm": "photo", "score": "photo"}
CANDIDATES: list[tuple[str, str]] = [
    ("dbscan", "pca"),
    ("agglomerative", "pca"),
    ("agglomerative", "raw"),
    ("agglomerative", "photo"),
    ("gmm", "photo"),
    ("score", "photo"),
]
PCA_COMPONENTS = 100
MAX_SAMPLE = 3000
MAX_PHOTO_FLAT = 0.5
DBSCAN_MIN_SAMPLES = 10
DBSCAN_EPS_QUANTILE = 0.5  # eps = this quantile of the sample's distance to its min_samples-th neighbour (median)
EXPERIMENT = "cleansing"


@dataclass
class Data:
    """Everything read from the tree once and shared by every method."""

    root: Path
    items: pd.DataFrame  # readable images: class, path, sha256, width, height (+ label columns)
    unreadable: pd.DataFrame  # path, error
    digest: str
    feats: pf.Features  # rows aligned with items
    score: np.ndarray  # photo-ness per item
    matrices: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return "is_photo" in self.items.columns and self.items["is_photo"].notna().all()


@dataclass
class Result:
    method: str
    features: str
    params: dict
    labels: np.ndarray  # cluster per item (-1: DBSCAN noise)
    photo_clusters: list[int]
    cluster_table: pd.DataFrame  # cluster, size, mean_score, median_flat, photo
    seconds: float
    sample: np.ndarray  # indices of the clustered sample
    linkage: np.ndarray | None = None
    separation: float = float("nan")
    metrics: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.features}"

    @property
    def quarantined(self) -> np.ndarray:
        return np.isin(self.labels, self.photo_clusters)


# ---------------------------------------------------------------- the stage (its helpers follow)


@outputs.holding
def clean(root: str | Path, method: str = "auto", features: str | None = None, k: int = 2,
          out: str | Path | None = None, seed: int = 0, max_sample: int = MAX_SAMPLE,
          eps: float | None = None, min_samples: int = DBSCAN_MIN_SAMPLES, workers: int | None = None,
          log: bool = True, progress: bool = True) -> dict:
    """Detect photographs, write the outputs under `out`; returns clean.json's content (+ 'table')."""
    if method not in METHODS:
        raise ConfigError(f"clean: --method {method!r} is not one of {', '.join(METHODS)}.")
    if method == "auto" and features is not None:
        raise ConfigError("clean: --method auto tries every (method, features) pair in CANDIDATES; "
                          "drop --features or name a method.")
    root = Path(root)
    out = Path(out) if out else Path("data/clean") / root.resolve().name
    outputs.check_folder("clean", out, [root])
    outputs.claim(out, "clean")
    data = load(root, workers=workers, progress=progress)
    kw = dict(k=k, seed=seed, max_sample=max_sample, eps=eps, min_samples=min_samples)
    if method == "auto":
        results = [run_method(data, m, f, **kw) for m, f in CANDIDATES]
        best = max(results, key=lambda r: r.separation)
        extra = {"chosen_by": "auto: highest silhouette of the kept/quarantined split in photo-feature space"}
    else:
        results = [run_method(data, method, features, **kw)]
        best, extra = results[0], {}
    table = methods_table(results, best)
    extra["table"] = table.to_dict(orient="records")
    info = write_outputs(data, best, out, extra)
    table.to_csv(out / "methods.csv", index=False)
    if method == "auto":
        for r in results:
            if r is not best:
                plot_clusters(data, r, out / "methods" / r.name)
    if log:
        info["run_id"] = log_to_mlflow(data, results, best, out, auto=method == "auto")
    info["out"] = str(out)
    return info


# ---------------------------------------------------------------- reading


def load(root: str | Path, workers: int | None = None, progress: bool = True) -> Data:
    """Scan the tree, decode every readable image once, attach labels.csv columns when present."""
    from research.data.scan import inventory_digest, scan

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"clean: '{root}' is not a folder; pass the root of a class-per-folder tree "
                          "(e.g. data/raw/emoji20, built by `python -m research data build`).")
    inv = scan(root, workers=workers, progress=progress)
    in_classes = inv[inv["class"] != ""]  # files at the root (labels.csv, ATTRIBUTION.md) are not data
    good = in_classes[in_classes["ok"]].reset_index(drop=True)
    bad = in_classes.loc[~in_classes["ok"], ["path", "error"]]
    feats = pf.extract([root / p for p in good["path"]], workers=workers, progress=progress)
    if not feats.ok.all():  # header fine, pixels not: unreadable too
        failed = pd.DataFrame({"path": good["path"][~feats.ok], "error": np.array(feats.errors)[~feats.ok]})
        bad = pd.concat([bad, failed], ignore_index=True)
        keep = feats.ok
        good = good[keep].reset_index(drop=True)
        feats = pf.Features(feats.raw[keep], feats.stats[keep].reset_index(drop=True), feats.ok[keep],
                            [e for e, k in zip(feats.errors, keep) if k])
    if len(good) < 2:
        raise ConfigError(f"clean: '{root}' holds {len(good)} readable image(s) in class folders; "
                          "need at least 2.")
    items = good[["class", "path", "sha256", "width", "height"]].copy()
    items = _attach_labels(root, items)
    return Data(root.resolve(), items, bad.reset_index(drop=True), inventory_digest(inv), feats,
                pf.photo_score(feats.stats))


def _attach_labels(root: Path, items: pd.DataFrame) -> pd.DataFrame:
    labels_path = root / "labels.csv"
    if not labels_path.is_file():
        return items
    labels = read_labels(labels_path)
    extra = [c for c in ("style", "family", "group", "emoji", "is_photo", "source", "license") if c in labels.columns]
    return items.merge(labels[["path", *extra]].drop_duplicates("path"), on="path", how="left")


def read_labels(path: Path) -> pd.DataFrame:
    """A tree's labels.csv: UTF-8 CSV with a header naming a `path` column (each image's path in the tree)."""
    fix = "fix it or move it out of the tree (clean runs without it; is_photo only scores the methods)"
    try:
        labels = pd.read_csv(path, dtype={"path": str}, encoding="utf-8")
    except pd.errors.EmptyDataError as exc:
        raise ConfigError(f"{path} is empty: {fix}.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8, or "
                          f"{fix}.") from exc
    except pd.errors.ParserError as exc:
        raise ConfigError(f"{path} is not a readable CSV ({' '.join(str(exc).split())}): {fix}.") from exc
    if "path" not in labels.columns:
        raise ConfigError(f"{path} has no `path` column (its header: {', '.join(map(str, labels.columns))}); the "
                          f"first line must name the columns, `path` being each image's path in the tree: {fix}.")
    return labels


def matrix(data: Data, features: str, seed: int = 0) -> np.ndarray:
    """The feature matrix for `features` (cached): raw pixels in [0,1], PCA(100) of them, or photo stats."""
    if features not in FEATURES:
        raise ConfigError(f"clean: --features {features!r} is not one of {', '.join(FEATURES)}.")
    if features not in data.matrices:
        if features == "raw":
            x = data.feats.raw.astype(np.float32) / 255.0
        elif features == "pca":
            x = _pca(data.feats.raw, PCA_COMPONENTS, seed)
        else:
            x = pf.standardise(data.feats.stats).astype(np.float32)
        data.matrices[features] = x
    return data.matrices[features]


def _pca(raw: np.ndarray, n_components: int, seed: int, fit_on: int = 10_000) -> np.ndarray:
    from sklearn.decomposition import PCA

    n_components = min(n_components, raw.shape[0] - 1, raw.shape[1])
    rng = np.random.default_rng(seed)
    fit_idx = rng.choice(len(raw), min(fit_on, len(raw)), replace=False)
    pca = PCA(n_components, svd_solver="randomized", random_state=seed)
    pca.fit(raw[fit_idx].astype(np.float32) / 255.0)
    out = np.empty((len(raw), n_components), np.float32)
    for i in range(0, len(raw), 4096):  # transform in blocks: never a float copy of all pixels
        out[i : i + 4096] = pca.transform(raw[i : i + 4096].astype(np.float32) / 255.0)
    return out


# ---------------------------------------------------------------- clustering


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size, replace=False)) if n > size else np.arange(n)


def nearest(x: np.ndarray, centres: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to the nearest row of `centres` for every row of `x`, in blocks."""
    from sklearn.metrics import pairwise_distances_argmin_min

    idx, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for i in range(0, len(x), block):
        idx[i : i + block], dist[i : i + block] = pairwise_distances_argmin_min(x[i : i + block], centres)
    return idx, dist


def agglomerative(x: np.ndarray, k: int, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ward clustering of the sample into k; the rest go to the nearest centroid. (labels, linkage)"""
    from scipy.cluster.hierarchy import fcluster, linkage

    xs = x[sample].astype(np.float64)
    z = linkage(xs, method="ward")
    sample_labels = fcluster(z, t=k, criterion="maxclust") - 1
    centres = np.stack([xs[sample_labels == c].mean(axis=0) for c in np.unique(sample_labels)])
    labels, _ = nearest(x, centres.astype(np.float32))
    labels = np.unique(sample_labels)[labels]
    labels[sample] = sample_labels
    return labels, z


def dbscan(x: np.ndarray, sample: np.ndarray, eps: float | None, min_samples: int) -> tuple[np.ndarray, float]:
    """DBSCAN on the sample (eps from its k-distance quantile when None); rest by nearest core sample."""
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    xs = x[sample]
    if eps is None:
        kdist, _ = NearestNeighbors(n_neighbors=min_samples).fit(xs).kneighbors(xs)
        eps = float(np.quantile(kdist[:, -1], DBSCAN_EPS_QUANTILE))
    model = DBSCAN(eps=eps, min_samples=min_samples).fit(xs)
    labels = np.full(len(x), -1, np.int64)
    labels[sample] = model.labels_
    rest = np.setdiff1d(np.arange(len(x)), sample)
    core = model.core_sample_indices_
    if len(rest) and len(core):
        idx, dist = nearest(x[rest], xs[core])
        labels[rest] = np.where(dist <= eps, model.labels_[core][idx], -1)
    return labels, eps


def gmm(x: np.ndarray, k: int, sample: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(k, covariance_type="full", n_init=3, random_state=seed, reg_covar=1e-4)
    model.fit(x[sample])
    return model.predict(x)


def score_split(score: np.ndarray, sample: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Two-component 1-D Gaussian mixture on the photo-ness score; returns (labels, threshold)."""
    from sklearn.mixture import GaussianMixture

    s = score.reshape(-1, 1)
    model = GaussianMixture(2, n_init=3, random_state=seed).fit(s[sample])
    labels = model.predict(s)
    hi = int(np.argmax(model.means_.ravel()))
    high = score[labels == hi]
    threshold = float(high.min()) if len(high) else float("inf")
    return labels, threshold


def photo_clusters(labels: np.ndarray, score: np.ndarray, flat: np.ndarray) -> tuple[list[int], pd.DataFrame]:
    """The rule in the module doc: mean score above the midpoint of cluster means, and not flat."""
    rows = []
    for c in np.unique(labels):
        m = labels == c
        rows.append({"cluster": int(c), "size": int(m.sum()), "mean_score": float(score[m].mean()),
                     "median_flat": float(np.median(flat[m]))})
    table = pd.DataFrame(rows)
    lo, hi = table["mean_score"].min(), table["mean_score"].max()
    mid = (lo + hi) / 2
    table["photo"] = (table["mean_score"] > mid) & (table["median_flat"] < MAX_PHOTO_FLAT) & (hi > lo)
    return [int(c) for c in table.loc[table["photo"], "cluster"]], table


def run_method(data: Data, method: str, features: str | None = None, k: int = 2, seed: int = 0,
               max_sample: int = MAX_SAMPLE, eps: float | None = None,
               min_samples: int = DBSCAN_MIN_SAMPLES) -> Result:
    """One method on one feature space: clusters, the photo clusters, separation, and label metrics."""
    if method not in DEFAULT_FEATURES:
        raise ConfigError(f"clean: --method {method!r} is not one of {', '.join(METHODS)}.")
    features = features or DEFAULT_FEATURES[method]
    if k < 2:
        raise ConfigError(f"clean: --k {k} must be at least 2 (photos and drawings).")
    start = time.perf_counter()
    x = matrix(data, features, seed)
    n = len(x)
    sample = sample_indices(n, max_sample if method in ("agglomerative", "dbscan") else 20_000, seed)
    params: dict = {"method": method, "features": features, "seed": seed, "sample": len(sample)}
    z = None
    if method == "agglomerative":
        labels, z = agglomerative(x, k, sample)
        params.update(k=k, linkage="ward", assign="nearest centroid")
    elif method == "dbscan":
        labels, eps_used = dbscan(x, sample, eps, min_samples)
        params.update(eps=round(eps_used, 6), min_samples=min_samples, assign="nearest core sample within eps")
    elif method == "gmm":
        labels = gmm(x, k, sample, seed)
        params.update(k=k, covariance="full")
    else:
        labels, threshold = score_split(data.score, sample, seed)
        params.update(threshold=round(threshold, 6))
    chosen, table = photo_clusters(labels, data.score, data.feats.stats["flat_fraction"].to_numpy())
    seconds = time.perf_counter() - start
    result = Result(method, features, params, labels, chosen, table, seconds, sample, z)
    result.separation = separation(data, result.quarantined, seed)
    if data.has_labels:
        result.metrics = score_against_labels(data.items["is_photo"].astype(int).to_numpy(), result.quarantined)
    return result


def separation(data: Data, quarantined: np.ndarray, seed: int, size: int = 3000) -> float:
    """Silhouette of the kept/quarantined split in the standardised photo-feature space (-1 if one-sided)."""
    from sklearn.metrics import silhouette_score

    if quarantined.all() or not quarantined.any():
        return -1.0
    x = matrix(data, "photo", seed)
    idx = sample_indices(len(x), size, seed + 1)
    if len(np.unique(quarantined[idx])) < 2:  # keep a rare class in the sample
        idx = np.union1d(idx, np.flatnonzero(quarantined)[:size])
    return float(silhouette_score(x[idx], quarantined[idx].astype(int)))


def score_against_labels(is_photo: np.ndarray, quarantined: np.ndarray) -> dict:
    from sklearn.metrics import f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(is_photo, quarantined, zero_division=0)),
        "recall": float(recall_score(is_photo, quarantined, zero_division=0)),
        "f1": float(f1_score(is_photo, quarantined, zero_division=0)),
        "drawings_lost": int((quarantined & (is_photo == 0)).sum()),
        "drawings_lost_pct": float(100 * (quarantined & (is_photo == 0)).sum() / max(1, (is_photo == 0).sum())),
        "photos_missed": int((~quarantined & (is_photo == 1)).sum()),
    }


# ---------------------------------------------------------------- outputs


def write_outputs(data: Data, result: Result, out: Path, extra: dict | None = None) -> dict:
    """manifest/quarantine/unreadable CSVs, clean.json and the plots for one result."""
    outputs.mark(out, "clean")
    q = result.quarantined
    data.items[~q].to_csv(out / "manifest.csv", index=False)
    quarantine = data.items.loc[q, ["path", "class"]].copy()
    quarantine["cluster"] = result.labels[q]
    quarantine["score"] = np.round(data.score[q], 4)
    means = result.cluster_table.set_index("cluster")["mean_score"]
    quarantine["reason"] = [f"{result.name}: cluster {c} is a photo cluster (mean photo-ness {means[c]:.2f})"
                            for c in quarantine["cluster"]]
    quarantine.to_csv(out / "quarantine.csv", index=False)
    data.unreadable.to_csv(out / "unreadable.csv", index=False)
    plot_clusters(data, result, out)
    info = {
        "source": str(data.root),
        "inventory_digest": data.digest,
        "method": result.method,
        "features": result.features,
        "params": result.params,
        "rule": (f"photo clusters: mean photo-ness above the midpoint of the cluster means and median "
                 f"flat_fraction < {MAX_PHOTO_FLAT}"),
        "photo_clusters": result.photo_clusters,
        "clusters": result.cluster_table.to_dict(orient="records"),
        "n_images": int(len(data.items)),
        "n_kept": int((~q).sum()),
        "n_quarantined": int(q.sum()),
        "n_unreadable": int(len(data.unreadable)),
        "separation": result.separation,
        "seconds": round(result.seconds, 3),
        "metrics": result.metrics,
        **(extra or {}),
    }
    (out / "clean.json").write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    return info


def _json_default(o):
    if isinstance(o, (np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plot_clusters(data: Data, result: Result, out: Path, per_cluster: int = 40, max_clusters: int = 12) -> None:
    """dendrogram.png (agglomerative), score_hist.png, and cluster_<c>.png sample grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research.data.grid import image_grid

    out.mkdir(parents=True, exist_ok=True)
    if result.linkage is not None:
        from scipy.cluster.hierarchy import dendrogram

        fig, ax = plt.subplots(figsize=(10, 5))
        dendrogram(result.linkage, truncate_mode="lastp", p=30, ax=ax, show_contracted=True)
        ax.set_title(f"{result.name}: Ward dendrogram of a {len(result.sample)}-image sample (last 30 merges)")
        ax.set_xlabel("cluster (size in parentheses)")
        ax.set_ylabel("Ward distance")
        fig.tight_layout()
        fig.savefig(out / "dendrogram.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    q = result.quarantined
    bins = np.linspace(data.score.min(), data.score.max(), 60)
    ax.hist(data.score[~q], bins=bins, alpha=0.7, label=f"kept ({(~q).sum()})", log=True)
    ax.hist(data.score[q], bins=bins, alpha=0.7, label=f"quarantined ({q.sum()})", log=True)
    ax.set_xlabel("photo-ness score")
    ax.set_ylabel("images (log)")
    ax.set_title(f"{result.name}: photo-ness of kept vs quarantined images")
    ax.legend(loc="upper right")  # "best" searches every point: slow, and it warns
    fig.tight_layout()
    fig.savefig(out / "score_hist.png", dpi=100)
    plt.close(fig)
    for old in out.glob("cluster_*.png"):
        old.unlink()
    rng = np.random.default_rng(0)
    table = result.cluster_table.sort_values(["photo", "size"], ascending=False).head(max_clusters)
    for row in table.itertuples():
        members = np.flatnonzero(result.labels == row.cluster)
        pick = rng.choice(members, min(per_cluster, len(members)), replace=False)
        kind = "PHOTO" if row.photo else "kept"
        title = (f"{result.name} cluster {row.cluster} ({kind}): {row.size} images, "
                 f"mean photo-ness {row.mean_score:.2f}")
        paths = [data.root / data.items["path"].iloc[i] for i in pick]
        image_grid([(title, paths)], cols=10).save(out / f"cluster_{row.cluster}.png")


def methods_table(results: list[Result], best: Result) -> pd.DataFrame:
    rows = []
    for r in results:
        rows.append({
            "method": r.method, "features": r.features, "chosen": r is best,
            "clusters": len(r.cluster_table), "quarantined": int(r.quarantined.sum()),
            "separation": round(r.separation, 4), **{k: v for k, v in r.metrics.items()},
            "seconds": round(r.seconds, 2),
        })
    return pd.DataFrame(rows)


def log_to_mlflow(data: Data, results: list[Result], best: Result, out: Path, auto: bool) -> str:
    import mlflow

    from research import tracking

    exp = tracking.experiment_id(EXPERIMENT)
    common = {"data_dir": str(data.root), "inventory_digest": data.digest, "n_images": len(data.items)}
    with mlflow.start_run(experiment_id=exp, run_name=f"clean-{data.root.name}-{'auto' if auto else best.name}",
                          tags=tracking.run_tags()) as run:
        mlflow.log_params({**common, **_flat_params(best), "auto": auto})
        mlflow.log_metrics(_result_metrics(best, len(data.unreadable)))
        mlflow.log_dict({"clusters": best.cluster_table.to_dict(orient="records")}, "clusters.json")
        for path in sorted(out.iterdir()):
            if path.is_file():
                mlflow.log_artifact(str(path))
        if auto:
            for r in results:
                with mlflow.start_run(experiment_id=exp, run_name=r.name, nested=True,
                                      tags=tracking.run_tags()):
                    mlflow.log_params({**common, **_flat_params(r)})
                    mlflow.log_metrics(_result_metrics(r, len(data.unreadable)))
                    mlflow.log_dict({"clusters": r.cluster_table.to_dict(orient="records")}, "clusters.json")
                    folder = out / "methods" / r.name
                    if folder.is_dir():
                        mlflow.log_artifacts(str(folder))
        return run.info.run_id


def _flat_params(r: Result) -> dict:
    return {k: v for k, v in r.params.items()} | {"photo_clusters": ",".join(map(str, r.photo_clusters))}


def _result_metrics(r: Result, n_unreadable: int) -> dict:
    m = {"n_quarantined": int(r.quarantined.sum()), "n_kept": int((~r.quarantined).sum()),
         "n_clusters": len(r.cluster_table), "n_unreadable": n_unreadable,
         "separation": r.separation, "seconds": r.seconds}
    for row in r.cluster_table.itertuples():
        m[f"cluster_size_{'noise' if row.cluster < 0 else row.cluster}"] = row.size
    return m | r.metrics


def print_table(table: pd.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="photo detection by method")
    cols = [c for c in ("method", "features", "clusters", "quarantined", "separation", "precision", "recall",
                        "f1", "drawings_lost", "photos_missed", "seconds", "chosen") if c in table.columns]
    for c in cols:
        t.add_column(c, justify="left" if c in ("method", "features") else "right")
    for row in table.to_dict(orient="records"):
        t.add_row(*[_fmt(row[c]) for c in cols], style="bold" if row.get("chosen") else None)
    console = Console()
    Console(width=max(console.width, 140)).print(t)


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "*" if v else ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="class-per-folder tree (read only), e.g. data/raw/emoji20")
    parser.add_argument("--method", default="auto", choices=METHODS,
                        help="clustering method; auto runs every candidate and picks without labels")
    parser.add_argument("--features", default=None, choices=FEATURES,
                        help="raw 32x32 pixels, pca (100 components) or photo statistics "
                             f"(default per method: {DEFAULT_FEATURES})")
    parser.add_argument("--k", type=int, default=2, help="clusters for agglomerative / gmm (default 2)")
    parser.add_argument("--eps", type=float, default=None, help="DBSCAN eps (default: from the k-distance quantile)")
    parser.add_argument("--min-samples", type=int, default=DBSCAN_MIN_SAMPLES, help="DBSCAN min_samples")
    parser.add_argument("--sample", type=int, default=MAX_SAMPLE,
                        help="images clustered by agglomerative/DBSCAN; the rest are assigned (bounded memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: CPU count, max 8)")
    parser.add_argument("--out", default=None, help="output folder (default data/clean/<DIR's name>)")
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")


def run(args) -> int:
    info = clean(args.dir, method=args.method, features=args.features, k=args.k, out=args.out, seed=args.seed,
                 max_sample=args.sample, eps=args.eps, min_samples=args.min_samples, workers=args.workers,
                 log=not args.no_log)
    print_table(pd.DataFrame(info["table"]))
    print(f"kept {info['n_kept']}, quarantined {info['n_quarantined']}, unreadable {info['n_unreadable']} "
          f"-> {info['out']} (method {info['method']}, features {info['features']})")
    return 0
