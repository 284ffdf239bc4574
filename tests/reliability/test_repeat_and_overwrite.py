"""Issue 35, holes of the fourth kind: promote and report that repeat or overwrite, and the minor cases.

`promote` is idempotent: the same ensemble as the champion is "already the champion" with no new run, an equal
score never beats the champion, and a refused or stopped candidate leaves no run and no weights (a killed one,
still RUNNING, is freed by `gc`). A report whose asked-for baseline is missing exits 2 and leaves the last good
report, and the study's logged one, as they were. Real runs in the module's store (two trained resnet18 runs).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from research.cli import main
from research.errors import ConfigError
from tests.conftest import EXPERIMENT, Store
from tests.reliability import styled_clean_dir, tiny_sweep_spec, tiny_train_config


def ensemble_runs(view: str = "active") -> list:
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], "tags.ensemble_of LIKE '%'",
                              run_view_type=ViewType.ACTIVE_ONLY if view == "active" else ViewType.ALL)


def live_models(run_id: str) -> list:
    from research.store import logged_models

    client = mlflow.MlflowClient()
    return list(logged_models(client, [client.get_run(run_id).info.experiment_id], {run_id}))


def test_a_refused_ensemble_leaves_no_run_and_no_weights(store: Store):
    """A refused ensemble kept its new run (and its copy of the members' weights)."""
    from research.registry import PromotionRefused, promote

    promote(run_id=store.good, metric="val_accuracy", name="ens-gate")  # chosen on another metric: not comparable
    with pytest.raises(PromotionRefused, match="Not comparable"):
        promote(experiment=EXPERIMENT, ensemble=2, name="ens-gate")
    assert ensemble_runs() == []
    (built,) = ensemble_runs("all")  # deleted: `gc` frees what MLflow keeps of it
    assert built.info.lifecycle_stage == "deleted" and live_models(built.info.run_id) == []


def test_an_interrupted_ensemble_leaves_no_run(store: Store, monkeypatch):
    """A stopped ensemble (Ctrl-C while it logs its model) stayed as a half-written run."""
    from research import runlog
    from research.registry import promote

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runlog, "log_model", stop)
    with pytest.raises(KeyboardInterrupt):
        promote(experiment=EXPERIMENT, ensemble=2, name="ens-stopped")
    assert ensemble_runs() == []


def test_promoting_the_same_ensemble_again_changes_nothing(store: Store, capsys):
    """`promote --ensemble 2` three times registered three identical versions, each a copy of the weights."""
    from research.registry import promote

    first = promote(experiment=EXPERIMENT, ensemble=2, name="ens-once")
    assert first.version == "1" and not first.already_champion
    for _ in range(2):
        assert main(["promote", "--experiment", EXPERIMENT, "--ensemble", "2", "--name", "ens-once"]) == 0
        out = capsys.readouterr().out
        assert f"run {first.run_id} is already the champion" in out and "nothing changed" in out
    client = mlflow.MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name = 'ens-once'")] == ["1"]
    assert [r.info.run_id for r in ensemble_runs()] == [first.run_id]  # no new run, no new copy


def test_an_equal_score_never_beats_the_champion():
    """The gate compared a tag rounded to 6 decimals with the full score, so equal counted as better."""
    from research.registry import Champion, PromotionRefused, gate
    from research.runquery import Candidate

    class Run:
        class info:
            run_id = "cand"

        class data:
            params = {"dataset_digest": "d"}
            metrics: dict = {}
            tags: dict = {}

    score = 0.61234523  # its tag says 0.612345: the full score is above that, yet no better
    champ = Champion("1", "champ", "val_f1_macro", float(f"{score:.6f}"), "d", "v", None, None)
    with pytest.raises(PromotionRefused, match="not better than the champion"):
        gate(champ, Candidate(Run, score, "val_f1_macro"), "m")


