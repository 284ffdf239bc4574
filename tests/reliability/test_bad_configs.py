"""Fault 6: bad configs through the CLI (`research.cli.main` in this process; one case in a real process).

Unknown keys, wrong types, a negative lr, a batch size larger than the training set and a sweep spec
with an empty search space: each exits with code 2, one `error:` message on stderr naming the key
and the fix, and no traceback. Nothing is trained and no MLflow run is created.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from tests.reliability import cli_env, run_cli, run_main, tiny_train_config

# (case id, how to write the train config / CLI args, substrings the error must hold: key, fix)
TRAIN_CASES = {
    "unknown key in file": ({"batchsize": 16}, [], ["'batchsize'", "Did you mean 'batch_size'?", "Valid keys"]),
    "unknown key in --set": ({}, ["--set", "augment.mixupp=0.2"], ["'augment.mixupp'", "Did you mean 'mixup'?"]),
    "wrong type in file": ({"epochs": "three"}, [], ["epochs", "expected an integer", "'three'"]),
    "wrong type in --set": ({}, ["--set", "augment.hflip=yes please"], ["augment.hflip", "expected a number"]),
    "negative lr": ({}, ["--lr", "-0.01"], ["lr=-0.01", "must be > 0"]),
    "batch larger than train set": ({}, ["--batch-size", "4096"],
                                    ["batch_size=4096", "larger than the training set", "--batch-size"]),
}


@pytest.fixture
def cli(tmp_path, mlflow_store, capsys, monkeypatch):
    """The command in this process (`research.cli.main`, the boundary a process runs; the imports of a fresh
    interpreter cost seconds a case), from an empty working directory. One case runs as a real process below."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def run(*args):
        code, out, err = run_main(capsys, *args)
        print(f"{' '.join(map(str, args))[-80:]}: rc {code}: {err.strip()[-250:]}")
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def assert_config_error(out, needles: list[str]) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_config_errors(case, cli, tiny_version, tmp_path, mlflow_store):
    changes, args, needles = TRAIN_CASES[case]
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, tmp_path / "ckpt") | changes))
    out = cli("train", "--config", cfg, *args)
    assert_config_error(out, needles)
    assert not (tmp_path / "ckpt").exists()
    import mlflow

    exp = mlflow.MlflowClient().get_experiment_by_name("reliability")
    assert exp is None or not mlflow.MlflowClient().search_runs([exp.experiment_id])


@pytest.mark.slow
def test_a_config_error_from_a_real_process(tiny_version, tmp_path, mlflow_store):
    """The same boundary in a fresh `python -m research` process: exit code 2, the one line, no traceback."""
    changes, args, needles = TRAIN_CASES["unknown key in file"]
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, tmp_path / "ckpt") | changes))
    (tmp_path / "work").mkdir()
    out, _ = run_cli("train", "--config", cfg, *args, cwd=tmp_path / "work", env=cli_env(), timeout=180)
    assert_config_error(out, needles)
    assert not (tmp_path / "ckpt").exists()


SWEEP_CASES = {
    "empty space": ({"space": {}}, ["`space` is empty", "space: {lr: {type: float"]),
    "unknown key in space": ({"space": {"lrr": {"type": "float", "low": 1e-3, "high": 0.1}}},
                             ["space.lrr", "Did you mean 'lr'?"]),
    "unknown top-level key": ({"n_trails": 3}, ["'n_trails'", "Did you mean 'n_trials'?"]),
    "negative lr in base": ({"base_lr": -1}, ["lr=-1", "must be > 0"]),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_sweep_spec_errors(case, cli, tiny_version, tmp_path):
    changes, needles = SWEEP_CASES[case]
    spec = {
        "study_name": "bad", "n_trials": 2,
        "base": tiny_train_config(tiny_version, tmp_path / "ckpt"),
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
    }
    if "base_lr" in changes:
        spec["base"]["lr"] = changes.pop("base_lr")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec | changes))
    out = cli("sweep", path, "--storage", f"journal:{tmp_path / 'bad.journal'}")
    assert_config_error(out, needles)
    assert not (tmp_path / "bad.journal").exists()  # rejected before the study storage is touched


# NaN and inf pass every `<` and `>`: each float key refuses them by name, before anything runs
NONSENSE = {"lr": ".nan", "momentum": ".inf", "weight_decay": ".nan", "grad_clip": "-.inf", "seed": "-1",
            "augment.mixup": ".nan"}


@pytest.mark.parametrize("key", list(NONSENSE))
def test_nan_inf_and_negative_values_are_refused(key):
    from research import configfile
    from research.config import TrainConfig
    from research.errors import ConfigError

    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        configfile.load(TrainConfig, None, configfile.parse_overrides([f"{key}={NONSENSE[key]}"]))


def spec_with(tmp_path, **changes):
    spec = {"study_name": "s", "n_trials": 2, "base": {"dataset": "v3", "model": "resnet18", "image_size": 32},
            "space": {"sampler": {"type": "categorical", "choices": ["shuffle", "sqrt"]}}} | changes
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("changes, needle", [
    ({"space": {"sampler": {"type": "categorical", "choices": ["shuffle", "bogus"]}}}, "space.sampler = 'bogus'"),
    ({"space": {"lr": {"type": "float", "low": 1e-3, "high": -1.0}}}, "low <= high"),
    ({"space": {"lr": {"type": "float", "low": float("nan"), "high": 1.0}}}, "finite low and high"),
    ({"space": {"label_smoothing": {"type": "float", "low": 0.0, "high": 1.5}}}, "space.label_smoothing = 1.5"),
    ({"timeout": -5}, "timeout=-5"),
    ({"heartbeat_grace": float("nan")}, "heartbeat_grace=nan"),
    ({"enqueue": [{"sampler": "weighted"}]}, "outside the search space"),
    # issue 26: specs that validated, then failed every trial (or left a parent run and a trial RUNNING)
    ({"objective": {"metric": "nonexistent"}}, "objective.metric='nonexistent' is not a metric the trainer logs"),
    ({"pruner": {"name": "hyperband", "reduction_factor": 1}}, "reduction_factor >= 2"),
    ({"pruner": {"name": "hyperband", "min_resource": 50}}, "min_resource=50 is more than the trials' 10 epochs"),
    ({"pruner": {"name": "median", "n_warmup_steps": -1}}, "n_warmup_steps"),
    ({"space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "step": 0}}}, "space.lr: Optuna refuses"),
    ({"space": {"epochs": {"type": "int", "low": 1, "high": 2, "step": 0.5}}}, "space.epochs: an int parameter"),
    ({"space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "step": 0.01, "log": True}}}, "not supported"),
    ({"sampler": {"name": "tpe", "seed": -1}}, "sampler.seed=-1"),
    ({"study_name": " "}, "study_name is empty"),
])
def test_a_sweep_spec_is_checked_in_full_before_any_storage_or_run(changes, needle, tmp_path):
    """Every choice and both bounds are tried against TrainConfig when the spec loads, not at trial time."""
    from research.errors import ConfigError
    from research.sweep import load_spec

    with pytest.raises(ConfigError, match=None) as err:
        load_spec(spec_with(tmp_path, **changes))
    assert needle in str(err.value)
