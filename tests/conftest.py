"""Shared fixtures: a private MLflow store and tracking home per test, small real images on disk,
dataset versions (a session one built by `split`, a hand-written one of mixed image modes), two real
trained runs (trained once per session) in a module's private copy of their store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from research.config import TrainConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# the npm styles' tarballs: one cache for every test, wherever it runs (the first build fetches them with npm,
# as `make demo` does; later builds, here and in the demo, read them offline)
os.environ.setdefault("RESEARCH_SOURCES_DIR", str(Path(__file__).resolve().parent.parent / "data" / "sources"))


def npm_styles_ready() -> bool:
    """The npm styles can be built here: npm is installed, or every pinned tarball is already in the cache."""
    import shutil

    from research.data.emoji import STYLES

    cache = Path(os.environ["RESEARCH_SOURCES_DIR"])
    return shutil.which("npm") is not None or all((cache / s.npm.tarball).is_file() for s in STYLES.values() if s.npm)


# the embedded dataset's default build needs them; on a machine with neither, those tests say why they skip
needs_npm_styles = pytest.mark.skipif(not npm_styles_ready(), reason="no npm and no cached npm tarballs in "
                                      "data/sources: the default build of the embedded dataset needs them")


# a test that reads one of these is slow: the fixture trains runs, runs studies or logs a store of runs first
SLOW_FIXTURES = {"trained_store", "store", "studies", "logged", "left_out"}


# the modules that take longest (seconds on 2 cores, `pytest --durations`), started first: two xdist workers
# (`make test`: --dist loadscope --no-loadscope-reorder) then end together instead of one finishing a long
# module alone. A module not listed keeps its place after these; a stale entry only changes the order.
LONGEST_FIRST = ("test_gpu_e2e", "test_shipped_sweeps", "test_error_boundary", "test_postgres", "test_browser",
                 "test_concurrency", "test_ctrl_c", "test_sweep", "test_honest_numbers", "test_killed_training",
                 "test_files_read_back", "test_distill", "test_tracking_unreachable", "test_report",
                 "test_killed_worker", "test_artifacts")


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process, as its `python -m research` children have (tests/reliability): the
    tests' tensors are tiny (32 px, batch 8), and a second OpenMP thread spin-waiting for a core that a worker,
    a server or another job holds makes a step 3-4x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A session's expensive read-only input, built once for the whole run: `build(folder)` fills the folder the
    first time; every later caller, in this process or in another xdist worker of the same run, waits on a file
    lock and gets the finished folder. A build that failed left no marker and is retried by the next caller."""
    import shutil

    from research.locks import file_lock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the workers' common root
    folder, done = shared / name, shared / f"{name}.done"
    with file_lock(shared / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A folder holding an empty MLflow sqlite store (`mlruns/mlflow.db`, every table made): MLflow's schema
    migration costs about a second a store, so each test's store is a copy of this one."""

    def build(root: Path) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        home = root / "mlruns"
        home.mkdir()
        store = SqlAlchemyStore(f"sqlite:///{home / 'mlflow.db'}", (home / "artifacts").as_uri())
        store.engine.dispose()

    return built_once(tmp_path_factory, "empty-store", build)


def new_mlflow_store(root: Path, mp: pytest.MonkeyPatch) -> str:
    """Point MLflow and the project at `root/mlruns/mlflow.db` (a store there or none yet)."""
    import mlflow

    home = root / "mlruns"
    home.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mp.setenv("RESEARCH_MLRUNS", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@pytest.fixture
def mlflow_store(empty_store, tmp_path, monkeypatch) -> str:
    """A temporary sqlite tracking store + registry (a copy of `empty_store`); artifacts under the test's tmp dir."""
    import mlflow

    copy_store(empty_store, tmp_path)
    yield new_mlflow_store(tmp_path, monkeypatch)
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def fresh_mlflow_store(tmp_path, monkeypatch) -> str:
    """`mlflow_store` with no database yet: the first command creates it (for tests of what that creation shows)."""
    import mlflow

    yield new_mlflow_store(tmp_path, monkeypatch)
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
    """A real dataset version (3 imbalanced classes of 48 px PNGs, recipe v1) built by the split stage, once a run."""
    from research.data.split import build_version

    def build(root: Path) -> None:
        rng = np.random.default_rng(0)
        source = root / "src"
        for cls, kind, count in (("circles", "circle", 20), ("squares", "square", 15), ("stripes", "stripe", 10)):
            (source / cls).mkdir(parents=True)
            for i in range(count):
                draw_image(kind, 48, rng).save(source / cls / f"{cls}_{i:03d}.png")
        clean = write_clean_dir(source, root / "clean")
        assert build_version(clean, "tiny", recipe="v1", out_root=root / "versions", progress=False) == \
            root / "versions" / "tiny"

    return built_once(tmp_path_factory, "tiny", build) / "versions" / "tiny"


def make_version(root: Path, counts: dict[str, dict[str, int]], name: str = "vt", seed: int = 0) -> Path:
    """A version dir as `split` writes it: {split}/{class}/*.png + manifest.csv + version.json.

    Images have mixed sizes and modes (RGB, RGBA with transparency, palette, grayscale) so the
    decode rule is exercised.
    """
    import hashlib
    import json

    import pandas as pd

    rng = np.random.default_rng(seed)
    vdir = root / name
    rows = []
    kinds = ["square", "circle", "photo"]
    for split, per_class in counts.items():
        for ci, (cls, n) in enumerate(sorted(per_class.items())):
            (vdir / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = draw_image(kinds[(ci + i) % 3], int(rng.integers(24, 64)), rng)
                mode = ["RGB", "RGBA", "P", "L"][i % 4]
                if mode == "RGBA":
                    im = im.convert("RGBA")
                    a = np.asarray(im).copy()
                    a[: a.shape[0] // 3, :, 3] = 0  # a transparent band: must come out white
                    im = Image.fromarray(a, "RGBA")
                else:
                    im = im.convert(mode)
                rel = f"{split}/{cls}/{cls}_{i:03d}.png"
                im.save(vdir / rel)
                rows.append({"path": rel, "class": cls, "split": split, "group": f"{cls}{i}",
                             "sha256": hashlib.sha256((vdir / rel).read_bytes()).hexdigest(),
                             "source_path": rel, "augmented_from": ""})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(vdir / "manifest.csv", index=False)
    classes = sorted({r["class"] for r in rows})
    digest = hashlib.sha256("".join(sorted(r["path"] + r["sha256"] for r in rows)).encode()).hexdigest()
    (vdir / "version.json").write_text(json.dumps({
        "name": name, "recipe": "test", "seed": seed, "classes": classes,
        "counts": {s: dict(c) for s, c in counts.items()}, "source_digest": "x", "digest": digest,
        "image_mode": "RGB"}))
    return vdir


@pytest.fixture
def version(tmp_path):
    """The hand-written version (make_version) of the cache and loader tests: 39 / 11 / 7 images, 3 classes."""
    from research.data.versions import load_version

    counts = {"train": {"a": 24, "b": 6, "c": 9}, "val": {"a": 5, "b": 3, "c": 3}, "test": {"a": 3, "b": 2, "c": 2}}
    return load_version(make_version(tmp_path, counts))


# ------------------------------------------------------------------------------ a private store with two runs

EXPERIMENT = "test-registry"  # the experiment of the store fixture's runs


def tiny_cfg(version_dir: Path, tmp: Path, **changes) -> TrainConfig:
    from research import configfile
    from research.config import TrainConfig

    # lr 1e-3: AdamW at 0.05 diverges on this tiny set (test F1 at chance), and `good` must beat `weak`
    base = dict(model="resnet18", dataset=str(version_dir), image_size=32, epochs=2, batch_size=8, lr=1e-3,
                optimizer="adamw", lr_schedule="constant", experiment=EXPERIMENT, checkpoint_dir=str(tmp / "ckpt"),
                device="cpu", seed=0)
    return configfile.from_dict(TrainConfig, base | changes)


class Store:
    """What the module's fixture leaves: the store URI, the version dir, the two runs' ids."""

    def __init__(self, uri: str, version: Path, good: str, weak: str, workdir: Path):
        self.uri, self.version, self.good, self.weak, self.workdir = uri, version, good, weak, workdir


def private_store(mp: pytest.MonkeyPatch, root: Path) -> str:
    """The `mlflow_store` fixture's environment, for a module-scoped store."""
    mp.chdir(root)  # the cached loader writes data/cache/ (and `report` reports/) under the working directory
    return new_mlflow_store(root, mp)


@pytest.fixture(scope="session")
def trained_store(tiny_version, empty_store, tmp_path_factory) -> Store:
    """Two real training runs, trained once a run into a store that no test opens: `store` copies it.

    resnet18, 32 px, on the session's tiny dataset version: `good` (2 epochs at lr 1e-3) and `weak` (1 epoch at
    a learning rate too small to learn).
    """
    import json

    import mlflow

    from research.train import train

    def build(root: Path) -> None:
        copy_store(empty_store, root)
        with pytest.MonkeyPatch.context() as mp:
            private_store(mp, root)
            runs = {name: train(tiny_cfg(tiny_version, root, run_name=name, **changes)).run_id
                    for name, changes in (("good", {}), ("weak", {"epochs": 1, "lr": 1e-7}))}
            while mlflow.active_run() is not None:
                mlflow.end_run()
        (root / "runs.json").write_text(json.dumps(runs))

    root = built_once(tmp_path_factory, "trained", build)
    runs = json.loads((root / "runs.json").read_text())
    return Store(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", tiny_version, runs["good"], runs["weak"], root)


def copy_store(template: Path, root: Path) -> None:
    """A byte copy of a store's folder (sqlite, artifacts, the data/cache its runs wrote) whose database points at
    the copy: every text value naming the template's folder (artifact locations, the checkpoint_dir param) is
    rewritten, so nothing a test writes reaches the template or another module's copy."""
    import shutil
    import sqlite3

    shutil.copytree(template, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("mlflow.db*"))
    old, new = str(template), str(root)
    src, db = sqlite3.connect(template / "mlruns" / "mlflow.db"), sqlite3.connect(root / "mlruns" / "mlflow.db")
    try:
        src.backup(db)
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in [c[1] for c in db.execute(f'PRAGMA table_info("{table}")')
                           if "CHAR" in c[2].upper() or "TEXT" in c[2].upper()]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE "{column}" LIKE ?',
                           (old, new, f"%{old}%"))
        db.commit()
    finally:
        src.close()
        db.close()


@pytest.fixture(scope="module")
def store(trained_store, tmp_path_factory):
    """The session's two trained runs (`trained_store`) in the module's own copy of their store
    (tests/test_registry.py, test_runs.py, test_ensemble.py, test_calibration.py): a module registers, tags and
    adds runs there without another module seeing it."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    copy_store(trained_store.workdir, root)
    with pytest.MonkeyPatch.context() as mp:
        uri = private_store(mp, root)
        yield Store(uri, trained_store.version, trained_store.good, trained_store.weak, root)
        while mlflow.active_run() is not None:
            mlflow.end_run()
