"""Pictures of one evaluated split: F1 per class as bars, and a gallery of the most confident mistakes.

Plain matplotlib Figures on the Agg canvas (as `metrics.confusion_matrix_figure`): safe headless, nothing
to close; `fig.savefig(path)`. They take plain arrays, so anything holding labels and probabilities can
draw them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from research.data.image import decode

THUMB = 128  # px: the gallery's tiles, decoded square like the model's input
COLUMNS = 6
GREY = 160


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    """A figure as a PNG: a laid-out one (layout="constrained") as it is, any other cropped to what it draws.
    Cropping (bbox_inches="tight") draws the figure twice; a constrained layout already fits its labels."""
    fig.savefig(path, dpi=dpi, bbox_inches=None if fig.get_layout_engine() is not None else "tight")


def per_class_f1_figure(per_class_f1: Sequence[float], classes: Sequence[str], support: Sequence[int],
                        title: str) -> Figure:
    """One bar per class, worst F1 on top, `name (n=support)` as its label, a dashed line at the macro F1."""
    f1 = np.asarray(per_class_f1, dtype=float)
    order = np.argsort(f1, kind="stable")
    labels = [f"{classes[i]} (n={int(support[i])})" for i in order]
    fig = Figure(figsize=(7.0, max(2.5, 0.3 * len(f1) + 1.2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.barh(range(len(f1)), f1[order], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.set_yticks(range(len(f1)), labels=labels)
    ax.invert_yaxis()  # the classes to look at first come first
    macro = float(f1.mean())
    ax.axvline(macro, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("F1")
    ax.set_title(f"{title}\nmacro F1 {macro:.3f} (dashed line)")  # a legend would hide the best bars
    return fig


def worst_mistakes(y_true, y_pred, prob, per_class: int = 3, max_images: int = 48) -> np.ndarray:
    """Indices of the wrong predictions to show: the most confident `per_class` per true class, at most
    `max_images` of them (the most confident kept), ordered by true class, then by confidence."""
    frame = pd.DataFrame({"true": np.asarray(y_true).ravel(), "pred": np.asarray(y_pred).ravel(),
                          "prob": np.asarray(prob, dtype=float).ravel()})
    wrong = frame[frame["true"] != frame["pred"]].sort_values("prob", ascending=False, kind="stable")
    picked = wrong.groupby("true").head(per_class).head(max_images)
    return picked.sort_values(["true", "prob"], ascending=[True, False], kind="stable").index.to_numpy()


def thumbnail(path: str | Path) -> tuple[np.ndarray, bool]:
    """(pixels, readable): the image under the decode rule, or a grey tile when the file cannot be decoded."""
    try:
        return decode(path, THUMB), True
    except (OSError, Image.DecompressionBombError):  # missing, truncated, not an image, too large
        return np.full((THUMB, THUMB, 3), GREY, np.uint8), False


def mistakes_gallery(paths: Sequence[str | Path], y_true, y_pred, prob, classes: Sequence[str], per_class: int = 3,
                     max_images: int = 48, title: str = "") -> Figure:
    """The `worst_mistakes` as tiles captioned "true → predicted p=0.87" (p: the predicted class's probability).

    paths, y_true, y_pred and prob are aligned: entry i of each is the same image.
    """
    if not len(paths) == len(y_true) == len(y_pred) == len(prob):
        raise ValueError(f"mistakes_gallery: {len(paths)} paths, {len(y_true)} labels, {len(y_pred)} predictions "
                         f"and {len(prob)} probabilities; they must be aligned, one entry per image")
    y_true, y_pred, prob = np.asarray(y_true), np.asarray(y_pred), np.asarray(prob, dtype=float)
    picked = worst_mistakes(y_true, y_pred, prob, per_class, max_images)
    wrong = int((y_true != y_pred).sum())
    if not len(picked):
        fig = Figure(figsize=(4.0, 1.2))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, f"{title}\nno mistakes: all {len(y_true)} images predicted right".strip(),
                 ha="center", va="center")
        return fig
    cols = min(COLUMNS, len(picked))
    rows = math.ceil(len(picked) / cols)
    height = 2.1 * rows + 0.8
    fig = Figure(figsize=(1.9 * cols, height))
    FigureCanvasAgg(fig)
    # fixed margins, not layout="constrained": solving the layout of 48 axes takes seconds
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.8 / height, wspace=0.08, hspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, picked):
        pixels, readable = thumbnail(paths[i])
        ax.imshow(pixels)
        if not readable:
            ax.text(THUMB / 2, THUMB / 2, "unreadable", ha="center", va="center", fontsize=8)
        ax.set_title(f"{classes[y_true[i]]} →\n{classes[y_pred[i]]} p={prob[i]:.2f}", fontsize=7)
    fig.suptitle((f"{title}: " if title else "") + f"{len(picked)} most confident of {wrong} mistakes "
                 f"({len(y_true)} images), at most {per_class} per true class", y=1 - 0.1 / height, va="top",
                 fontsize=9)
    return fig
