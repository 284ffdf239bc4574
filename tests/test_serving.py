"""research.serving: the model metadata, the Classifier's preprocessing, the pyfunc, and `mlflow models serve`.

The models here are real torch modules logged by hand into a real sqlite store (no training), so a
test can choose the metadata: a model trained with mean = std = 0.5 and bilinear resizing (timm's
EfficientNet-Lite weights) must be served with exactly those numbers, never ImageNet's.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from research import tracking
from research.data.image import IMAGENET_MEAN, IMAGENET_STD
from research.errors import ConfigError
from research.registry import promote
from research.serving import (
    CHAMPION,
    META_FILE,
    MODEL_NAME,
    Classifier,
    decode_payload,
    load_model,
    model_meta,
    pip_requirements,
    read_meta,
    row_error,
)

EXPERIMENT = "test-serving"
CLASSES = ["circle", "square", "stripe"]
HALF = (0.5, 0.5, 0.5)
START_TIMEOUT = 240  # seconds for the server to answer /ping (a loaded 2-core box is slow)


def tiny_module() -> torch.nn.Module:
    """A real (untrained) CNN of any input size -> 3 logits; only torch classes, so its pickle loads anywhere."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, len(CLASSES)))


def log_tiny_model(tmp: Path, *, image_size: int = 24, mean=HALF, std=HALF, interpolation: str = "bilinear",
                   test_f1: float = 0.5, meta: dict | None = None) -> str:
    """A FINISHED run holding a torch model `model` with its model_meta.json, as research/train.py logs it."""
    meta = meta or model_meta(classes=CLASSES, image_size=image_size, mean=mean, std=std, interpolation=interpolation,
                              model="tiny", dataset_version="tiny", dataset_digest="0" * 12, channels_last=False)
    tmp.mkdir(parents=True, exist_ok=True)
    meta_file = tmp / META_FILE
    meta_file.write_text(json.dumps(meta))
    with mlflow.start_run(experiment_id=tracking.experiment_id(EXPERIMENT)) as run:  # artifacts under its home
        mlflow.log_params({"model": meta.get("model", "tiny"), "image_size": meta["image_size"]})
        mlflow.log_metrics({"val_f1_macro": test_f1, "test_f1_macro": test_f1})
        mlflow.pytorch.log_model(tiny_module(), name="model", serialization_format="pickle",
                                 pip_requirements=pip_requirements(), extra_files=[str(meta_file)])
    return run.info.run_id


def odd_image(path: Path) -> Path:
    """A real non-square RGBA drawing with gradients and noise: bilinear and bicubic resizing differ on it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:37, :50]
    rgb = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(0, 60, (37, 50, 3))
    alpha = np.where((xx - 25) ** 2 + (yy - 18) ** 2 < 200, 255, 90)
    Image.fromarray(np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8), "RGBA").save(path)
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def input_of(module: torch.nn.Module, predict, frame: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
    """The tensor `module` receives while `predict(frame)` runs, and predict's output."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        out = predict(frame)
    finally:
        handle.remove()
    return torch.cat(seen), out


# ------------------------------------------------------------------------------ preprocessing from the meta

@pytest.mark.slow
def test_model_is_served_with_its_own_mean_std_and_interpolation(mlflow_store, tmp_path):
    size = 24
    run_id = log_tiny_model(tmp_path / "meta", image_size=size, mean=HALF, std=HALF, interpolation="bilinear")
    path = odd_image(tmp_path / "drawing.png")

    def preprocess(interpolation, mean, std):
        """What training feeds the model for this file: the folder loader's PIL decode and torchvision transforms
        (research.inputs.loaders), not the functions serving itself calls."""
        from research.inputs.decoded import load_rgb
        from research.inputs.loaders import folder_transforms

        return folder_transforms(None, size, mean, std)(load_rgb(path, size, interpolation))[None]

    expected = preprocess("bilinear", HALF, HALF)
    # the test can tell the meta's choices apart: another interpolation, or ImageNet's statistics, differ
    assert not torch.allclose(expected, preprocess("bicubic", HALF, HALF), atol=1e-2)
    assert not torch.allclose(expected, preprocess("bilinear", IMAGENET_MEAN, IMAGENET_STD), atol=1e-2)
    frame = pd.DataFrame({"image": [b64(path)]})

    # the bare torch model of the run, and the registered pyfunc around it: the same input, bit for bit
    via_torch = load_model(f"runs:/{run_id}/model")
    assert via_torch.classifier.interpolation == "bilinear" and via_torch.classifier.mean == HALF
    seen, out = input_of(via_torch.classifier.module, via_torch.predict, frame)
    # the same pixels bit for bit; normalised alike up to float rounding (torchvision's Normalize vs ours: 1 ulp)
    from research.inputs.decoded import load_rgb

    assert np.array_equal(via_torch.classifier.pixels(path.read_bytes()), np.asarray(load_rgb(path, size, "bilinear")))
    torch.testing.assert_close(seen, expected, rtol=0, atol=3e-7)

    promote(run_id=run_id, name="clf-half")
    pyfunc = mlflow.pyfunc.load_model(f"models:/clf-half@{CHAMPION}")
    classifier = pyfunc.unwrap_python_model().classifier
    seen_pyfunc, out_pyfunc = input_of(classifier.module, pyfunc.predict, frame)
    torch.testing.assert_close(seen_pyfunc, seen, rtol=0, atol=0)  # the pyfunc and the bare model: bit for bit

    with torch.no_grad():
        probs = torch.softmax(tiny_module().eval()(expected), 1).numpy()[0]
    for result in (out, out_pyfunc):
        np.testing.assert_allclose(result[[f"p_{c}" for c in CLASSES]].to_numpy()[0], probs, atol=1e-6)
        assert result["label"][0] == CLASSES[int(probs.argmax())] and result["error"][0] == ""


