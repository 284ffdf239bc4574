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
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from research.config import TrainConfig
from research.data.image import SPLITS
from research.data.pool import progress_bar
from research.inputs import decoded
from research.inputs.loaders import BatchAugment, Loaders, Normalize, epoch_generator, epoch_plan, num_batches
from research.models import Preprocessing, stage_split

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


@torch.no_grad()
def _embed(trunk: torch.nn.Module, images: np.ndarray, device: torch.device, prep: Preprocessing, advance,
           augment: BatchAugment | None = None, seed: int = 0) -> np.ndarray:
    """[N, S, S, 3] uint8 -> the trunk's output per image (optionally of augmented images): [N, D] float32
    features, or [N, C, H, W] float16 activations (a tenth of the memory; the suffix computes in float32)."""
    normalize = Normalize(device, prep.mean, prep.std)
    out = []
    for start in range(0, len(images), EMBED_BATCH):
        x = torch.from_numpy(np.array(images[start:start + EMBED_BATCH])).to(device).permute(0, 3, 1, 2)
        x = augment(x, epoch_generator(seed, start)) if augment is not None else normalize(x)
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
    images = decoded.ensure_cache(version, prep.image_size, cache_root, interpolation=prep.interpolation)
    built = False
    with decoded.build_lock(path):  # one builder across sweep workers
        if not (path / "key.json").is_file():
            _build(path, key, images, trunk, device, prep, cfg)
            built = True
    arrays = {s: np.load(path / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    return FeatureSet(path, arrays["train"], arrays["val"], arrays["test"], images.labels, built)


def _build(path: Path, key: dict, images, trunk, device, prep: Preprocessing, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    arrays = images.arrays
    total = len(arrays["train"]) * (1 + cfg.feature_views) + len(arrays["val"]) + len(arrays["test"])
    trunk = trunk.to(memory_format=torch.channels_last)
    try:
        with progress_bar(True, total, f"embedding {path.name} ({1 + cfg.feature_views} train views)") as advance:
            augment = BatchAugment(cfg.augment, prep.image_size, device, prep.mean, prep.std)
            train = [_embed(trunk, arrays["train"], device, prep, advance)]
            for view in range(1, cfg.feature_views + 1):
                train.append(_embed(trunk, arrays["train"], device, prep, advance, augment,
                                    seed=cfg.seed * 1000 + view))
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

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = epoch_plan(self.labels, self.cfg, epoch)
        views = self.features.shape[0]
        for idx, seed in zip(plan.batches, plan.batch_seeds):
            view = torch.randint(0, views, (len(idx),), generator=torch.Generator().manual_seed(seed))
            yield self.features[view, idx].to(self.device).float(), self.targets[idx].to(self.device)


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
