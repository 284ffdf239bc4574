"""The MLflow UI in a real headless Chromium: the study's runs, their params, the champion alias.

Chromium comes from Debian's packages (`chromium`), installed here when missing; never a browser
download. Where it cannot be installed the test skips and says why. Screenshots land in the
test's tmp dir (printed), and in $BROWSER_SCREENSHOTS when set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from research import config as config_mod
from research.sweep import SweepSpec, sweep

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1500,2000", "--virtual-time-budget=15000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and apt-get is not usable here (needs root): "
                    "apt-get install chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install Chromium from Debian's packages: `{' '.join(cmd)}` said "
                        f"{(done.stderr or done.stdout).strip()[-400:]}")
    path = shutil.which("chromium")
    if not path:
        pytest.skip("apt-get installed chromium but no `chromium` executable is on PATH")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page(browser: str, url: str, shot: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    return dom


@pytest.fixture
def filled_store(tiny_version, mlflow_store, tmp_path):
    """A finished 2-trial study and its promoted champion in the test's store."""
    spec = config_mod.from_dict(SweepSpec, {
        "study_name": "browser", "n_trials": 2,
        "base": {"model": "resnet18", "dataset": str(tiny_version), "image_size": 32, "epochs": 1,
                 "batch_size": 8, "device": "cpu", "checkpoint_dir": str(tmp_path / "ckpt")},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                  "sampler": {"type": "categorical", "choices": ["shuffle", "weighted"]}},
        "pruner": {"name": "none"}, "sampler": {"name": "random", "seed": 0},
    })
    summary = sweep(spec, f"journal:{tmp_path / 'browser.journal'}")
    from research.registry import promote

    promotion = promote(study="browser", model_filter="resnet18")
    return summary, promotion


def test_mlflow_ui_shows_study_runs_params_and_champion(filled_store, mlflow_store, tmp_path):
    browser = chromium()
    summary, promotion = filled_store
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    exp_id = parent.info.experiment_id
    child = client.get_run(summary["best_run_id"])

    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        [sys.executable, "-m", "research", "ui", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shots = Path(os.environ.get("BROWSER_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"the MLflow UI did not start on port {port}")
                time.sleep(0.5)

        runs_dom = page(browser, f"{base}/#/experiments/{exp_id}/runs", shots / "experiment_runs.png", tmp_path / "p1")
        assert parent.info.run_name in runs_dom, "the study's parent run is not listed on the experiment page"

        run_dom = page(browser, f"{base}/#/experiments/{exp_id}/runs/{child.info.run_id}",
                       shots / "trial_run.png", tmp_path / "p2")
        assert child.info.run_name in run_dom
        for key in ("lr", "sampler", "model", "dataset_version"):
            assert key in run_dom, f"param {key} not shown on the trial's run page"
        assert child.data.params["sampler"] in run_dom

        model_dom = page(browser, f"{base}/#/models/illustration-classifier", shots / "registered_model.png",
                         tmp_path / "p3")
        assert "champion" in model_dom, "alias champion not shown on the registered model page"
        for name in ("experiment_runs.png", "trial_run.png", "registered_model.png"):
            assert (shots / name).stat().st_size > 10_000, f"{name} looks blank"
        print(f"screenshots: {shots}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