def test_meta_writer_reader_and_older_models(tmp_path):
    meta = model_meta(classes=CLASSES, image_size=32, mean=HALF, std=HALF, interpolation="nearest", model="tiny",
                      dataset_version="v1", dataset_digest="abc", channels_last=True, pretrained="imagenet")
    assert meta["interpolation"] == "nearest" and meta["pretrained"] == "imagenet" and meta["mean"] == [0.5] * 3
    assert json.loads(json.dumps(meta)) == meta  # a plain, JSON-able dict
    (tmp_path / "extra_files").mkdir()
    (tmp_path / "extra_files" / META_FILE).write_text(json.dumps(meta))
    assert read_meta(tmp_path) == meta

    # a model logged before the meta carried its preprocessing: bicubic and ImageNet statistics
    old = {k: v for k, v in meta.items() if k not in ("interpolation", "mean", "std")}
    (tmp_path / "extra_files" / META_FILE).write_text(json.dumps(old))
    back = read_meta(tmp_path)
    assert back["interpolation"] == "bicubic"
    assert back["mean"] == list(IMAGENET_MEAN) and back["std"] == list(IMAGENET_STD)
    assert Classifier(torch.nn.Identity(), back, "cpu").mean == IMAGENET_MEAN

    with pytest.raises(ConfigError, match="no extra_files/model_meta.json"):
        read_meta(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="interpolation='lanczos'"):
        model_meta(classes=CLASSES, image_size=32, mean=HALF, std=HALF, interpolation="lanczos", model="tiny",
                   dataset_version="v1", dataset_digest="abc", channels_last=False)
    with pytest.raises(ConfigError, match="std="):
        Classifier(torch.nn.Identity(), meta | {"std": [0.5, 0.5]}, "cpu")


# ------------------------------------------------------------------------------ the pyfunc's rows

def test_decode_payload_and_row_error():
    raw = b"\x89PNG..."
    assert decode_payload(raw) == raw and decode_payload(bytearray(raw)) == raw
    assert decode_payload(base64.b64encode(raw).decode()) == raw
    assert decode_payload("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    wrapped = base64.encodebytes(raw * 20).decode()  # 76 columns, as `base64 FILE` and MIME encoders write it
    assert "\n" in wrapped.strip()
    assert decode_payload(wrapped) == decode_payload(wrapped.replace("\n", "\r\n")) == raw * 20
    with pytest.raises(ValueError, match="not base64"):
        decode_payload("%%%")
    with pytest.raises(ValueError, match="expected base64 text, got float"):
        decode_payload(math.nan)
    with pytest.raises(Exception) as junk:  # Pillow's error names the BytesIO object's address: the row's does not
        Image.open(io.BytesIO(b"junk"))
    assert "BytesIO" in str(junk.value)
    assert "BytesIO" not in row_error(junk.value) and row_error(junk.value).startswith("UnidentifiedImageError")


@pytest.mark.slow
def test_pyfunc_reads_any_mode_and_flags_bad_rows(mlflow_store, tmp_path):
    promote(run_id=log_tiny_model(tmp_path / "meta"), name="clf-modes")
    model = mlflow.pyfunc.load_model(f"models:/clf-modes@{CHAMPION}")
    buf = io.BytesIO()
    Image.new("P", (40, 20), 3).save(buf, format="GIF")
    frame = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode(), "%%%not base64%%%", ""]})
    out = model.predict(frame)
    assert list(out.columns) == ["label", "probability", *[f"p_{c}" for c in CLASSES], "error"]
    assert out["error"][0] == "" and out["label"][0] != ""
    assert math.isclose(out.filter(like="p_").iloc[0].sum(), 1.0, rel_tol=1e-5)
    assert "not base64" in out["error"][1] and out["label"][1] == ""
    assert out.loc[1:, ["probability", *[f"p_{c}" for c in CLASSES]]].isna().all(axis=None)
    assert out.loc[1, "probability"] is None and out.loc[2, "p_circle"] is None  # JSON null, not NaN
    assert out["error"][2] != ""


# ------------------------------------------------------------------------------ mlflow models serve

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ping(url: str, proc: subprocess.Popen, log_path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer on {url} within {timeout}s:\n{log_path.read_text()[-3000:]}")


def serve_env(tracking_uri: str) -> dict[str, str]:
    """The server execs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=path)


def post_json(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_models_serve_answers_invocations_like_the_pyfunc(mlflow_store, tmp_path):
    promote(run_id=log_tiny_model(tmp_path / "meta"))
    model_uri = f"models:/{MODEL_NAME}@{CHAMPION}"
    images = [b64(odd_image(tmp_path / "a.png"))]
    Image.open(tmp_path / "a.png").convert("L").save(tmp_path / "b.jpg")
    images += [b64(tmp_path / "b.jpg"), "bm90IGFuIGltYWdl"]  # the last: base64 of "not an image"
    expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))

    port = free_port()
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1", "-w", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=serve_env(mlflow_store))
    try:
        wait_for_ping(f"http://127.0.0.1:{port}/ping", proc, log_path, START_TIMEOUT)
        body = post_json(f"http://127.0.0.1:{port}/invocations",
                         {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group only
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    served = pd.DataFrame(body["predictions"])
    assert list(served.columns) == list(expected.columns)
    assert list(served["label"]) == list(expected["label"])
    prob_cols = [c for c in expected.columns if c.startswith("p_")] + ["probability"]
    pd.testing.assert_frame_equal(served[prob_cols].astype(float), expected[prob_cols].astype(float), atol=1e-6)
    assert served["error"][2] != "" and served["label"][2] == ""
    assert all(served["error"][:2] == "")
