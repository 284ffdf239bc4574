"""`runs` and `ui` (research.runs): the leaderboard and the MLflow UI command over real trained runs
in a private store (the `store` fixture, tests/conftest.py)."""

from __future__ import annotations

from research import runs as runs_mod
from research.cli import main
from tests.conftest import EXPERIMENT


def test_runs_leaderboard_ranks_by_best_val_f1(store, capsys, monkeypatch):
    from research.runs import leaderboard

    rows = leaderboard(experiment=EXPERIMENT)
    assert {r["run_id"] for r in rows} == {store.good, store.weak}
    assert rows[0]["val_f1_macro"] >= rows[1]["val_f1_macro"]
    assert all(r["model"] == "resnet18" and r["dataset"] == "tiny" and r["seconds"] > 0 for r in rows)
    capsys.readouterr()
    monkeypatch.setattr(runs_mod.console, "width", 200)
    assert main(["runs", "--experiment", EXPERIMENT, "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and store.good[:8] in out


def test_ui_command_points_at_the_store(store):
    from research.runs import ui_command

    cmd = ui_command("127.0.0.1", 5055)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == store.uri
    assert cmd[cmd.index("--default-artifact-root") + 1] == (store.workdir / "mlruns" / "artifacts").as_uri()
    assert cmd[cmd.index("--port") + 1] == "5055"
