"""The split pictures: per-class F1 bars and the gallery of the most confident mistakes, drawn from real
PNG files on disk (one of them broken, one missing) and written as real PNGs by runlog.write_split_reports."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from research.figures import GREY, mistakes_gallery, per_class_f1_figure, worst_mistakes
from research.runlog import write_split_reports
from tests.conftest import draw_image

CLASSES = ["circles", "squares", "stripes"]
# 12 images: true class, predicted class, predicted-class probability
Y_TRUE = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([1, 2, 1, 0, 2, 0, 1, 2, 2, 2, 2, 0])
PROB = np.array([.6, .9, .8, .99, .7, .55, .9, .65, .9, .8, .7, .5])


def tiny_pngs(root, n: int) -> list:
    """n real 40 px drawings; image 1 is a text file named .png, image 5 does not exist."""
    rng = np.random.default_rng(0)
    paths = [root / f"img_{i:02d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        if i == 1:
            path.write_text("not an image")
        elif i != 5:
            draw_image(["circle", "square", "stripe"][i % 3], 40, rng).save(path)
    return paths


def tiles(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def assert_png(path) -> None:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


def test_worst_mistakes_are_the_most_confident_per_true_class_ordered_by_class():
    # wrong: class 0 -> 0 (.6), 1 (.9), 2 (.8), 4 (.7); class 1 -> 5 (.55), 7 (.65); class 2 -> 11 (.5)
    assert worst_mistakes(Y_TRUE, Y_PRED, PROB, per_class=2).tolist() == [1, 2, 7, 5, 11]
    assert worst_mistakes(Y_TRUE, Y_PRED, PROB, per_class=3).tolist() == [1, 2, 4, 7, 5, 11]
    # the cap keeps the most confident overall: .9, .8, .7 and .65 (not .55, .5)
    assert worst_mistakes(Y_TRUE, Y_PRED, PROB, per_class=3, max_images=4).tolist() == [1, 2, 4, 7]
    assert worst_mistakes(Y_TRUE, Y_TRUE, PROB).tolist() == []


def test_gallery_has_one_captioned_tile_per_chosen_mistake_and_greys_unreadable_files(tmp_path):
    paths = tiny_pngs(tmp_path, len(Y_TRUE))
    fig = mistakes_gallery(paths, Y_TRUE, Y_PRED, PROB, CLASSES, per_class=3, title="test (tiny)")
    shown = tiles(fig)
    assert len(shown) == 6  # worst_mistakes(per_class=3): images 1, 2, 4, 7, 5, 11
    assert [ax.get_title() for ax in shown[:2]] == ["circles →\nstripes p=0.90", "circles →\nsquares p=0.80"]
    assert shown[-1].get_title() == "stripes →\ncircles p=0.50"
    # image 1 is not an image and image 5 is missing: grey tiles; the others are the decoded drawings
    pixels = [np.asarray(ax.images[0].get_array()) for ax in shown]
    assert (pixels[0] == GREY).all() and (pixels[4] == GREY).all()
    assert not (pixels[1] == GREY).all() and pixels[1].shape == (128, 128, 3)
    assert "6 most confident of 7 mistakes (12 images)" in fig.get_suptitle()
    fig.savefig(tmp_path / "gallery.png")
    assert_png(tmp_path / "gallery.png")


def test_gallery_without_mistakes_is_a_small_note(tmp_path):
    paths = tiny_pngs(tmp_path, 4)
    fig = mistakes_gallery(paths, Y_TRUE[:4], Y_TRUE[:4], PROB[:4], CLASSES, title="test (tiny)")
    assert tiles(fig) == [] and "no mistakes: all 4 images predicted right" in fig.texts[0].get_text()
    fig.savefig(tmp_path / "none.png")
    assert_png(tmp_path / "none.png")


def test_gallery_refuses_misaligned_inputs(tmp_path):
    with pytest.raises(ValueError, match="11 paths, 12 labels, 12 predictions and 12 probabilities"):
        mistakes_gallery(tiny_pngs(tmp_path, 11), Y_TRUE, Y_PRED, PROB, CLASSES)


def test_per_class_f1_bars_worst_first_with_support_and_the_macro_line():
    fig = per_class_f1_figure([0.8, 0.2, 0.5], CLASSES, [10, 4, 7], "test (tiny)")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["squares (n=4)", "stripes (n=7)", "circles (n=10)"]
    assert [round(p.get_width(), 6) for p in ax.patches] == [0.2, 0.5, 0.8]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # inverted: the first bar (the worst class) on top
    macro = ax.get_lines()[0]
    assert macro.get_xdata()[0] == pytest.approx(0.5) and ax.get_title() == "test (tiny)\nmacro F1 0.500 (dashed line)"


def test_write_split_reports_writes_the_f1_chart_always_and_the_gallery_when_given_paths(tmp_path):
    result = {"y_true": Y_TRUE, "y_pred": Y_PRED}
    plain, full = tmp_path / "plain", tmp_path / "full"
    plain.mkdir()
    full.mkdir()
    write_split_reports(result, CLASSES, "test", "tiny", plain)  # the signature callers already use
    assert sorted(p.name for p in plain.iterdir()) == [
        "classification_report_test.csv", "confusion_matrix_test.csv", "confusion_matrix_test.png",
        "per_class_f1_test.png"]
    paths = tiny_pngs(tmp_path, len(Y_TRUE))
    write_split_reports(result, CLASSES, "test", "tiny", full, paths=paths, prob=PROB)
    for name in ("confusion_matrix_test.png", "per_class_f1_test.png", "mistakes_test.png"):
        assert_png(full / name)
    with Image.open(full / "mistakes_test.png") as gallery:
        assert gallery.width > 2.5 * gallery.height  # the 6 chosen mistakes side by side, one row
    with pytest.raises(ValueError, match="pass paths and prob together"):
        write_split_reports(result, CLASSES, "test", "tiny", full, paths=paths)
