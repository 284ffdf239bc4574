"""Which training images an epoch visits: shuffle, or class-rebalanced draws with replacement.

- shuffle: every image once per epoch, in random order.
- weighted: P(image) proportional to 1/n_class (WeightedRandomSampler; classes drawn ~equally).
- sqrt: P(image) proportional to 1/sqrt(n_class) (milder; between shuffle and weighted).
Rebalanced epochs draw len(labels) images with replacement. Deferred re-sampling (drs_epoch):
plain shuffling before that epoch, the rebalanced draws from it on (epoch >= drs_epoch).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

from research.config import SAMPLERS
from research.errors import ConfigError


def sample_weights(labels: np.ndarray, kind: str) -> np.ndarray | None:
    """Per-image draw weights (float64, summing to 1) for `kind`; None for shuffle."""
    if kind not in SAMPLERS:
        raise ConfigError(f"sampler={kind!r} is not valid. Choose one of: {', '.join(SAMPLERS)}.")
    if kind == "shuffle":
        return None
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = 1.0 / counts if kind == "weighted" else 1.0 / np.sqrt(counts)
    weights = per_class[inverse].astype(np.float64)
    return weights / weights.sum()


def epoch_indices(
    labels: np.ndarray,
    kind: str,
    epoch: int,
    generator: torch.Generator,
    drs_epoch: int | None = None,
) -> torch.Tensor:
    """The image indices of one epoch, in order (for the cached in-memory loader)."""
    n = len(labels)
    weights = sample_weights(labels, kind)
    if weights is None or (drs_epoch is not None and epoch < drs_epoch):
        return torch.randperm(n, generator=generator)
    return torch.multinomial(torch.as_tensor(weights), n, replacement=True, generator=generator)


def make_sampler(labels: np.ndarray, kind: str, generator: torch.Generator) -> Sampler:
    """A DataLoader sampler for the folder loader: RandomSampler or WeightedRandomSampler."""
    weights = sample_weights(labels, kind)
    if weights is None:
        return RandomSampler(range(len(labels)), generator=generator)
    return WeightedRandomSampler(weights.tolist(), num_samples=len(labels), replacement=True, generator=generator)
