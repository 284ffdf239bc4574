"""Metrics on tiny hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from research.metrics import (
    classification_metrics,
    classification_report_frame,
    confusion_matrix_figure,
    confusion_matrix_frame,
)

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