def test_gc_frees_an_ensemble_whose_process_was_killed(store: Store, capsys):
    """A killed ensemble stayed RUNNING, and `gc` never freed it."""
    import psutil

    from research import tracking

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time() if dead.poll() is None else 1.0
    dead.wait()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.create_run(exp, tags={**tracking.run_tags(), "pid": str(dead.pid), "process_started": str(started),
                                       "ensemble_of": f"{store.good},{store.weak}"})
    client.log_text(run.info.run_id, "half an ensemble", "model_meta.json")
    from research.artifacts import plan

    assert [i.kind for i in plan() if i.what == run.info.run_id] == ["killed ensemble"]
    assert main(["gc", "--yes"]) == 0
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):  # deleted, then freed for good
        client.get_run(run.info.run_id)


def test_a_name_no_models_uri_can_load_is_refused(store: Store, capsys):
    for bad in ("x@y", "x/1", " x"):
        assert main(["promote", "--run", store.good, "--name", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --name {bad!r}"), err
    assert mlflow.MlflowClient().search_registered_models("name = 'x@y'") == []


def test_runs_top_must_not_be_negative(store: Store, capsys):
    """`runs --top -1` dropped a row."""
    assert main(["runs", "--top", "-1"]) == 2
    assert "error: --top -1: give how many rows to show (0 shows all)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ report

def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_report_with_a_missing_baseline_keeps_the_last_good_one(store: Store, tmp_path, capsys):
    """`report --baseline <typo>` exited 0 and overwrote the good report and the study's logged one."""
    spec = tmp_path / "rep.yaml"
    spec.write_text(yaml.safe_dump(tiny_sweep_spec(store.version, tmp_path / "ckpt", "rep", 1, 1,
                                                   space={})))
    storage = f"journal:{tmp_path / 'rep.journal'}"
    assert main(["sweep", str(spec), "--storage", storage]) == 0
    out = tmp_path / "reports"
    assert main(["report", "--study", "rep", "--storage", storage, "--out", str(out)]) == 0  # default baseline: a note
    good = fingerprint(out)
    parent = json.loads((out / "report.json").read_text())["parent_run_id"]
    logged = Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report/report.json",
                                                      dst_path=str(tmp_path / "before"))).read_bytes()
    capsys.readouterr()
    assert main(["report", "--study", "rep", "--storage", storage, "--out", str(out), "--baseline", "typo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no baseline typo: no study 'typo'") and f"the report in {out} is left" in err
    assert fingerprint(out) == good
    assert Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report/report.json",
                                                    dst_path=str(tmp_path / "after"))).read_bytes() == logged


# ------------------------------------------------------------------------------ Ctrl-C in styles

def test_ctrl_c_before_the_first_epoch_of_styles_suggests_what_works(tmp_path, mlflow_store, monkeypatch, capsys):
    """Ctrl-C before the first epoch of `styles` suggested a `train --resume` that fails (no checkpoint yet)."""
    from research import train as train_module
    from research.data.split import build_version

    monkeypatch.chdir(tmp_path)
    clean = styled_clean_dir(tmp_path, {cls: {"ink": 4, "mono": 4} for cls in ("circles", "squares", "stripes")})
    version = build_version(clean, "sv", recipe="v1", out_root=tmp_path / "versions", progress=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"study_name": "s", "n_trials": 1, "space": {},
                                    "base": tiny_train_config(version, tmp_path / "ckpt", batch_size=4)}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", interrupted)
    assert main(["styles", "--spec", str(spec), "--style", "mono"]) == 130
    out = capsys.readouterr().out.replace("\n", " ")
    assert "train --resume" not in out, out
    assert "nothing to resume" in out and "Run the same `python -m research styles` command again" in out
    with pytest.raises(ConfigError, match="nothing to resume|stopped before its first epoch"):
        from research.checkpoints import check_resumable

        run = mlflow.MlflowClient().search_runs([mlflow.MlflowClient().get_experiment_by_name("styles")
                                                 .experiment_id], "tags.holdout_style = 'mono'")[0]
        check_resumable(tmp_path / "ckpt" / run.info.run_id, run.info.run_id, run.info.status)
