"""`benchmarks/gpu_e2e.sh --smoke`: the GPU box's one script runs end to end on the CPU, so that on the day only the
device can fail. It runs the real CLI (build, clean, split, sweep with 2 workers, promote, predict, the served check)
and the benchmarks in a workspace of its own, and writes one JSON whose figures are checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# 2-4 min on 2 shared CPU cores: nine commands, each importing torch and MLflow, two of them sweep workers
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-e2e")
    # one torch thread per command, as tests/reliability's children: on 2 busy cores a second OpenMP thread
    # spin-waits for a core another process holds (the smoke's figures are only checked to be measured)
    env = dict(os.environ, OUT_DIR=str(tmp / "results"), TMPDIR=str(tmp), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RESEARCH_MLRUNS"):
        env.pop(key, None)  # the script must set its own store, whatever the caller's environment says
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_e2e.sh"), "--smoke"], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=900)
    files = list((tmp / "results").glob("gpu-e2e-*.json"))
    assert len(files) == 1, out.stdout[-3000:] + out.stderr[-3000:]
    return out, json.loads(files[0].read_text()), tmp


def test_every_step_succeeds_and_the_script_exits_zero(smoke):
    out, result, _ = smoke
    failed = {name: step.get("error") or step.get("figures_error") or step.get("skipped")
              for name, step in result["steps"].items() if not step["ok"]}
    assert not failed and out.returncode == 0, (failed, out.stderr[-2000:])
    assert list(result["steps"]) == ["data_build", "data_clean", "data_split", "bench_loader", "bench_train",
                                     "sweep", "promote", "predict_cpu", "served_check"]
    assert all(step["seconds"] > 0 for step in result["steps"].values())
    assert result["mode"] == "smoke" and result["ok"] and result["failed_steps"] == []


def test_the_dataset_is_built_cleaned_and_split_as_v3(smoke):
    steps = smoke[1]["steps"]
    assert steps["data_build"]["classes"] == 3 and steps["data_build"]["photos"] >= 1
    assert steps["data_clean"]["quarantined"] >= 1
    assert steps["data_split"]["version"] == "v3" and min(steps["data_split"]["images"].values()) >= 3


def test_the_study_completes_distinct_trials_on_two_workers(smoke):
    sweep = smoke[1]["steps"]["sweep"]
    assert sweep["trials_completed"] >= 1 and sweep["trials_per_minute"] > 0
    assert sweep["distinct_param_sets"] == sum(sweep["trials"].values()) == 2
    assert sweep["best_run_logged"]["image_size"] == "32"


def test_the_champion_has_val_and_test_figures_and_serves_what_it_logged(smoke):
    steps = smoke[1]["steps"]
    champion = steps["promote"]["champion"]
    assert 0 <= champion["val_f1_macro"] <= 1 and 0 <= champion["test_f1_macro"] <= 1
    assert steps["predict_cpu"]["images"] == steps["data_split"]["images"]["test"]
    assert steps["predict_cpu"]["errors"] == 0
    assert steps["served_check"]["equal"] is True
    assert smoke[1]["summary"]["served_equals_logged"] is True


def test_throughput_figures_are_measured(smoke):
    steps = smoke[1]["steps"]
    loader = steps["bench_loader"]["by_size"]["32"]
    assert loader["folder_img_per_s"] > 0 and loader["cached_img_per_s"] > 0
    by_model = steps["bench_train"]["by_model"]
    assert set(by_model) == {"vgg16_v2", "efficientnet_lite0"}
    for row in by_model.values():
        assert row["synthetic_img_per_s"] > 0 and row["real_img_per_s"] > 0 and row["pipeline_efficiency"] > 0


def test_the_workspace_is_removed_and_the_json_is_the_only_output(smoke):
    _, result, tmp = smoke
    assert Path(result["workspace"]).parent == tmp  # under TMPDIR, removed at the end (E2E_KEEP=1 keeps it)
    assert not Path(result["workspace"]).exists()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("gpu-e2e")]
    assert len(list((tmp / "results").iterdir())) == 1  # the JSON, no temp file beside it
