"""Samplers (rebalancing, determinism, deferred re-sampling) and metrics on tiny hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import RandomSampler, WeightedRandomSampler

from research.config import ConfigError
from research.metrics import (
    classification_metrics,
    classification_report_frame,
    confusion_matrix_figure,
    confusion_matrix_frame,
)
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


# y_true 0,0,0,1,1,2 ; y_pred 0,0,1,1,2,2 ; class 3 never appears
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_classification_metrics_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, num_classes=4)
    # precision: c0 2/2, c1 1/2, c2 1/2, c3 0 ; recall: c0 2/3, c1 1/2, c2 1/1, c3 0
    p = [1.0, 0.5, 0.5, 0.0]
    r = [2 / 3, 0.5, 1.0, 0.0]
    f1 = [2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(p, r)]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_macro"] == pytest.approx(sum(p) / 4)
    assert m["recall_macro"] == pytest.approx(sum(r) / 4)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 4)
    assert m["per_class_f1"] == pytest.approx(f1)
    assert classification_metrics(torch.tensor(Y_TRUE), np.array(Y_PRED), 4) == m


def test_report_frame_and_confusion_figure(tmp_path):
    names = ["cat", "dog", "bird", "fish"]
    frame = classification_report_frame(Y_TRUE, Y_PRED, names)
    assert list(frame.columns) == ["class", "precision", "recall", "f1", "support"]
    assert frame["class"].tolist() == names and frame["support"].tolist() == [3, 2, 1, 0]
    assert frame["recall"].tolist() == pytest.approx([2 / 3, 0.5, 1.0, 0.0])
    fig = confusion_matrix_figure(Y_TRUE, Y_PRED, names, "val")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "0.67\n2" in texts and "0.33\n1" in texts and "1.00\n1" in texts  # row-normalised, with counts
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_yticklabels()[0].get_text() == "cat (3)"
    assert "val" in ax.get_title()
    fig.savefig(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_confusion_matrix_frame_counts_true_by_predicted():
    names = ["cat", "dog", "bird", "fish"]
    frame = confusion_matrix_frame(Y_TRUE, Y_PRED, names)
    assert list(frame.index) == names and list(frame.columns) == names
    assert frame.to_numpy().sum() == len(Y_TRUE)
    assert frame.sum(axis=1).tolist() == [3, 2, 1, 0]  # rows are the true classes
    assert frame.loc["cat", "cat"] == 2 and frame.loc["bird", "bird"] == 1
