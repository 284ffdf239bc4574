"""Classification metrics (sklearn.metrics), the per-class report and a confusion-matrix figure.

Macro averages run over all `num_classes` classes (labels=range(num_classes)), so a class that
is never predicted, or absent from a small split, counts as 0 rather than being skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def _array(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(np.int64).ravel()


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """accuracy, precision_macro, recall_macro, f1_macro (floats) and per_class_f1 (list)."""
    y_true, y_pred = _array(y_true), _array(y_pred)
    labels = list(range(num_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    _, _, per_class, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "per_class_f1": [float(v) for v in per_class],
    }


def classification_report_frame(y_true, y_pred, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class: class, precision, recall, f1, support."""
    y_true, y_pred = _array(y_true), _array(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(class_names))), average=None, zero_division=0
    )
    return pd.DataFrame(
        {"class": list(class_names), "precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}
    )


def confusion_matrix_frame(y_true, y_pred, class_names: Sequence[str]) -> pd.DataFrame:
    """Counts: rows = true class, columns = predicted class (index and columns are the class names)."""
    counts = confusion_matrix(_array(y_true), _array(y_pred), labels=list(range(len(class_names))))
    return pd.DataFrame(counts, index=pd.Index(list(class_names), name="true"), columns=list(class_names))


def confusion_matrix_figure(y_true, y_pred, class_names: Sequence[str], title: str) -> Figure:
    """Rows = true class, normalised to 1 (colour + fraction), with the raw count under each fraction.

    A plain matplotlib Figure on the Agg canvas (not pyplot): nothing to close, safe headless;
    `mlflow.log_figure(fig, "confusion_matrix.png")` or `fig.savefig(path)`.
    """
    y_true, y_pred = _array(y_true), _array(y_pred)
    k = len(class_names)
    counts = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape, float), where=totals > 0)

    side = max(4.0, 0.55 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of true class")
    ax.set_xticks(range(k), labels=class_names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=[f"{name} ({int(n)})" for name, n in zip(class_names, totals.ravel())])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (images)")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title}\naccuracy {acc:.3f}, n={int(counts.sum())}")
    fontsize = 8 if k <= 12 else 6
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                colour = "white" if fractions[i, j] > 0.5 else "black"
                text = f"{fractions[i, j]:.2f}\n{counts[i, j]}"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    return fig


# ------------------------------------------------------------------------------ calibration

ECE_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks"


def calibration_bins(probs: np.ndarray, y_true, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin (equal width on [0, 1]): count, mean confidence and accuracy of the top-1 prediction."""
    conf, correct = probs.max(1), probs.argmax(1) == _array(y_true)
    which = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = which == b
        rows.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(mask.sum()),
                     "confidence": float(conf[mask].mean()) if mask.any() else np.nan,
                     "accuracy": float(correct[mask].mean()) if mask.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, y_true, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over the confidence bins."""
    bins = calibration_bins(probs, y_true, n_bins).dropna()
    return float((bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / max(1, bins["count"].sum()))


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature): the probabilities the same logits give at another temperature."""
    z = np.log(np.clip(probs, 1e-300, None)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, y_true) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of softmax(logits / T) on these
    (validation) probabilities; argmax, and so every accuracy and F1, stays as it is."""
    from scipy.optimize import minimize_scalar

    y = _array(y_true)

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(tempered(probs, float(np.exp(log_t)))[np.arange(len(y)), y], 1e-300, None)).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def reliability_figure(probs: np.ndarray, y_true, title: str, uncalibrated: np.ndarray | None = None) -> Figure:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with the ECE; `uncalibrated`
    (the same predictions at temperature 1) drawn beside."""
    fig = Figure(figsize=(5.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    series = [("calibrated", probs, "tab:blue")]
    if uncalibrated is not None:
        series.append(("temperature 1", uncalibrated, "tab:orange"))
    for label, p, colour in series:
        bins = calibration_bins(p, y_true).dropna()
        ece = expected_calibration_error(p, y_true)
        ax.plot(bins["confidence"], bins["accuracy"], marker="o", color=colour, label=f"{label}: ECE {ece:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    return fig
