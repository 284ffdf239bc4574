"""Samplers (rebalancing, determinism, deferred re-sampling) on an 8x imbalanced label set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, WeightedRandomSampler

from research.errors import ConfigError
from research.samplers import epoch_indices, make_sampler, sample_weights

# 8x imbalance: 800 / 300 / 100 images
LABELS = np.repeat([0, 1, 2], [800, 300, 100])


def class_share(indices) -> np.ndarray:
    return np.bincount(LABELS[np.asarray(indices)], minlength=3) / len(indices)


def test_sample_weights():
    assert sample_weights(LABELS, "shuffle") is None
    w = sample_weights(LABELS, "weighted")
    assert w.sum() == pytest.approx(1.0)
    assert [w[LABELS == c].sum() for c in range(3)] == pytest.approx([1 / 3] * 3)  # each class equal mass
    s = sample_weights(LABELS, "sqrt")
    mass = np.array([s[LABELS == c].sum() for c in range(3)])
    expected = np.sqrt([800, 300, 100]) / np.sqrt([800, 300, 100]).sum()  # n_c / sqrt(n_c)
    assert mass == pytest.approx(expected)
    with pytest.raises(ConfigError, match="shuffle, weighted, sqrt"):
        sample_weights(LABELS, "balanced")


def test_weighted_epoch_draws_roughly_balanced_classes():
    idx = epoch_indices(LABELS, "weighted", epoch=0, generator=torch.Generator().manual_seed(0))
    assert len(idx) == len(LABELS)
    assert class_share(idx) == pytest.approx([1 / 3] * 3, abs=0.05)
    sqrt_share = class_share(epoch_indices(LABELS, "sqrt", 0, torch.Generator().manual_seed(0)))
    assert sqrt_share[0] > sqrt_share[1] > sqrt_share[2] > 100 / 1200  # milder than weighted


def test_shuffle_and_deferred_resampling():
    gen = torch.Generator().manual_seed(1)
    perm = epoch_indices(LABELS, "shuffle", 0, gen)
    assert sorted(perm.tolist()) == list(range(len(LABELS)))
    before = epoch_indices(LABELS, "weighted", 2, gen, drs_epoch=3)
    assert sorted(before.tolist()) == list(range(len(LABELS)))  # a plain permutation before drs_epoch
    after = epoch_indices(LABELS, "weighted", 3, gen, drs_epoch=3)
    assert class_share(after) == pytest.approx([1 / 3] * 3, abs=0.05)


def test_epoch_indices_are_reproducible():
    a = epoch_indices(LABELS, "weighted", 0, torch.Generator().manual_seed(5))
    b = epoch_indices(LABELS, "weighted", 0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_make_sampler():
    sampler = make_sampler(LABELS, "weighted", torch.Generator().manual_seed(0))
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == len(LABELS)
    assert class_share(list(sampler)) == pytest.approx([1 / 3] * 3, abs=0.05)
    shuffle = make_sampler(LABELS, "shuffle", torch.Generator().manual_seed(0))
    assert isinstance(shuffle, RandomSampler) and sorted(shuffle) == list(range(len(LABELS)))
