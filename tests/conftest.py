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
    arr = np.full((size, size, 3), 255, np.uint8)
    colour = rng.integers(0, 200, 3)
    a, b = sorted(rng.integers(2, size - 2, 2))
    if kind == "circle":
        yy, xx = np.mgrid[:size, :size]
        arr[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (b - a + 4) ** 2 / 4] = colour
    else:  # "square" and anything else
        arr[a : b + 2, a : b + 2] = colour
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
