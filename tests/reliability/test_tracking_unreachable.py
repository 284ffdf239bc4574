"""Fault 5: MLFLOW_TRACKING_URI points at a closed local port.

`train` and `sweep` must exit non-zero within 30 s with one clean line naming the URI (no traceback,
no minutes of HTTP retries) and leave nothing behind: no mlruns/, no study journal or lock file, no
data cache, no checkpoint dir.
"""

from __future__ import annotations

import socket
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
