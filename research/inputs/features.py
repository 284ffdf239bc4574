"""The frozen-prefix fast path: run the frozen part of the model over a dataset version once, then train the
rest on the stored output.

With the trunk frozen (and in eval mode, so its batch-norm statistics and dropout do not move),
its output for an image never changes, so computing it every epoch is waste. `ensure_features`
stores each split's output once per (data digest, prefix weights, trainable stages, preprocessing,
views, code version) under `data/cache/features/`, where every later trial finds it; `feature_views`
adds K augmented views of each training image (the training augmentation, drawn from (seed, view)),
and each epoch picks one view per image. `trainable_stages` = 0 stores the trunk's pooled features
and trains the head (seconds); k > 0 stores the activations before the trunk's last k stages (fp16)
and trains those stages and the head (research.models.stage_split). The run logs the whole model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from research import verify
from research.config import TrainConfig
from research.data.image import SPLITS
from research.data.pool import progress_bar
from research.errors import ConfigError
from research.inputs import decoded
from research.inputs.loaders import (
    Batch,
    BatchAugment,
    Loaders,
    Normalize,
    epoch_generator,
    epoch_plan,
    num_batches,
)
from research.inputs.routes import Route
from research.models import Preprocessing, set_trunk_frozen, stage_split

console = Console(stderr=True)
EMBED_BATCH = 64
# Part of every stored embedding's key: bump it whenever _embed/_build change what they compute, so stored
# embeddings of the old code are never reused (2: VGG trunks end in their 7x7 pool + flatten).
EMBED_CODE_VERSION = 2


@dataclasses.dataclass
class FeatureSet:
    dir: Path
    train: np.ndarray  # [1 + views, N, ...] (see _embed): view 0 is the plain image
    val: np.ndarray  # [N, ...]
    test: np.ndarray
    labels: dict[str, np.ndarray]
    built: bool


def weights_digest(module: torch.nn.Module) -> str:
    """sha1 over the module's state dict: the same trunk weights give the same features."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def features_key(version, trunk_digest: str, prep: Preprocessing, cfg: TrainConfig) -> dict:
    key = {"dataset_digest": version.digest, "trunk": trunk_digest, **prep.as_dict(), "views": cfg.feature_views,
           "trainable_stages": cfg.trainable_stages, "embed_code": EMBED_CODE_VERSION}
    if cfg.feature_views:  # augmented views depend on the augmentation and the seed too
        key |= {"augment": dataclasses.asdict(cfg.augment), "seed": cfg.seed}
    return key


def view_seed(cfg: TrainConfig, view: int) -> int:
    """The seed augmented view `view` (1..feature_views) of the training split is drawn from."""
    return cfg.seed * 1000 + view


def view_chunks(n: int, augment: BatchAugment | None, seed: int = 0) -> Iterator[tuple[int, int, dict | None]]:
    """(start, stop, augmentation parameters) of each chunk of a split embedded together: the parameters are drawn
    per chunk from (seed, start) alone, so whoever replays a view (a teacher, research/inputs/teacher.py) draws the
    same ones; None for the plain view."""
    for start in range(0, n, EMBED_BATCH):
        stop = min(start + EMBED_BATCH, n)
        yield start, stop, None if augment is None else augment.params(stop - start, epoch_generator(seed, start))


