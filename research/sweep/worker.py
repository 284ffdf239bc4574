"""Running a study: the parent MLflow run, the objective (one `research.train.train` per trial), workers.

Exactly `n_trials` finished trials: a worker takes a trial slot under `slot_lock`, counting finished and
running trials, so concurrent workers never overshoot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from research import configfile, tracking
from research.artifacts import keep_top_weights
from research.config import TrainConfig
from research.errors import ConfigError
from research.store import objective_params
from research.sweep.spec import ParamSpec, SweepSpec, base_config, nest
from research.sweep.storage import Heartbeat, default_storage_url, fail_stale_trials, open_study, requeue, slot_lock
from research.sweep.summary import params_text, summarize
from research.train import train

console = Console()
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILS_IN_A_ROW = 3  # a worker whose trials keep crashing stops instead of burning the study


def parent_run_id(study: optuna.Study, spec: SweepSpec, spec_path: str | None) -> str:
    """The study's MLflow parent run, created once and remembered in the study's user attrs."""
    existing = study.user_attrs.get("mlflow_parent_run_id")
    if existing:
        return existing
    experiment_id = tracking.experiment_id(spec.experiment_name)
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id, run_name=f"study {spec.study_name}",
        tags={"optuna_study": spec.study_name, "optuna_role": "parent", **tracking.run_tags()},
    )
    rid = run.info.run_id
    client.log_param(rid, "study_name", spec.study_name)
    for key, value in objective_params(spec.objective.direction, spec.objective.metric).items():
        client.log_param(rid, key, value)
    client.log_param(rid, "sampler", spec.sampler.name)
    client.log_param(rid, "pruner", spec.pruner.name)
    client.log_param(rid, "n_trials", spec.n_trials)
    client.log_param(rid, "keep_top_k", spec.keep_top_k)
    client.log_dict(rid, configfile.to_dict(spec), "sweep_spec.json")
    if spec_path:
        client.log_artifact(rid, str(spec_path))
    study.set_user_attr("mlflow_parent_run_id", rid)
    study.set_user_attr("mlflow_experiment_id", experiment_id)
    return rid


def start_study(spec: SweepSpec, storage_url: str | None, spec_path: str | None) -> tuple[optuna.Study, str]:
    """Open (or create) the study, its parent run and its enqueued trials once, under the slot lock, so
    workers that start together don't race to create them."""
    with slot_lock(storage_url, spec.study_name):
        study = open_study(spec, storage_url)
        parent = parent_run_id(study, spec, spec_path)
        if spec.enqueue and not study.get_trials(deepcopy=False):
            for params in spec.enqueue:
                study.enqueue_trial(params)
    return study, parent


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    values = {}
    for key, p in space.items():
        if p.type == "categorical":
            values[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
    return values


def next_trial(study: optuna.Study, spec: SweepSpec, storage_url: str | None, poll: float) -> optuna.Trial | None:
    """Ask for a trial slot, or None when the study has its n_trials. Waits while others may still fail."""
    while True:
        with slot_lock(storage_url, spec.study_name):
            fail_stale_trials(study, spec.heartbeat_grace)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED_STATES for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            if finished >= spec.n_trials:
                return None
            if finished + running < spec.n_trials or waiting:
                return study.ask()
        # every slot is taken by running trials; one may still die and need a retry
        time.sleep(poll)


def worker_sampler_seed(spec: SweepSpec, index: int) -> SweepSpec:
    """The spec worker `index` of `--workers N` samples with: seed + index. With the spec's one seed, N workers
    would draw the same params (TPE's startup trials are random draws) and train each of them N times."""
    if not index or spec.sampler.seed is None:
        return spec
    return dataclasses.replace(spec, sampler=dataclasses.replace(spec.sampler, seed=spec.sampler.seed + index))


def run_worker(spec: SweepSpec, storage_url: str | None, spec_path: str | None = None) -> int:
    """Run trials until the study has n_trials finished ones (or the timeout). Returns trials run here."""
    spec = worker_sampler_seed(spec, int(os.environ.get("RESEARCH_WORKER_INDEX", "0")))
    tracking.setup()
    tracking.check_reachable()  # before the study storage is touched: a dead server leaves nothing behind
    check_datasets(spec)  # likewise: a missing version would fail every trial, the enqueued ones first
    study, parent = start_study(spec, storage_url, spec_path)
    finished = count_finished(study)
    if finished:
        console.print(f"study {spec.study_name}: reusing {finished} finished trial(s) of {spec.n_trials} "
                      f"({storage_url or default_storage_url()})")
    base = base_config(spec)
    deadline = time.time() + spec.timeout if spec.timeout else None
    done_here, failed_in_a_row = 0, 0
    while deadline is None or time.time() < deadline:
        if failed_in_a_row >= MAX_FAILS_IN_A_ROW:
            console.print(f"[red]{failed_in_a_row} trials in a row failed here; this worker stops "
                          "(fix the error above, then run the same study again to resume it)")
            break
        trial = next_trial(study, spec, storage_url, poll=min(spec.heartbeat_interval, 5.0))
        if trial is None:
            break
        with Heartbeat(trial, spec.heartbeat_interval):
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            state, value = run_trial(study, trial, spec, base, parent)
        study.tell(trial, value, state=state)
        if state == TrialState.COMPLETE:
            try:
                keep_top_weights(mlflow.MlflowClient(), parent, spec.kept)
            except Exception as exc:  # the study goes on; `python -m research gc` applies the rule later
                console.print(f"[yellow]keep_top_k: weights not dropped now ({type(exc).__name__}: {exc}); "
                              "`python -m research gc` frees them later")
        done_here += 1
        failed_in_a_row = failed_in_a_row + 1 if state == TrialState.FAIL else 0
    return done_here


def check_datasets(spec: SweepSpec) -> None:
    """Every dataset version a trial may train on exists: the base's, or the searched ones (an enqueued trial's
    must be one of those: the spec refuses values outside the space)."""
    from research.data.versions import load_version

    base = base_config(spec)
    searched = spec.space.get("dataset")
    for name in sorted(searched.choices or [] if searched else [base.dataset]):
        load_version(name, base.data_root)


def frozen_trial(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def run_trial(study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, base: TrainConfig,
              parent: str) -> tuple[TrialState, float | None]:
    """Train one trial's config as a child run of `parent`; its state and objective value (None unless COMPLETE)."""
    metric = spec.objective.metric
    params = suggest(trial, spec.space)
    worker = os.environ.get("RESEARCH_WORKER")
    console.print(f"{f'[{worker}] ' if worker else ''}study {spec.study_name}: trial #{trial.number} "
                  f"({count_finished(study)} of {spec.n_trials} finished): {params_text(params)}",
                  markup=False, highlight=False, soft_wrap=True)
    cfg = configfile.replace(base, **nest(params), experiment=spec.experiment_name,
                             run_name=f"{spec.study_name} #{trial.number} {params.get('model', base.model)}")

    def on_start(run_id: str) -> None:
        trial.set_user_attr("mlflow_run_id", run_id)

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        trial.report(row[metric], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric}={row[metric]:.4f}")

    tags = {"optuna_study": spec.study_name, "optuna_trial": str(trial.number)}
    # a live Trial has no public system attrs; its stored (frozen) copy carries the retry callback's mark
    retried = frozen_trial(study, trial.number).system_attrs.get("failed_trial")
    if retried is not None:
        tags["optuna_retry_of"] = str(retried)
    try:
        result = train(cfg, on_epoch=on_epoch, on_start=on_start, parent_run_id=parent, tags=tags)
    except optuna.TrialPruned as exc:
        console.print(f"trial {trial.number}: [yellow]{exc}")
        return TrialState.PRUNED, None
    except KeyboardInterrupt:
        # the user stopped the study, not the trial: its params run again when the study resumes (an enqueued
        # recipe would otherwise be lost, as TPE never suggests it again)
        requeue(study, study.tell(trial, state=TrialState.FAIL), max_retry=None)
        raise
    except ConfigError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # a crashed trial fails alone; the study goes on
        console.print(f"[red]trial {trial.number} failed: {type(exc).__name__}: {exc}")
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            mlflow.MlflowClient().set_tag(run_id, "optuna_state", "FAIL")
        return TrialState.FAIL, None
    # the objective is the metric at the epoch whose weights the run keeps (val macro F1 chose it), the figure
    # promote ranks on: another epoch's best val loss belongs to weights that were not kept
    value = next(row[metric] for row in result.history if int(row["epoch"]) == result.best_epoch)
    client = mlflow.MlflowClient()
    client.set_tag(result.run_id, "optuna_state", "COMPLETE")
    client.log_metric(result.run_id, "objective", value)  # what the study ranks by, e.g. for keep_top_k
    trial.set_user_attr("test_f1_macro", result.test.get("test_f1_macro"))
    return TrialState.COMPLETE, value


def sweep(spec: SweepSpec, storage_url: str | None = None, workers: int = 1, spec_path: str | None = None) -> dict:
    """Run the study with `workers` processes (1 = this process), then summarise it."""
    check_workers(workers)
    t0 = time.time()
    if workers <= 1:
        run_worker(spec, storage_url, spec_path)
    else:
        launch_workers(spec, storage_url, workers, spec_path)
    wall = time.time() - t0
    console.print(f"study {spec.study_name} took {wall:.0f}s")
    return summarize(spec, storage_url, spec_path) | {"wall_seconds": wall}


def check_workers(workers: int, cores: int | None = None) -> None:
    """1 <= workers <= this machine's cores: each worker is a process that needs a core of its own (to train
    on, or to feed its GPU); more would only queue on the cores and slow every trial down."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"--workers {workers}: a study needs at least one worker process; use --workers 1 (this "
                          f"process) up to {cores} (one per core of this machine).")
    if workers > cores:
        raise ConfigError(f"--workers {workers}: this machine has {cores} core(s) available, and each worker "
                          f"process needs one (to train, or to feed its GPU); use --workers {cores} or fewer, or "
                          "start more workers on other machines (`sweep --storage postgresql://...`).")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # CUDA stops at the first invalid entry, so the first `count` listed ones are the usable ones
    return listed[:count] if listed else [str(i) for i in range(count)]


def worker_device_envs(gpus: list[str], workers: int, cores: int) -> list[dict[str, str]]:
    """Per worker, the environment that places it: its own GPU round-robin over several; with one GPU all
    share it (nothing to set); without a GPU, an equal share of the cores as torch threads."""
    if len(gpus) > 1:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(workers)]
    if gpus:
        return [{} for _ in range(workers)]
    threads = str(max(1, cores // workers))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(workers)]


def placement_line(gpus: list[str], workers: int) -> str | None:
    """One line saying which GPU each worker gets and, when they share, what to pick; None without a GPU."""
    if not gpus or workers <= 1:
        return None
    if len(gpus) == 1:
        return (f"{workers} workers share the one visible GPU ({gpus[0]}): right for models that leave it idle "
                "between steps (efficientnet_lite0/1/2, resnet18: 2-4 workers); for models that fill it "
                "(vgg16*, resnet50/101 at 224 px) pick --workers 1.")
    if workers <= len(gpus):
        return f"{workers} workers, one GPU each (CUDA_VISIBLE_DEVICES {','.join(gpus[:workers])})."
    return (f"{workers} workers on {len(gpus)} GPUs ({','.join(gpus)}), round-robin: up to "
            f"{-(-workers // len(gpus))} share a GPU; --workers {len(gpus)} gives each its own.")


def launch_workers(spec: SweepSpec, storage_url: str | None, workers: int, spec_path: str | None) -> None:
    """N worker processes on one study: one GPU each when several are visible (round-robin), sharing one GPU
    when only one is, else splitting the cores."""
    tracking.setup()
    tracking.check_reachable()
    start_study(spec, storage_url, spec_path)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(configfile.to_dict(spec), fh)
        resolved = fh.name
    gpus = visible_gpus()
    line = placement_line(gpus, workers)
    if line:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    procs = []
    for i, placement in enumerate(worker_device_envs(gpus, workers, os.cpu_count() or 1)):
        env = dict(os.environ) | placement
        # the workers share this terminal: one plain line per epoch each, prefixed with the worker's name
        env["RESEARCH_PROGRESS"], env["RESEARCH_WORKER"] = "plain", f"worker {i + 1}/{workers}"
        env["RESEARCH_WORKER_INDEX"] = str(i)
        cmd = [sys.executable, "-m", "research", "sweep", resolved, "--worker-only",
               "--study-name", spec.study_name, "--storage", storage_url or default_storage_url()]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        os.unlink(resolved)
    bad = [p.returncode for p in procs if p.returncode]
    if bad:
        console.print(f"[yellow]{len(bad)} worker(s) exited with {bad}; their trials are retried or failed")
