"""Fault 5: MLFLOW_TRACKING_URI points at a closed local port.

`train` and `sweep` must exit non-zero within 30 s with one clean line naming the URI (no traceback,
no minutes of HTTP retries) and leave nothing behind: no mlruns/, no study journal or lock file, no
data cache, no checkpoint dir.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.reliability import cli_env, files_under, run_cli, tiny_train_config

LIMIT_S = 30


def closed_port() -> int:
    """A local port nobody listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_server(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    work = tmp_path / "work"  # the child's working directory: relative mlruns/ and data/cache land here
    work.mkdir()
    env = cli_env(MLFLOW_TRACKING_URI=uri)
    env.pop("RESEARCH_MLRUNS", None)  # the default local home, mlruns/ under the working directory
    return uri, work, env


def assert_clean_failure(out, seconds: float, uri: str) -> None:
    assert out.returncode != 0, out.stdout[-2000:]
    assert seconds < LIMIT_S, f"took {seconds:.1f}s"
    assert uri in out.stderr, out.stderr[-2000:]
    assert "not reachable" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]


@pytest.mark.slow
def test_train_fails_fast_and_writes_nothing(tiny_version, dead_server, tmp_path):
    uri, work, env = dead_server
    ckpt = tmp_path / "ckpt"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, ckpt)))
    version_before = files_under(tiny_version)
    out, seconds = run_cli("train", "--config", cfg, cwd=work, env=env, timeout=120)
    print(f"train against {uri}: rc {out.returncode} in {seconds:.1f}s: {out.stderr.strip()[-300:]}")
    assert_clean_failure(out, seconds, uri)
    assert files_under(work) == []  # no mlruns/, no data/cache/
    assert not ckpt.exists()
    assert files_under(tiny_version) == version_before


@pytest.mark.slow
def test_sweep_fails_fast_and_writes_nothing(tiny_version, dead_server, tmp_path):
    uri, work, env = dead_server
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "study_name": "dead", "n_trials": 2,
        "base": tiny_train_config(tiny_version, tmp_path / "ckpt"),
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
    }))
    t0 = time.perf_counter()
    for extra in ([], ["--workers", "2"]):
        out, seconds = run_cli("sweep", spec, *extra, cwd=work, env=env, timeout=120)
        print(f"sweep {extra} against {uri}: rc {out.returncode} in {seconds:.1f}s: {out.stderr.strip()[-300:]}")
        assert_clean_failure(out, seconds, uri)
        assert files_under(work) == []  # no mlruns/optuna.journal, no .lock, no cache
        assert not (tmp_path / "ckpt").exists()
    assert time.perf_counter() - t0 < 2 * LIMIT_S


def test_every_tracked_command_stops_before_its_imports(dead_server):
    """The CLI boundary asks the server before a command that opens the tracking store imports its stage (torch and
    MLflow: seconds): each of them is one error line, exit 2, with neither loaded and nothing written. (Optuna's
    logger is loaded by every command's log routing, research/logs.py: a fifth of a second.)"""
    uri, work, env = dead_server
    script = ("import json, sys\nfrom research.cli import USES_TRACKING, main\n"
              "codes = {name: main([name]) for name in sorted(USES_TRACKING)}\n"
              "print(json.dumps({'codes': codes, 'loaded': [m for m in ('torch', 'mlflow') "
              "if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    codes = result["codes"]
    assert set(codes) >= {"train", "sweep", "promote", "predict", "runs", "report", "styles", "gc"}
    assert set(codes.values()) == {2}, out.stderr[-3000:]
    assert result["loaded"] == [], result
    assert out.stderr.count(f"error: MLflow tracking server {uri} is not reachable") == len(codes), out.stderr
    assert files_under(work) == []
