"""EDA of a class-per-folder tree: the seed's Mission 1 as one command, logged to MLflow.

`python -m research eda DIR [--out reports/eda/<name>]` writes

- `class_counts.png`: images per class, sorted, imbalance ratio (largest / smallest) in the title;
- `samples.png`: 10 random images per class (seeded), one labelled row per class;
- `sizes.png`: heatmap of width x height counts (binned);
- `formats.csv`: count of images per (format, mode), also printed as a rich table;
- `summary.json`: counts, imbalance ratio, size quantiles, unreadable files.

`--out` may be neither inside DIR nor another stage's folder (`outputs.check_folder`).
Everything is read through `scan` (read only) and logged as one run of experiment `eda` with
params `data_dir` and `inventory_digest`, metrics `n_images`, `n_classes`, `imbalance_ratio`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd

from research.data import outputs
from research.data.grid import image_grid
from research.errors import ConfigError

EXPERIMENT = "eda"
SAMPLES_PER_CLASS = 10


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- the plots


def plot_class_counts(counts: pd.Series, path: Path) -> None:
    plt = _plt()
    counts = counts.sort_values(ascending=False)
    ratio = counts.max() / max(counts.min(), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(counts) + 2), 5.5))
    ax.bar(range(len(counts)), counts.values, color="tab:blue")
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels(counts.index, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    for i, v in enumerate(counts.values):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("images")
    ax.set_xlabel("class")
    ax.set_title(f"Images per class ({counts.sum()} images, {len(counts)} classes); "
                 f"imbalance ratio {ratio:.1f} (largest / smallest)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sizes(good: pd.DataFrame, path: Path, bins: int = 30) -> None:
    plt = _plt()
    w, h = good["width"].to_numpy(), good["height"].to_numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    lo, hi = max(1, min(w.min(), h.min())), max(w.max(), h.max(), 2)
    if hi / lo > 20:  # sizes spanning decades read better on log axes
        edges = np.geomspace(lo, hi * 1.001, bins + 1)
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1)
    counts, xe, ye = np.histogram2d(w, h, bins=[edges, edges])
    masked = np.ma.masked_equal(counts.T, 0)
    mesh = ax.pcolormesh(xe, ye, masked, cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="images")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Image sizes (width x height), {len(good)} images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_rows(root: Path, good: pd.DataFrame, seed: int, n: int = SAMPLES_PER_CLASS):
    rng = random.Random(seed)
    rows = []
    for cls, g in sorted(good.groupby("class"), key=lambda kv: kv[0]):
        paths = sorted(g["path"])
        pick = rng.sample(paths, min(n, len(paths)))
        rows.append((f"{cls} ({len(paths)})", [root / p for p in pick]))
    return rows


def formats_table(good: pd.DataFrame) -> pd.DataFrame:
    t = good.groupby(["format", "mode"]).size().reset_index(name="images")
    return t.sort_values("images", ascending=False).reset_index(drop=True)


def summarise(root: Path, inv: pd.DataFrame, digest: str) -> dict:
    in_classes = inv[inv["class"] != ""]
    good = in_classes[in_classes["ok"]]
    counts = good["class"].value_counts()
    q = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]
    quant = lambda s: {f"q{int(x * 100):02d}": float(s.quantile(x)) for x in q} if len(s) else {}
    bad = in_classes[~in_classes["ok"]]
    return {
        "data_dir": str(root.resolve()),
        "inventory_digest": digest,
        "n_files": int(len(inv)),
        "n_images": int(len(good)),
        "n_classes": int(len(counts)),
        "class_counts": {k: int(v) for k, v in counts.sort_values(ascending=False).items()},
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "width_quantiles": quant(good["width"]),
        "height_quantiles": quant(good["height"]),
        "formats": {f"{f}/{m}": int(n) for f, m, n in formats_table(good).itertuples(index=False)},
        "n_unreadable": int(len(bad)),
        "unreadable": bad[["path", "error"]].to_dict(orient="records"),
        "outside_class_folders": inv.loc[inv["class"] == "", "path"].tolist(),
    }


def print_formats(table: pd.DataFrame, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['n_images']} images, {summary['n_classes']} classes, "
                    f"imbalance {summary['imbalance_ratio']:.1f}, unreadable {summary['n_unreadable']}")
    for c in table.columns:
        t.add_column(c, justify="right" if c == "images" else "left")
    for row in table.itertuples(index=False):
        t.add_row(*map(str, row))
    Console().print(t)


# ---------------------------------------------------------------- the stage


@outputs.holding
def run_eda(root: str | Path, out: str | Path | None = None, seed: int = 0, log: bool = True,
            workers: int | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Plots + summary of a class-per-folder tree under `out`; returns (out, summary)."""
    from research.data.scan import inventory_digest, scan

    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"eda: '{root}' is not a folder; pass the root of a class-per-folder tree "
                          "(e.g. data/raw/emoji20, built by `python -m research data build`).")
    out = Path(out) if out else Path("reports/eda") / root.resolve().name
    outputs.check_folder("eda", out, [root])
    outputs.claim(out, "eda")
    inv = scan(root, workers=workers, progress=progress)
    digest = inventory_digest(inv)
    good = inv[(inv["class"] != "") & inv["ok"]]
    if good.empty:
        raise ConfigError(f"eda: no readable images in class folders under '{root}' "
                          f"({len(inv)} files found); expected <root>/<class>/<image>.")
    summary = summarise(root, inv, digest)
    outputs.mark(out, "eda")
    plot_class_counts(good["class"].value_counts(), out / "class_counts.png")
    image_grid(sample_rows(root, good, seed), cols=SAMPLES_PER_CLASS, label_w=190).save(out / "samples.png")
    plot_sizes(good, out / "sizes.png")
    table = formats_table(good)
    table.to_csv(out / "formats.csv", index=False)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log:
        summary["run_id"] = log_to_mlflow(out, summary)
    return out, summary


def log_to_mlflow(out: Path, summary: dict) -> str:
    import mlflow

    from research import tracking

    exp = tracking.experiment_id(EXPERIMENT)
    name = Path(summary["data_dir"]).name
    with mlflow.start_run(experiment_id=exp, run_name=f"eda-{name}", tags=tracking.run_tags()) as run:
        mlflow.log_params({"data_dir": summary["data_dir"], "inventory_digest": summary["inventory_digest"]})
        mlflow.log_metrics({k: float(summary[k]) for k in ("n_images", "n_classes", "imbalance_ratio", "n_unreadable")})
        mlflow.log_artifacts(str(out))
        return run.info.run_id


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="class-per-folder tree (read only), e.g. data/raw/emoji20")
    parser.add_argument("--out", default=None, help="output folder (default reports/eda/<DIR's name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random sample images")
    parser.add_argument("--workers", type=int, default=None, help="scan processes (default: CPU count)")
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")


def run(args) -> int:
    out, summary = run_eda(args.dir, out=args.out, seed=args.seed, log=not args.no_log, workers=args.workers)
    print_formats(pd.read_csv(out / "formats.csv"), summary)
    for item in summary["unreadable"]:
        print(f"unreadable: {item['path']}: {item['error']}")
    print(f"wrote {out} in {summary['seconds']:.1f} s")
    return 0
