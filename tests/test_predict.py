"""`python -m research predict`: files and folders in, one row per file out, unreadable files as rows with errors.

The model is a real torch model logged by hand into a real sqlite store and promoted
(tests/test_serving.py's `log_tiny_model`), so these tests do not depend on training.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from research import predict as predict_mod
from research.cli import main
from research.errors import ConfigError
from research.predict import MAX_BATCH_BYTES, collect, plan_batches, predict_files
from research.registry import promote
from research.serving import load_model
from tests.test_serving import b64, free_port, log_tiny_model, odd_image


def odd_images(first: Path, out: Path) -> Path:
    """A directory tree of images in other formats and modes, a corrupt file, a non-image and a hidden file."""
    out.mkdir()
    (out / "sub").mkdir()
    shutil.copy(first, out / "a.png")
    with Image.open(first) as im:
        im.convert("RGB").save(out / "sub" / "b.jpg", quality=95)
        im.convert("RGBA").save(out / "sub" / "c_rgba.png")
        im.convert("L").resize((70, 50)).save(out / "d_gray.webp")
    (out / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (out / "notes.txt").write_text("not an image")
    (out / ".hidden.png").write_bytes(first.read_bytes())
    return out


@pytest.mark.slow
def test_predict_directory_reports_corrupt_file_and_matches_pyfunc(mlflow_store, tmp_path, capsys, monkeypatch):
    name = "clf-predict"
    run_id = log_tiny_model(tmp_path / "meta")
    promote(run_id=run_id, name=name)
    folder = odd_images(odd_image(tmp_path / "drawing.png"), tmp_path / "imgs")

    capsys.readouterr()
    assert main(["predict", str(folder), "--json", "--batch-size", "2", "--model", f"models:/{name}@champion"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {"a.png", "b.jpg", "c_rgba.png", "d_gray.webp", "corrupt.png"}  # no .txt, no hidden
    assert by_name["corrupt.png"]["label"] == "" and by_name["corrupt.png"]["probability"] is None
    assert by_name["corrupt.png"]["error"]  # PIL's own words (UnidentifiedImageError / truncated file)
    for r in rows:
        if r["file"].endswith("corrupt.png"):
            continue
        assert r["error"] == "" and 0.0 < r["probability"] <= 1.0
        assert r["top3"][0] == [r["label"], pytest.approx(r["probability"])]
    # the same answer as the pyfunc in Python, and as the run's torch model behind runs:/<id>/model
    frame = pd.DataFrame({"image": [b64(folder / "a.png")]})
    direct = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(frame)
    assert by_name["a.png"]["label"] == direct["label"][0]
    assert by_name["a.png"]["probability"] == pytest.approx(direct["probability"][0], abs=1e-6)
    pd.testing.assert_frame_equal(load_model(f"runs:/{run_id}/model").predict(frame), direct, atol=1e-6)

    capsys.readouterr()
    monkeypatch.setattr(predict_mod.console, "width", 200)  # a terminal, not pytest's 80 columns
    assert main(["predict", str(folder / "corrupt.png"), str(folder / "a.png"), "--model", f"models:/{name}/1"]) == 0
    table = capsys.readouterr().out
    assert "unreadable" in table and "a.png" in table


@pytest.mark.slow
def test_unreadable_file_is_a_row_not_a_crash(mlflow_store, tmp_path):
    run_id = log_tiny_model(tmp_path / "meta")
    good = odd_image(tmp_path / "good.png")
    gone = tmp_path / "gone.png"  # collected, then deleted before it was read
    out = predict_files(load_model(f"runs:/{run_id}/model"), [good, gone], batch_size=1)
    assert list(out["file"]) == [str(good), str(gone)]
    assert out["error"][0] == "" and out["error"][1].startswith("FileNotFoundError")
    assert out["label"][1] == "" and out["top3"][1] == []


@pytest.mark.slow
def test_predict_missing_model_and_missing_path_are_clear(mlflow_store, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["predict", str(img), "--model", "models:/no-such-model@champion"]) == 2
    assert "promote" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be > 0"):
        predict_files(None, [img], batch_size=0)
    assert collect([tmp_path]) == [img]


def test_predict_fails_fast_when_the_tracking_server_is_down(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on any more
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    start = time.monotonic()
    assert main(["predict", str(img)]) == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and uri in err and time.monotonic() - start < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no mlruns/ left behind


def test_batches_are_bounded_by_count_and_by_bytes(tmp_path):
    def sized(name: str, size: int) -> Path:
        path = tmp_path / name
        path.write_bytes(b"\0" * size)
        return path

    quarter = MAX_BATCH_BYTES // 4
    small = [sized(f"s{i}", 10) for i in range(5)]
    assert plan_batches(small, batch_size=2) == [small[:2], small[2:4], small[4:]]
    big = sized("big", MAX_BATCH_BYTES + 1)  # bigger than a batch: alone, and it does not drag others along
    parts = [sized(f"q{i}", quarter) for i in range(6)]
    gone = tmp_path / "gone"  # missing: no bytes to plan for (its read reports the error)
    files = [parts[0], big, *parts[1:], gone]
    assert plan_batches(files, batch_size=64) == [[parts[0]], [big], parts[1:5], [parts[5], gone]]
