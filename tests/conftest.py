"""Shared fixtures: a private MLflow store and tracking home per test, small real images on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A temporary sqlite tracking store + registry; artifacts under the test's tmp dir."""
    home = tmp_path / "mlruns"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("RESEARCH_MLRUNS", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def draw_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A small real image: a flat-colour 'drawing' (few colours, hard edges) or a noisy 'photo'."""
    if kind == "photo":
        base = rng.normal(128, 40, (size, size, 3)).cumsum(axis=1) / np.arange(1, size + 1)[None, :, None]
        arr = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "RGB")
    # a few flat-colour shapes of the class's kind at random places: distinct drawings, same class
    arr = np.full((size, size, 3), 255 - rng.integers(0, 30), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(int(rng.integers(2, 5))):
        colour = rng.integers(0, 200, 3)
        cy, cx = rng.integers(4, size - 4, 2)
        r = int(rng.integers(3, size // 3))
        if kind == "circle":
            arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
        elif kind == "stripe":  # a thick line at a random angle
            angle = rng.uniform(0, np.pi)
            dist = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle))
            arr[dist < max(2, r // 3)] = colour
        else:  # "square" and anything else
            arr[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = colour
    return Image.fromarray(arr, "RGB")


@pytest.fixture
def make_tree(tmp_path):
    """Factory: a class-per-folder tree of PNGs, `{class: (kind, count)}` -> root path."""

    def _make(spec: dict[str, tuple[str, int]], size: int = 48, seed: int = 0, name: str = "src") -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for cls, (kind, count) in spec.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_image(kind, size, rng).save(root / cls / f"{cls}_{i:03d}.png")
        return root

    return _make


def write_clean_dir(source: Path, out: Path) -> Path:
    """A clean dir (manifest.csv + clean.json, the clean stage's contract) listing every file of `source`."""
    import hashlib
    import json

    import pandas as pd

    rows = []
    for f in sorted(source.rglob("*.png")):
        rel = f.relative_to(source).as_posix()
        rows.append({"path": rel, "class": rel.split("/")[0], "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "clean.json").write_text(json.dumps({"source": str(source.resolve()), "method": "none"}))
    return out


@pytest.fixture(scope="session")
def tiny_version(tmp_path_factory) -> Path:
    """A real dataset version (3 imbalanced classes of 48 px PNGs, recipe v1) built by the split stage."""
    from research.data.split import build_version

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    source = root / "src"
    for cls, kind, count in (("circles", "circle", 20), ("squares", "square", 15), ("stripes", "stripe", 10)):
        (source / cls).mkdir(parents=True)
        for i in range(count):
            draw_image(kind, 48, rng).save(source / cls / f"{cls}_{i:03d}.png")
    clean = write_clean_dir(source, root / "clean")
    return build_version(clean, "tiny", recipe="v1", out_root=root / "versions", progress=False)
