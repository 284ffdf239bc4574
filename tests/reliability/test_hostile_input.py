"""Hostile and careless input (issue 19, items 3, 4 and 11): each reproduction from the issue, on the real stack.

- A 1.4 MB PNG of 13300x13300 RGBA16 (176.9 MP: over MAX_PIXELS, under twice Pillow's limit, where Pillow
  only warns) and the same PNG inside an ICO whose directory claims 16x16 (Pillow decodes the embedded PNG
  while opening): refused by scan, the cache's decode, the pyfunc, `predict` and the HTTP server, without
  the pixels ever being decoded (the memory of a fresh process is measured).
- `predict` over large files: what it holds does not grow with the number of files (tracemalloc).
- A FIFO or a device given to `predict`: a row with an error, not a hang.
- The HTTP server's answer is strict JSON: a failed row's numbers are null, never NaN.
- `{'image': [b64, ...]}`, base64 wrapped at 76 columns, 16-bit and float images, the `.env.example`
  password, and the server's request timeout (documented in docs/guarantees.md, not chunked).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from research.cli import main
from research.data.image import MAX_PIXELS
from research.predict import NOT_REGULAR, collect, predict_files
from research.registry import promote
from research.serving import load_model
from tests.reliability import REPO, cli_env
from tests.test_serving import CLASSES, log_tiny_model, odd_image

BOMB_SIDE = 13_300  # 13300 x 13300 = 176,890,000 pixels: over MAX_PIXELS, under 2 x MAX_PIXELS
assert MAX_PIXELS < BOMB_SIDE**2 < 2 * MAX_PIXELS


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def rgba16_bomb() -> bytes:
    """A complete, valid 13300x13300 RGBA 16-bit PNG of zeros: about 1.4 MB on disk, 1.4 GB once inflated.

    One 500-row block is deflated once and repeated (a full flush makes each copy independent), so making
    it takes about a second instead of deflating 1.4 GB.
    """
    row = b"\0" * (BOMB_SIDE * 8 + 1)  # filter byte + 8 bytes per pixel
    rows_per_block = 500
    block = row * rows_per_block
    z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the zlib header and checksum are added below
    deflated = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(BOMB_SIDE, rows_per_block)
    tail = z.compress(row * rest) + z.flush()
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = b"\x78\xda" + deflated * blocks + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 16, 6, 0, 0, 0)  # 16-bit, colour type 6 = RGBA
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def ico_around(png: bytes) -> bytes:
    """An ICO whose one directory entry claims 16x16 and holds `png`."""
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    """A class folder `x` holding the PNG bomb and the ICO around it."""
    root = tmp_path_factory.mktemp("bombs")
    (root / "x").mkdir()
    png = rgba16_bomb()
    assert 1_000_000 < len(png) < 2_000_000  # "a 1.4 MB PNG"
    (root / "x" / "rgba16.png").write_bytes(png)
    (root / "x" / "claims16.ico").write_bytes(ico_around(png))
    return root


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def champion(mlflow_store, tmp_path) -> str:
    """The tiny model of tests/test_serving.py, registered and promoted: its `models:/...@champion` URI."""
    promote(run_id=log_tiny_model(tmp_path / "meta"), name="clf-hostile")
    return "models:/clf-hostile@champion"


# ------------------------------------------------------------------------------ 3. the pixel limit, everywhere

BOMB_PATHS = """
import json, resource, sys, warnings
from pathlib import Path
import pandas as pd, torch
from research.data import image, scan
from research.predict import predict_files
from research.serving import Classifier, ClassifierModel, model_meta
warnings.simplefilter("ignore")
root = Path(sys.argv[1])
files = sorted((root / "x").iterdir())
torch.manual_seed(0)
module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                             torch.nn.Linear(4, 3))
meta = model_meta(classes=["a", "b", "c"], image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                  model="tiny", dataset_version="t", dataset_digest="0", channels_last=False)
classifier = Classifier(module, meta, "cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inventory = scan.scan(root, workers=1, progress=False)
out = {"scan": dict(zip(inventory["path"], inventory["error"]))}
out["cache"] = []
for f in files:
    try:
        image.decode(f, 24)
        out["cache"].append("")
    except image.ImageTooLarge as exc:
        out["cache"].append(str(exc))
frame = pd.DataFrame({"image": [f.read_bytes() for f in files]})
out["pyfunc"] = list(classifier.predict_frame(frame)["error"])
out["predict"] = list(predict_files(ClassifierModel(classifier), files)["error"])
out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_same_pixel_limit_refuses_the_bomb_on_every_path_without_decoding_it(bombs):
    proc = subprocess.run([sys.executable, "-c", BOMB_PATHS, str(bombs)], capture_output=True, text=True,
                          env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    limit = f"{MAX_PIXELS:,}"
    assert set(out["scan"]) == {"x/claims16.ico", "x/rgba16.png"}
    assert all(e.startswith("decompression bomb") for e in out["scan"].values()), out["scan"]
    for path in ("cache", "pyfunc", "predict"):
        assert len(out[path]) == 2 and all(limit in e and "refused without decoding" in e for e in out[path]), out
    # 176.9 MP of RGBA is 700 MB as 8-bit pixels, 1.4 GB as 16-bit: none of it was ever allocated
    assert out["grew_mb"] < 150, f"the process grew by {out['grew_mb']:.0f} MB: the pixels were decoded"


# ------------------------------------------------------------------------------ 3. predict streams its files

def large_files(folder: Path, count: int) -> list[Path]:
    """`count` real, valid PNGs of about 12 MB each (noise, stored uncompressed): big on disk, quick to decode."""
    folder.mkdir(exist_ok=True)
    first = folder / "big_0.png"
    if not first.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)).save(first, compress_level=0)
    for i in range(1, count):
        if not (folder / f"big_{i}.png").exists():
            shutil.copy(first, folder / f"big_{i}.png")
    return [folder / f"big_{i}.png" for i in range(count)]


