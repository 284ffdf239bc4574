"""Promote under careless and concurrent use: one consistent champion, truthful output, no write before
the input is checked, one line when the store refuses a write.

Real runs (the module's `store` fixture: two trained resnet18 runs, `good` and `weak`), real promote
processes racing on one sqlite store.
"""

from __future__ import annotations

import shutil
import sqlite3

import mlflow
import pytest

from research.cli import main
from tests.conftest import Store
from tests.reliability import cli_env, start_cli
from tests.test_registry import by_val


def versions(name: str) -> list:
    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def race(store: Store, name: str, *runs: tuple[str, ...], tmp_path) -> list[str]:
    """Start one `promote` per argument list at once; their outputs, after all ended with 0 or 2."""
    env = cli_env(MLFLOW_TRACKING_URI=store.uri, COLUMNS="300")
    procs = [start_cli("promote", "--name", name, *args, cwd=store.workdir, env=env, log=tmp_path / f"p{i}.log")
             for i, args in enumerate(runs)]
    outs = []
    for p in procs:
        assert p.wait(timeout=300) in (0, 2)
        outs.append(p.log_path.read_text())
    return outs


def champion(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


@pytest.mark.slow
def test_concurrent_promotes_of_one_run_register_one_version(store: Store, tmp_path):
    outs = race(store, "race-same", *[("--run", store.good, "--force")] * 3, tmp_path=tmp_path)
    assert [str(v.version) for v in versions("race-same")] == ["1"]  # not versions 1 and 2 of the same run
    assert champion("race-same") == "1"
    for out in outs:  # each says what is true: version 1 is the champion
        assert "version 1" in out and "version 2" not in out, out


@pytest.mark.slow
def test_concurrent_promotes_of_two_runs_leave_one_consistent_champion(store: Store, tmp_path):
    outs = race(store, "race-two", ("--run", store.weak), ("--run", store.good), tmp_path=tmp_path)
    client = mlflow.MlflowClient()  # search results carry no aliases: get each version
    vs = {str(v.version): client.get_model_version("race-two", v.version) for v in versions("race-two")}
    champ = client.get_model_version_by_alias("race-two", "champion")
    assert champ.run_id == by_val(store)[1]  # whatever the order, the better run on val wins the gate or comes second
    for v in vs.values():  # no orphan: every version holds an alias
        assert v.aliases, f"version {v.version} has no alias"
    refused = [o for o in outs if "not better than the champion" in o]
    assert len(vs) + len(refused) == 2
    assert any(f"version {champ.version}" in o for o in outs)


def test_a_bad_name_is_refused_before_anything_is_written(store: Store, capsys):
    client = mlflow.MlflowClient()
    before = {m.model_id for m in client.search_logged_models([client.get_run(store.good).info.experiment_id])}
    for bad in ("bad/name", "a:b", ""):
        assert main(["promote", "--run", store.good, "--name", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --name") and len(err.strip().splitlines()) == 1, err
    after = {m.model_id for m in client.search_logged_models([client.get_run(store.good).info.experiment_id])}
    assert after == before  # no pyfunc copy or anything else was logged into the run


def test_a_read_only_store_is_one_line(store: Store, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "ro.db"
    shutil.copy(store.uri.removeprefix("sqlite:///"), copy)
    sqlite3.connect(copy).execute("PRAGMA query_only = ON").close()  # the file itself stays a valid store
    uri = f"sqlite:///file:{copy}?mode=ro&uri=true"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    code = main(["promote", "--run", store.good, "--name", "ro"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error: promote could not write") and "Traceback" not in err, err
    assert all(line.startswith("log: ") for line in lines[1:]), err  # the traceback is in the log file only
    assert "readonly" in err.lower() or "read-only" in err.lower() or "writable" in err.lower(), err
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)


@pytest.fixture(autouse=True)
def _store_env(store: Store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("RESEARCH_MLRUNS", str(store.workdir / "mlruns"))
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
