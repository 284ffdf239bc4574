"""Fault 2: SIGKILL a `python -m research train` process mid-epoch, then `train --resume`.

The kill lands after epoch 1's checkpoint (`<checkpoint_dir>/<run_id>/last.pt`), half an epoch into
a later epoch, so nobody ends the MLflow run (it stays RUNNING) and the system-metrics thread dies
with the process. `--resume <checkpoint dir>` must finish the same run: FINISHED, exactly one value
per epoch for every metric of `EPOCH_METRICS` (no duplicates, no gaps), system metrics continuing
without a repeated step, and per-epoch and test metrics equal to an uninterrupted run with the
same seed (abs 1e-6).
"""

from __future__ import annotations

import time

import mlflow
import pytest
import torch
import yaml

from research.runlog import EPOCH_METRICS
from tests.reliability import cli_env, kill, run_cli, start_cli, tail, tiny_train_config, wait_for

pytestmark = pytest.mark.slow
EPOCHS = 6
COMPARED = ("train_loss", "val_loss", "val_accuracy", "val_f1_macro")


def write_config(path, version, ckpt, run_name):
    cfg = tiny_train_config(version, ckpt, epochs=EPOCHS, run_name=run_name, lr_schedule="cosine", loss="focal",
                            sampler="weighted", optimizer="sgd")
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_version, mlflow_store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = cli_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    client = mlflow.MlflowClient()

    # the reference: same config and seed, never interrupted
    out, ref_s = run_cli("train", "--config", write_config(tmp_path / "full.yaml", tiny_version, tmp_path / "ck_full",
                                                           "full"), cwd=work, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    # the victim: killed half an epoch after its first checkpoint
    ckpt = tmp_path / "ck"
    proc = start_cli("train", "--config", write_config(tmp_path / "kill.yaml", tiny_version, ckpt, "killed"),
                     cwd=work, env=env, log=tmp_path / "killed.log")
    try:
        last = wait_for(lambda: next(iter(ckpt.glob("*/last.pt")), None) or proc.poll() is not None, timeout=300,
                        interval=0.05, what="the first checkpoint")
        assert proc.poll() is None, f"finished before the kill: {tail(proc.log_path)}"
        first_epoch = torch.load(last, map_location="cpu", weights_only=False)["state"]["history"][0]
        time.sleep(first_epoch["epoch_seconds"] / 2)
        t_kill = time.perf_counter()
        kill(proc)
    finally:
        kill(proc)
    run_id = last.parent.name
    state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    killed_at = state["epoch"]
    assert 1 <= killed_at < EPOCHS, f"the kill must land mid-run, checkpoint at epoch {killed_at}"
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # SIGKILL: nobody ended it
    logged_before = [s for s, _ in history(client, run_id, "val_f1_macro")]
    assert logged_before in (list(range(1, killed_at + 1)), list(range(1, killed_at)))
    sys_before = {k: history(client, run_id, k) for k in run.data.metrics if k.startswith("system/")}

    out, resume_s = run_cli("train", "--resume", last.parent, cwd=work, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\nreference {ref_s:.1f}s; killed at epoch {killed_at} + half of {first_epoch['epoch_seconds']:.2f}s "
          f"({len(logged_before)} epochs in MLflow); resume {resume_s:.1f}s; "
          f"system metrics before the kill: {len(sys_before)} keys")

    full_id = client.search_runs([run.info.experiment_id], "attributes.run_name = 'full'")[0].info.run_id
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.params["epochs"] == str(EPOCHS)
    for key in EPOCH_METRICS:
        steps = [s for s, _ in history(client, run_id, key)]
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)  # one value per epoch: no duplicate, no gap
    for key in COMPARED:
        a = [v for _, v in history(client, full_id, key)]
        b = [v for _, v in history(client, run_id, key)]
        assert b == pytest.approx(a, abs=1e-6), key
    for key in ("test_f1_macro", "test_accuracy", "best_epoch"):
        assert resumed.data.metrics[key] == pytest.approx(client.get_run(full_id).data.metrics[key], abs=1e-6), key
    # the resumed process's system-metrics thread continues the steps of the killed one
    for key, before in sys_before.items():
        steps = [s for s, _ in history(client, run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
        assert len(steps) >= len(before)
    assert not last.parent.exists()  # checkpoints live in the run now; the local copy is cleaned up
    assert mlflow.pytorch.load_model(f"runs:/{run_id}/model") is not None  # the best weights live in the run's model
    assert time.perf_counter() - t_kill < 600
