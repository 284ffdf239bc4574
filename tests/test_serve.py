"""`mlflow models serve` on the champion answers a real HTTP request as the Python pyfunc does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest

from research.registry import MODEL_NAME, promote
from tests.test_registry import b64, private_store, split_images, tiny_cfg

START_TIMEOUT = 240  # seconds for the server to answer /ping (a loaded 2-core box is slow)


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
def test_models_serve_answers_invocations_like_the_pyfunc(tiny_version, tmp_path):
    from research.train import train

    with pytest.MonkeyPatch.context() as mp:
        uri = private_store(mp, tmp_path)
        run_id = train(tiny_cfg(tiny_version, tmp_path, epochs=1)).run_id
        promote(run_id=run_id, model_filter="resnet18")
        model_uri = f"models:/{MODEL_NAME}@champion"
        paths, _ = split_images(tiny_version)
        images = [b64(p) for p in paths[:3]] + ["bm90IGFuIGltYWdl"]  # the last: base64 of "not an image"
        expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))

        port = free_port()
        log_path = tmp_path / "serve.log"
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-p", str(port), "-h", "127.0.0.1", "-w", "1"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=serve_env(uri))
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
    assert served["error"][3] != "" and served["label"][3] == ""
    assert all(served["error"][:3] == "")