def peak_python_bytes(model, files: list[Path]) -> tuple[int, pd.DataFrame]:
    """The peak of Python-visible memory (bytes, str, numpy) while `predict_files` runs, and its result."""
    tracemalloc.start()
    try:
        result = predict_files(model, files)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_predict_holds_a_bounded_amount_whatever_the_number_of_files(champion, tmp_path):
    model = load_model(champion)
    files = large_files(tmp_path / "big", 12)
    total = sum(f.stat().st_size for f in files)
    assert total > 140e6
    peak2, _ = peak_python_bytes(model, files[:2])
    peak12, result = peak_python_bytes(model, files)
    assert (result["error"] == "").all() and (result["label"] != "").all()
    # before: one batch held every file's base64 (1.33 x the total) at once; now a batch holds at most
    # MAX_BATCH_BYTES of files or one bigger file, so 12 files need no more than 2
    assert peak12 < 1.5 * peak2, f"12 files peaked at {peak12 / 1e6:.0f} MB, 2 files at {peak2 / 1e6:.0f} MB"
    assert peak12 < total / 2, f"peak {peak12 / 1e6:.0f} MB for {total / 1e6:.0f} MB of files"


# ------------------------------------------------------------------------------ 3. only regular files are read

@pytest.mark.slow
def test_predict_answers_a_fifo_and_a_device_with_an_error_instead_of_hanging(champion, tmp_path, capsys):
    good = odd_image(tmp_path / "good.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "dir"
    folder.mkdir()
    os.mkfifo(folder / "in-a-folder.png")
    shutil.copy(good, folder / "good.png")
    assert collect([folder]) == [folder / "good.png"]  # a folder's FIFO is never listed

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(
        main(["predict", str(fifo), "/dev/null", str(good), "--json", "--model", champion])), daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():  # the old code blocks in open(): give it a writer that closes at once, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=30)
        pytest.fail("predict blocked on a FIFO")
    assert codes == [0]
    rows = {r["file"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[str(fifo)]["error"] == NOT_REGULAR and rows["/dev/null"]["error"] == NOT_REGULAR
    assert rows[str(fifo)]["probability"] is None and rows[str(fifo)]["label"] == ""
    assert rows[str(good)]["error"] == "" and rows[str(good)]["label"] in CLASSES


# ------------------------------------------------------------------------------ 4. strict JSON over HTTP

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scoring_server(model_uri: str, monkeypatch, timeout_s: int | None = None):
    """MLflow's own scoring app (what `mlflow models serve` runs) under uvicorn in a thread: its base URL."""
    import uvicorn
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server as mlflow_scoring

    monkeypatch.delenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, raising=False)  # init() sets it: restored after
    if timeout_s is not None:
        monkeypatch.setenv(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name, str(timeout_s))
    app = mlflow_scoring.init(mlflow.pyfunc.load_model(model_uri))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the scoring server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post(url: str, payload: dict) -> tuple[int, str]:
    req = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_served_answers_are_strict_json_with_null_for_failed_rows(champion, bombs, monkeypatch, tmp_path):
    good = b64(odd_image(tmp_path / "good.png").read_bytes())
    bomb = b64((bombs / "x" / "rgba16.png").read_bytes())
    with scoring_server(champion, monkeypatch) as url:
        start = time.monotonic()
        status, body = post(url, {"dataframe_split": {"columns": ["image"],
                                                      "data": [[good], ["bm90IGFuIGltYWdl"], [bomb]]}})
        assert status == 200, body
        assert time.monotonic() - start < 30  # the bomb's 1.4 GB were never inflated
        rows = strict_json(body)["predictions"]
        # a dict of lists (`inputs`) is the same request
        status, same = post(url, {"inputs": {"image": [good, "bm90IGFuIGltYWdl"]}})
        assert status == 200 and strict_json(same)["predictions"] == rows[:2]
    assert [r["error"] == "" for r in rows] == [True, False, False]
    assert f"{MAX_PIXELS:,}" in rows[2]["error"]
    for r in rows[1:]:
        assert r["label"] == "" and r["probability"] is None
        assert all(r[f"p_{c}"] is None for c in CLASSES)
    assert rows[0]["label"] in CLASSES and 0 < rows[0]["probability"] <= 1


# ------------------------------------------------------------------------------ 11. careless clients

@pytest.mark.slow
def test_a_dict_of_lists_and_wrapped_base64_are_accepted(champion, tmp_path):
    model = mlflow.pyfunc.load_model(champion)
    raw = odd_image(tmp_path / "good.png").read_bytes()
    expected = model.predict(pd.DataFrame({"image": [b64(raw)]}))
    wrapped = base64.encodebytes(raw).decode("ascii")  # 76 columns, "\n" (as `base64 FILE` writes it)
    assert "\n" in wrapped.strip()
    for image in (wrapped, wrapped.replace("\n", "\r\n"), "data:image/png;base64,\n" + wrapped):
        pd.testing.assert_frame_equal(model.predict(pd.DataFrame({"image": [image]})), expected)
    out = model.predict({"image": [b64(raw), wrapped, "bm90IGFuIGltYWdl"]})
    assert len(out) == 3 and list(out["error"][:2]) == ["", ""] and out["error"][2]
    assert list(out["label"][:2]) == [expected["label"][0]] * 2
    assert len(model.predict({"image": []})) == 0


@pytest.mark.slow
def test_16_bit_and_float_images_read_as_the_8_bit_image_they_show(champion):
    model = mlflow.pyfunc.load_model(champion)
    grey = np.full((40, 40), 32768, np.uint16)
    grey[0, 0] = 256  # one odd pixel must not change how the rest reads
    images = {
        "8-bit grey 128": png_bytes(Image.new("L", (40, 40), 128)),
        "16-bit PNG": png_bytes(Image.fromarray(grey)),
        "16-bit TIFF": png_bytes(Image.fromarray(grey), "TIFF"),
        "float TIFF in [0, 1]": png_bytes(Image.fromarray(np.full((40, 40), 128 / 255, np.float32)), "TIFF"),
    }
    out = model.predict(pd.DataFrame({"image": [b64(v) for v in images.values()]}))
    assert (out["error"] == "").all(), out["error"]
    probs = out[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(probs, np.repeat(probs[:1], len(images), axis=0), atol=1e-4, err_msg=str(list(images)))


# ------------------------------------------------------------------------------ 11. the .env.example password

def check_env(password: str) -> subprocess.CompletedProcess:
    """docker/init_db.py --check-env, as the compose `preflight` service runs it (nothing listens on the port)."""
    env = cli_env(POSTGRES_PASSWORD=password, POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(free_port()))
    return subprocess.run([sys.executable, str(REPO / "docker" / "init_db.py"), "--check-env"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_example_password_does_not_start_a_stack():
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    refused = check_env(example["POSTGRES_PASSWORD"])
    assert refused.returncode == 1 and "placeholder 'change-me'" in refused.stderr and ".env" in refused.stderr
    assert check_env("Xq3-b7_k9.Lm2").returncode == 0
    # every service needs PostgreSQL, and PostgreSQL starts only once the check passed: the image writes the
    # password into its volume on the first start, so a later fix in .env would not reach the database
    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    assert services["postgres"]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"
    assert services["preflight"]["command"] == ["python", "docker/init_db.py", "--check-env"]
    assert "POSTGRES_PASSWORD" in services["preflight"]["environment"]


# ------------------------------------------------------------------------------ 11. the server's request limit

@pytest.mark.slow
def test_a_request_longer_than_the_server_timeout_is_lost_as_documented(champion, monkeypatch, tmp_path):
    """docs/guarantees.md: one request must finish within MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (`-t`), or it
    gets a 504 and no rows; split big jobs into requests that fit."""
    yy, xx = np.mgrid[:1500, :1500]
    smooth = Image.fromarray(np.dstack([xx % 256, yy % 256, (xx + yy) % 256]).astype(np.uint8))
    slow = b64(png_bytes(smooth))  # small to send, seconds to decode many times
    with scoring_server(champion, monkeypatch, timeout_s=1) as url:
        start = time.monotonic()
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[slow]] * 120}})
        assert status == 504 and "exceeded" in body and time.monotonic() - start < 30
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [[slow]]}})
        assert status == 200 and strict_json(body)["predictions"][0]["error"] == ""
    assert "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in (REPO / "docs" / "guarantees.md").read_text()
