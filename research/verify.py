"""What each file the project reads back must hold, checked before it is used: one place for those rules.

A file written by an earlier command (or edited, truncated or deleted since) is never trusted as it is:

- a cache is rebuilt when it fails its check: `stored_arrays` says why stored activations (`.npy` files and
  `key.json`) cannot be served, as `research.inputs.decoded.check` does for decoded images;
- anything else is one ConfigError that names the object (run, model, version, file) and the fix:
  `model_meta` (a model's model_meta.json, against the model it describes), `run_config` (a run's
  config.yaml) and `version_files` (a dataset version's files against the sha256 its manifest records, which
  its digest covers).

Every module may import this one: it imports nothing heavy at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from research.errors import ConfigError

# ------------------------------------------------------------------------------ caches: a reason, or None


def npy_shape(file: Path) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, None) for a whole `.npy` file, else (None, why not): missing, not an .npy header, or shorter or
    longer than its header says (a truncated copy, a killed write)."""
    import numpy as np

    try:
        with open(file, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            size = os.fstat(f.fileno()).st_size
            want = f.tell() + math.prod(shape) * dtype.itemsize
    except FileNotFoundError:
        return None, f"{file.name} is missing"
    except (OSError, ValueError, EOFError) as exc:
        return None, f"{file.name} has no valid .npy header ({str(exc)[:80]})"
    if size != want:
        return None, f"{file.name} holds {size} bytes, its header says {want} (truncated or overwritten)"
    return tuple(shape), None


def stored_arrays(path: Path, key: dict[str, Any], rows: dict[str, int], views: int) -> str | None:
    """Why the stored activations at `path` cannot be served, or None: key.json must equal `key`, and
    train.npy ([1 + views, N_train, ...]), val.npy and test.npy ([N, ...]) must be whole, with the split's rows
    and one feature shape."""
    try:
        stored = json.loads((path / "key.json").read_text())
    except FileNotFoundError:
        return "key.json missing (never built, or killed mid-write)"
    except (OSError, ValueError) as exc:
        return f"key.json unreadable ({str(exc)[:80]})"
    if stored != key:
        return "key.json differs from this run's key"
    shapes = {}
    for split in ("train", "val", "test"):
        shape, why = npy_shape(path / f"{split}.npy")
        if why:
            return why
        shapes[split] = shape
    want = {"train": (1 + views, rows["train"]), "val": (rows["val"],), "test": (rows["test"],)}
    for split, lead in want.items():
        if shapes[split][: len(lead)] != lead:
            return f"{split}.npy has shape {shapes[split]}, expected {lead} + the feature shape"
    if len({shapes[s][len(lead):] for s, lead in want.items()}) > 1:
        return f"the splits' feature shapes differ ({', '.join(str(s) for s in shapes.values())})"
    return None


# ------------------------------------------------------------------------------ everything else: one error


def model_meta(meta: Any, where: str, module: Any = None) -> dict[str, Any]:
    """`meta` (a model's model_meta.json) if this code can serve what it describes; else a ConfigError naming
    `where` (the model, e.g. `models:/NAME@champion` or `run <id>`), the bad value and the fix. With `module`,
    its classes must be as many as the module's outputs."""
    from research.data.image import INTERPOLATIONS

    fix = (f"its model_meta.json was damaged or edited; register the model again from its run (python -m research "
           f"promote --run RUN_ID), or restore the file. ({where})")

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: model_meta.json {what}; {fix}")

    if not isinstance(meta, dict):
        raise bad(f"is not a JSON object ({type(meta).__name__})")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise bad(f"classes={str(classes)[:80]!r} is not a list of two or more class names")
    seen = {c for c in classes if classes.count(c) > 1}
    if seen:
        raise bad(f"names class(es) {sorted(seen)} twice: its predictions could not say which is meant")
    size = meta.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise bad(f"image_size={size!r} is not a positive whole number of pixels")
    if meta.get("interpolation") not in INTERPOLATIONS:
        raise bad(f"interpolation={meta.get('interpolation')!r} is not one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        values = meta.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(_number(v) for v in values)):
            raise bad(f"{key}={values!r} needs one number per RGB channel (3 numbers)")
    if any(float(s) <= 0 for s in meta["std"]):
        raise bad(f"std={meta['std']!r} must be positive")
    temperature = meta.get("temperature", 1.0)
    if not (_number(temperature) and math.isfinite(float(temperature)) and float(temperature) > 0):
        raise bad(f"temperature={temperature!r} is not a positive number")
    outputs = output_classes(module) if module is not None else None
    if outputs is not None and outputs != len(classes):
        raise bad(f"lists {len(classes)} classes, but the model has {outputs} outputs")
    return meta


def model_files(model_dir: str | Path, where: str) -> None:
    """A logged torch model's folder holds its weights (`data/model.pth`, or `model.pt2` in MLflow's other
    format) and its MLmodel; else a ConfigError naming `where` (the model), before a loader tries its fallbacks."""
    data = Path(model_dir) / "data"
    weights = (data / "model.pth").is_file() or (data / "model.pt2").is_file()
    missing = [name for name, there in (("MLmodel", (Path(model_dir) / "MLmodel").is_file()),
                                        ("data/model.pth", weights)) if not there]
    if missing:
        raise ConfigError(f"{where}: its file(s) {', '.join(missing)} are missing from the artifact store (deleted, or "
                          "a copy that stopped half way), so it cannot be loaded; register the model again from its "
                          "run (python -m research promote --run RUN_ID --force), or promote another run.")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def output_classes(module: Any) -> int | None:
    """How many classes a classifier outputs: its last Linear layer's width (None when it has none)."""
    from torch import nn

    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else int(last.out_features)


def run_config(client, run_id: str, role: str) -> dict[str, Any]:
    """A training run's resolved config (its config.yaml artifact, as a dict); a ConfigError naming the run and
    `role` (why it is read: "the recipe of styles --run", "a member of the ensemble") when it has none."""
    import tempfile

    import mlflow
    import yaml

    names = {f.path for f in client.list_artifacts(run_id)}
    if "config.yaml" not in names:
        tags = client.get_run(run_id).data.tags
        what = (f"an ensemble of {tags['ensemble_of']}, not a training run" if "ensemble_of" in tags
                else "it was not trained by `python -m research train` (or its config was deleted)")
        raise ConfigError(f"Run {run_id} has no config.yaml ({what}), and {role} needs one: pass a run that "
                          "`python -m research train` or a sweep trained (its id is in `python -m research runs`).")
    with tempfile.TemporaryDirectory(prefix="research-config-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp)
        try:
            data = yaml.safe_load(Path(local).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Run {run_id}: its config.yaml is not valid YAML ({' '.join(str(exc).split())[:120]}); "
                              f"{role} cannot use it: pass another run.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Run {run_id}: its config.yaml holds {type(data).__name__}, not a config; {role} cannot "
                          "use it: pass another run.")
    return data


def version_files(version, workers: int | None = None) -> None:
    """Every file a dataset version's manifest lists is there with the sha256 it records; else a ConfigError
    naming the version, the file and the fix (the version was edited after `split`)."""
    from research.data.pool import pmap

    frame = version.manifest
    if "sha256" not in frame.columns:  # a hand-made version without hashes: nothing to check against
        return
    paths = [Path(version.dir) / p for p in frame["path"]]
    found = pmap(_sha256, paths, workers=min(4, workers or 4), threads=True, inline_below=64)
    bad = [(rel, sha) for rel, sha, want in zip(frame["path"], found, frame["sha256"]) if sha != want]
    if bad:
        rel, sha = bad[0]
        what = "is missing" if sha is None else "differs from the sha256 its manifest records"
        source = version.info.get("source") or "<clean dir>"
        raise ConfigError(f"Version {version.name} at {version.dir}: {rel} {what}"
                          + (f" ({len(bad) - 1} more file(s) too)" if len(bad) > 1 else "")
                          + "; the version was changed after `split`, so its digest no longer describes it. Rebuild "
                          f"it: python -m research split {source} --version {version.name} --force (with its "
                          "recipe).")


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return ""
