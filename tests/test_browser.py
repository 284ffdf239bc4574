"""The MLflow UI in a real headless Chromium, at the addresses the commands print: the experiment's runs table
(training view, the study's best metrics on its row), a trial's params and mistakes gallery, the champion alias.

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

from research import configfile, tracking
from research.sweep import SweepSpec, sweep

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1900,2000", "--virtual-time-budget=15000"]


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
    """The page's DOM after its scripts ran, and a screenshot of it: one browser start for both."""
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={profile}", "--dump-dom", f"--screenshot={shot}"]
    return subprocess.run([browser, *flags, url], capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def filled_store(tiny_version, mlflow_store, tmp_path):
    """A finished 2-trial study and its promoted champion in the test's store."""
    spec = configfile.from_dict(SweepSpec, {
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

        def open_page(url: str, name: str) -> str:  # the address a command prints, on this test's port
            assert url.startswith(tracking.LOCAL_UI), url
            return page(browser, base + url.removeprefix(tracking.LOCAL_UI), shots / name, tmp_path / "profiles" / name)

        # the experiment opens on its training runs (not the GenAI view), the study's row with its best metrics
        runs_dom = open_page(summary["runs_url"], "experiment_runs.png")  # as `sweep` prints it
        assert parent.info.run_name in runs_dom, "the study's parent run is not listed on the experiment page"
        assert "Training runs" not in runs_dom and "Observability" not in runs_dom, "the GenAI view opened"
        assert "best_val_f1_macro" in runs_dom, "no best_val_f1_macro column in the runs table"
        best = repr(parent.data.metrics["best_val_f1_macro"]).removesuffix(".0")  # as JavaScript prints it
        assert best in runs_dom, f"the study's row does not show its best val_f1_macro {best}"

        run_dom = open_page(tracking.run_url(child.info.run_id), "trial_run.png")
        assert child.info.run_name == f"browser #{summary['best_trial']} resnet18" and child.info.run_name in run_dom
        for key in ("lr", "sampler", "model", "dataset_version"):
            assert key in run_dom, f"param {key} not shown on the trial's run page"
        assert child.data.params["sampler"] in run_dom

        gallery = tracking.ui_url(f"experiments/{exp_id}/runs/{child.info.run_id}/artifacts/mistakes_test.png")
        artifacts_dom = open_page(gallery, "trial_mistakes.png")
        assert 'alt="mistakes_test.png"' in artifacts_dom, "the trial's mistakes gallery is not shown"

        model_dom = open_page(tracking.ui_url("models/illustration-classifier"), "registered_model.png")
        assert "champion" in model_dom, "alias champion not shown on the registered model page"
        version_dom = open_page(tracking.model_version_url(promotion.name, promotion.version), "model_version.png")
        assert f"Version {promotion.version}" in version_dom and "champion" in version_dom
        assert child.info.run_name in version_dom, "the version page does not name its source run"
        for name in ("experiment_runs.png", "trial_run.png", "trial_mistakes.png", "registered_model.png",
                     "model_version.png"):
            assert (shots / name).stat().st_size > 10_000, f"{name} looks blank"
        print(f"screenshots: {shots}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