@torch.no_grad()
def _embed(trunk: torch.nn.Module, images: np.ndarray, device: torch.device, prep: Preprocessing, advance,
           augment: BatchAugment | None = None, seed: int = 0) -> np.ndarray:
    """[N, S, S, 3] uint8 -> the trunk's output per image (optionally of augmented images): [N, D] float32
    features, or [N, C, H, W] float16 activations (a tenth of the memory; the suffix computes in float32)."""
    normalize = Normalize(device, prep.mean, prep.std)
    out = []
    for start, stop, params in view_chunks(len(images), augment, seed):
        x = torch.from_numpy(np.array(images[start:stop])).to(device).permute(0, 3, 1, 2)
        x = augment.apply(x, params) if augment is not None else normalize(x)
        # NHWC: the cache's own layout, and the faster one for convolutions on CPU and GPU
        y = trunk(x.contiguous(memory_format=torch.channels_last)).float()
        out.append((y.half() if y.ndim > 2 else y).cpu().numpy())
        advance(len(x))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def ensure_features(version, model: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig, device: torch.device,
                    cache_root: str | Path = "data/cache") -> FeatureSet:
    """The stored embeddings of every split, computed first when absent (atomic: a killed run leaves none)."""
    trunk = stage_split(model, cfg.trainable_stages)[0]
    trunk.eval()
    key = features_key(version, weights_digest(trunk), prep, cfg)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (Path(cache_root) / "features" /
            f"{version.name}-{cfg.model.replace(':', '_')}-s{cfg.trainable_stages}-{digest}")
    rows = {s: len(version.split_frame(s)) for s in SPLITS}
    check_store_size(trunk, prep, cfg, rows, device, path.parent)  # before anything is decoded or embedded
    images = decoded.ensure_cache(version, prep.image_size, cache_root, interpolation=prep.interpolation)
    built = False
    with decoded.build_lock(path):  # one builder across sweep workers
        reason = verify.stored_arrays(path, key, rows, cfg.feature_views)
        if reason is not None:  # never built, or damaged since (truncated, zeroed, deleted): built again
            if path.exists():
                console.print(f"[yellow]rebuilding stored activations {path}: {reason}")
            _remove_dead_builds(path)
            _build(path, key, images, trunk, device, prep, cfg)
            built = True
    arrays = {s: np.load(path / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    return FeatureSet(path, arrays["train"], arrays["val"], arrays["test"], images.labels, built)


def check_store_size(trunk: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig, rows: dict[str, int],
                     device: torch.device, where: Path) -> None:
    """Refuse stored activations that cannot fit: building them holds the training views twice in memory (a
    list, then one stacked array) and training holds them once; they must also fit on the disk under `where`."""
    import psutil

    with torch.no_grad():  # one image through the trunk: the shape and type of one stored row
        y = trunk.eval()(torch.zeros(1, 3, prep.image_size, prep.image_size, device=device))
    per_image = y[0].numel() * (2 if y.ndim > 2 else 4)  # activations as float16, pooled features as float32
    views = 1 + cfg.feature_views
    train = views * rows["train"] * per_image
    total = train + (rows["val"] + rows["test"]) * per_image
    memory = psutil.virtual_memory().available
    disk = shutil.disk_usage(next(p for p in (where, *where.absolute().parents) if p.exists())).free
    if 2 * train <= memory and total <= disk:
        return
    fits = max(0, min(memory // 2, disk) // max(1, rows["train"] * per_image) - 1)
    raise ConfigError(
        f"feature_views={cfg.feature_views}: the stored activations would take {_human(total)} ({views:,} views of "
        f"{rows['train']:,} training images x {y[0].numel():,} values each), and building them needs about "
        f"{_human(2 * train)} of memory; this machine has {_human(memory)} of memory available and {_human(disk)} "
        f"free on {where}. Use --set feature_views={fits} or fewer, a smaller image_size or more trainable_stages "
        "(a smaller stored shape), or loader=cached.")


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _remove_dead_builds(path: Path) -> None:
    """The temporary folders that killed builds left beside `path` (`_build`'s `.<name>.tmp-<pid>`, of any stored
    activations there), once their process is gone; any of `path`'s own, whose build lock this process holds;
    and the lock files nobody holds."""
    import psutil

    from research.data import outputs

    outputs.remove_stale_locks(path.parent)
    for folder in path.parent.glob(".*.tmp-*"):
        pid = folder.name.rpartition(".tmp-")[2]
        dead = folder.name.startswith(f".{path.name}.tmp-") or (pid.isdigit() and not psutil.pid_exists(int(pid)))
        if dead and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _build(path: Path, key: dict, images, trunk, device, prep: Preprocessing, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # `_remove_dead_builds` finds it if this is killed
    tmp.mkdir()
    arrays = images.arrays
    total = len(arrays["train"]) * (1 + cfg.feature_views) + len(arrays["val"]) + len(arrays["test"])
    trunk = trunk.to(memory_format=torch.channels_last)
    try:
        with progress_bar(True, total, f"embedding {path.name} ({1 + cfg.feature_views} train views)") as advance:
            augment = BatchAugment(cfg.augment, prep.image_size, device, prep.mean, prep.std)
            train = [_embed(trunk, arrays["train"], device, prep, advance)]
            for view in range(1, cfg.feature_views + 1):
                train.append(_embed(trunk, arrays["train"], device, prep, advance, augment,
                                    seed=view_seed(cfg, view)))
            np.save(tmp / "train.npy", np.stack(train))
            for split in ("val", "test"):
                np.save(tmp / f"{split}.npy", _embed(trunk, arrays[split], device, prep, advance))
        (tmp / "key.json").write_text(json.dumps(key, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FeatureTrainStream:
    """Batches of stored training features in the epoch's sampler order; one view per image per epoch."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, cfg: TrainConfig, device: torch.device) -> None:
        self.features = torch.from_numpy(np.array(features))  # [V, N, D]: a writable copy in memory (it is small)
        self.labels = labels
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self.cfg, self.device = cfg, device

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.cfg.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        plan = epoch_plan(self.labels, self.cfg, epoch)
        views = self.features.shape[0]
        for idx, seed in zip(plan.batches, plan.batch_seeds):
            view = torch.randint(0, views, (len(idx),), generator=torch.Generator().manual_seed(seed))
            yield Batch(self.features[view, idx].to(self.device).float(), self.targets[idx].to(self.device),
                        {"index": idx, "view": view})


class FeatureEvalBatches:
    def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device) -> None:
        self.features = torch.from_numpy(np.array(features))
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.targets), self.batch_size):
            end = start + self.batch_size
            yield self.features[start:end].to(self.device).float(), self.targets[start:end].to(self.device)


def build_feature_loaders(version, model: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig,
                          device: torch.device, cache_root: str | Path = "data/cache") -> Loaders:
    """Loaders over the frozen trunk's embeddings: the same splits, order and sampler as the image loaders."""
    fs = ensure_features(version, model, prep, cfg, device, cache_root)
    train = FeatureTrainStream(fs.train, fs.labels["train"], cfg, device)
    val = FeatureEvalBatches(fs.val, fs.labels["val"], cfg.batch_size, device)
    test = FeatureEvalBatches(fs.test, fs.labels["test"], cfg.batch_size, device)
    return Loaders(train, val, test, list(version.classes), fs.labels["train"])


class FeatureRoute(Route):
    """loader=features: the frozen prefix's output is stored once (`ensure_features`) and the rest of the model
    trains on it. The prefix stays frozen and in eval mode throughout, so the trunk-freeze epochs, torch.compile
    and the trunk's layer-wise lr decay do not apply; the suffix (the head, and the last `trainable_stages`
    stages) trains from epoch 1."""

    WHEN = "loader=features"
    KEYS = {"feature_views": "; set it to 0.",
            "trainable_stages": " (the stored activations before those stages); with loader=cached use freeze_epochs."}
    compiles = False
    layer_decay = False
    stored_views = True

    def check(self, cfg: TrainConfig) -> None:
        if cfg.augment.mixup > 0 or cfg.augment.cutmix > 0:
            raise ConfigError("loader=features trains the head on stored embeddings, where mixup/cutmix of images "
                              "cannot apply: set augment.mixup=0 and augment.cutmix=0, or use loader=cached.")

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        # frozen throughout, but for the last trainable_stages (trained from epoch 1)
        return dataclasses.replace(cfg, freeze_epochs=0 if cfg.trainable_stages else cfg.epochs)

    def build(self, version, model: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig,
              device: torch.device) -> FeatureRoute:
        self.cfg, self.prep, self.device = cfg, prep, device
        self.data = build_feature_loaders(version, model, prep, cfg, device)
        return self

    def trained_part(self, model: torch.nn.Module) -> torch.nn.Module:
        return stage_split(model, self.cfg.trainable_stages)[1]  # the head, and the last k stages

    def step_module(self, model: torch.nn.Module) -> torch.nn.Module:
        set_trunk_frozen(model, True)
        suffix = self.trained_part(model)
        suffix.requires_grad_(True)
        return suffix

    def start_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        pass  # the stored prefix never changes

    def train_mode(self, model: torch.nn.Module, module: torch.nn.Module) -> None:
        module.train()

    def stored_view_chunks(self, n: int) -> Iterator[tuple[int, int, int, dict | None]]:
        """(view, start, stop, augmentation parameters) of every chunk of the stored training views, as `_build`
        drew them: view 0 is the plain image (None), views 1..feature_views the augmented ones."""
        augment = BatchAugment(self.cfg.augment, self.prep.image_size, self.device, self.prep.mean, self.prep.std)
        for view in range(1 + self.cfg.feature_views):
            for start, stop, params in view_chunks(n, augment if view else None, view_seed(self.cfg, view)):
                yield view, start, stop, params
