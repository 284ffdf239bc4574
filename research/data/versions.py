"""Read a dataset version (data/versions/<name>/) for training: splits, class names, MLflow dataset.

A version is what `python -m research split` writes: `{train,val,test}/<class>/<file>`,
`manifest.csv` (path relative to the version dir, class, split, group, sha256, source_path,
augmented_from) and `version.json` (name, recipe, seed, classes, counts, source_digest,
digest, image_mode). Classes are sorted names, as torchvision's ImageFolder orders them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from research.data.image import SPLITS
from research.errors import ConfigError


@dataclasses.dataclass
class Version:
    name: str
    dir: Path
    classes: list[str]
    manifest: pd.DataFrame
    digest: str
    info: dict[str, Any]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def split_frame(self, split: str) -> pd.DataFrame:
        """Manifest rows of one split (sorted by path), with `file` (absolute path) and `label` (class index)."""
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}.")
        rows = self.manifest[self.manifest["split"] == split].sort_values("path", ignore_index=True)
        return rows.assign(
            file=[str(self.dir / p) for p in rows["path"]],
            label=rows["class"].map(self.class_to_idx).astype(int),
        )

    def samples(self, split: str) -> list[tuple[str, int]]:
        """(absolute file path, class index) pairs, ImageFolder's `samples` format."""
        frame = self.split_frame(split)
        return list(zip(frame["file"], frame["label"].tolist()))

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in class order (0 for a class absent from the split)."""
        frame = self.split_frame(split)
        counts = frame.groupby("class").size()
        return [int(counts.get(c, 0)) for c in self.classes]


def _not_found(name: str, where: Path) -> ConfigError:
    return ConfigError(
        f"Dataset version {name!r} not found ({where / 'version.json'} is missing). Build it with "
        f"`python -m research split data/clean/<name> --version {Path(name).name}` "
        f"(shipped recipes v1..v5 are picked by the version name)."
    )


def load_version(name_or_dir: str | Path, root: str | Path = "data/versions") -> Version:
    """A version by name under `root`, or by its directory."""
    candidate = Path(name_or_dir)
    directory = candidate if (candidate / "version.json").is_file() else Path(root) / str(name_or_dir)
    if not (directory / "version.json").is_file() or not (directory / "manifest.csv").is_file():
        raise _not_found(str(name_or_dir), directory)
    info = json.loads((directory / "version.json").read_text())
    manifest = pd.read_csv(directory / "manifest.csv", dtype=str, keep_default_na=False)
    missing = sorted({"path", "class", "split"} - set(manifest.columns))
    if missing:
        raise ConfigError(f"{directory / 'manifest.csv'} is not a dataset version's manifest (no {', '.join(missing)} "
                          f"column): another command overwrote it. Delete {directory} and rebuild it with "
                          "`python -m research split`.")
    return Version(
        name=info.get("name", directory.name),
        dir=directory.resolve(),
        classes=list(info["classes"]),
        manifest=manifest,
        digest=info["digest"],
        info=info,
    )


def mlflow_dataset(version: Version, split: str = "train"):
    """An `mlflow.data` dataset of one split's manifest rows; its digest is the version digest.

    Log it with `mlflow.log_input(ds, context=split)` so the run records exactly which files it saw.
    """
    import mlflow.data

    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}.")
    frame = version.manifest[version.manifest["split"] == split]
    with warnings.catch_warnings():
        # MLflow registers its local source for both '' and 'file' schemes and warns that a path is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(
            frame.sort_values("path", ignore_index=True),
            source=str(version.dir),
            targets="class",
            name=f"{version.name}-{split}",
            digest=version.digest,
        )
