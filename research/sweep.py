"""Optuna studies over TrainConfig: one MLflow parent run per study, one child run per trial.

Storage: a journal file `mlruns/optuna.journal` by default (many processes on one machine);
any Optuna storage URL (`postgresql://...`, `sqlite:///...`) to share a study across machines.
Running the same study name again resumes it.

Exactly `n_trials` finished trials: a worker takes a trial slot under a lock (a file lock for
journal/sqlite storage, a PostgreSQL advisory lock for PostgreSQL), counting finished and running
trials, so concurrent workers never overshoot.

Killed workers: each running trial writes a heartbeat (a trial user attribute) every
`heartbeat_interval` s. A trial whose heartbeat is older than `heartbeat_grace` s is marked FAIL
by whichever worker notices, its MLflow run is set KILLED, and it is retried once through
Optuna's `RetryHeartbeatStaleTrialCallback` (a WAITING copy with the same params). This works on
every storage, the journal file included (Optuna's own heartbeat exists only for RDB storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from research import config as config_mod
from research import tracking
from research.config import ConfigError, TrainConfig

console = Console()
FINISHED_STATES = ("COMPLETE", "PRUNED")
MAX_FAILS_IN_A_ROW = 3  # a worker whose trials keep crashing stops instead of burning the study


# ----------------------------------------------------------------------------------- the spec

@dataclasses.dataclass
class ParamSpec:
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def validate(self) -> None:
        if self.type not in ("float", "int", "categorical"):
            raise ConfigError(f"search space type={self.type!r}: use float, int or categorical.")
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError("a categorical parameter needs a non-empty `choices` list.")
            return
        if self.low is None or self.high is None or self.low > self.high:
            raise ConfigError(f"{self.type} parameter needs low <= high (got low={self.low}, high={self.high}).")
        if self.log and self.low <= 0:
            raise ConfigError(f"log-scale parameter needs low > 0 (got {self.low}).")


@dataclasses.dataclass
class ObjectiveSpec:
    metric: str = "val_f1_macro"
    direction: str = "maximize"

    def validate(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"objective.direction={self.direction!r}: use maximize or minimize.")


@dataclasses.dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | random | grid-free choices only
    seed: int | None = 0
    n_startup_trials: int = 5

    def validate(self) -> None:
        if self.name not in ("tpe", "random"):
            raise ConfigError(f"sampler.name={self.name!r}: use tpe or random.")


@dataclasses.dataclass
class PrunerSpec:
    name: str = "median"  # median | hyperband | none
    n_startup_trials: int = 2  # median
    n_warmup_steps: int = 1  # median: epochs before pruning
    min_resource: int = 1  # hyperband
    reduction_factor: int = 3  # hyperband

    def validate(self) -> None:
        if self.name not in ("median", "hyperband", "none"):
            raise ConfigError(f"pruner.name={self.name!r}: use median, hyperband or none.")


@dataclasses.dataclass
class SweepSpec:
    base: dict[str, Any]  # TrainConfig keys
    space: dict[str, ParamSpec]  # TrainConfig key (dotted for nested: augment.mixup) -> distribution; {} = one fixed config
    study_name: str | None = None
    experiment: str | None = None  # default: sweep-<study_name>
    n_trials: int = 10
    timeout: float | None = None  # seconds, per worker
    objective: ObjectiveSpec = dataclasses.field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = dataclasses.field(default_factory=SamplerSpec)
    pruner: PrunerSpec = dataclasses.field(default_factory=PrunerSpec)
    heartbeat_interval: float = 10.0
    heartbeat_grace: float = 60.0
    description: str = ""
    # trials to run first, e.g. a known good config: {param: value} for some or all of `space`'s keys
    # (the rest are sampled). Enqueued once, when the study is new (optuna's enqueue_trial).
    enqueue: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if not self.space and self.n_trials != 1:
            raise ConfigError(f"The sweep spec's `space` is empty but n_trials={self.n_trials}: a spec without a space "
                              "is one fixed config (a baseline), so set n_trials: 1, or add a parameter to search, "
                              "e.g. space: {lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}}.")
        self.space = {k: v if isinstance(v, ParamSpec) else config_mod.from_dict(ParamSpec, v, f"space.{k}.")
                      for k, v in self.space.items()}
        base = base_config(self)
        for key, param in self.space.items():
            probe = param.choices[0] if param.type == "categorical" else (param.low if param.type == "float" else int(param.low))
            try:
                config_mod.replace(base, **nest({key: probe}))
            except ConfigError as exc:
                raise ConfigError(f"space.{key}: {exc}") from exc
        for i, params in enumerate(self.enqueue):
            unknown = sorted(set(params) - set(self.space))
            if unknown:
                raise ConfigError(f"enqueue[{i}]: {', '.join(unknown)} not in the search space; enqueue only sets "
                                  f"searched parameters ({', '.join(self.space) or 'none'}).")
        if self.n_trials <= 0:
            raise ConfigError(f"n_trials={self.n_trials} must be > 0.")
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ConfigError("heartbeat_grace must be larger than heartbeat_interval (e.g. 60 and 10).")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def base_config(spec: SweepSpec) -> TrainConfig:
    try:
        return config_mod.from_dict(TrainConfig, spec.base, prefix="base.")
    except ConfigError as exc:
        raise ConfigError(f"sweep spec base: {exc}") from exc


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    spec = config_mod.load(SweepSpec, path, overrides)
    if spec.study_name is None:
        spec.study_name = Path(path).stem
    return spec


# -------------------------------------------------------------------------------- the storage

def default_storage_url() -> str:
    return f"journal:{tracking.home() / 'optuna.journal'}"


def make_storage(url: str | None):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = url or default_storage_url()
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.endswith(".journal") and "://" not in url:
        return make_storage(f"journal:{url}")
    if url.startswith("postgresql") or url.startswith("sqlite") or url.startswith("mysql"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    raise ConfigError(f"storage {url!r}: use journal:PATH, a *.journal path, postgresql://..., or sqlite:///...")


@contextlib.contextmanager
def slot_lock(url: str | None, key: str = ""):
    """Serialise 'count trials, then ask' across processes, so the study never overshoots n_trials."""
    url = url or default_storage_url()
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                # one lock per study name, so unrelated studies in one database don't wait on each other
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(727274, hashtext(:k))"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(727274, hashtext(:k))"), {"k": key})
        finally:
            engine.dispose()
        return
    if url.startswith("journal:") or url.endswith(".journal"):
        path = Path(url.removeprefix("journal:"))
    elif url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
    else:  # another RDB: no cross-process lock; at most workers-1 extra trials
        yield
        return
    # not "<journal>.lock": that is the name of Optuna's own journal lock (a symlink); a regular file
    # there blocks every journal write for its 30 s grace period, then Optuna deletes it under us
    lock = path.with_name(path.name + ".slots.lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_sampler(spec: SweepSpec):
    import optuna

    if spec.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler.seed)
    return optuna.samplers.TPESampler(seed=spec.sampler.seed, n_startup_trials=spec.sampler.n_startup_trials)


def make_pruner(spec: SweepSpec):
    import optuna

    p = spec.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "hyperband":
        epochs = int(spec.base.get("epochs", TrainConfig().epochs))
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)


def open_study(spec: SweepSpec, storage_url: str | None):
    import optuna

    storage = make_storage(storage_url)
    return optuna.create_study(
        study_name=spec.study_name, storage=storage, direction=spec.objective.direction,
        sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True,
    )


# ------------------------------------------------------------------------ parent run per study

def parent_run_id(study, spec: SweepSpec, spec_path: str | None) -> str:
    """The study's MLflow parent run, created once and remembered in the study's user attrs."""
    import mlflow

    existing = study.user_attrs.get("mlflow_parent_run_id")
    if existing:
        return existing
    experiment_id = tracking.experiment_id(spec.experiment or f"sweep-{spec.study_name}")
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id, run_name=f"study {spec.study_name}",
        tags={"optuna_study": spec.study_name, "optuna_role": "parent", **tracking.run_tags()},
    )
    rid = run.info.run_id
    client.log_param(rid, "study_name", spec.study_name)
    client.log_param(rid, "objective", f"{spec.objective.direction} {spec.objective.metric}")
    client.log_param(rid, "sampler", spec.sampler.name)
    client.log_param(rid, "pruner", spec.pruner.name)
    client.log_param(rid, "n_trials", spec.n_trials)
    client.log_dict(rid, config_mod.to_dict(spec), "sweep_spec.json")
    if spec_path:
        client.log_artifact(rid, str(spec_path))
    study.set_user_attr("mlflow_parent_run_id", rid)
    study.set_user_attr("mlflow_experiment_id", experiment_id)
    return rid


# --------------------------------------------------------------------------------- a worker

def suggest(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    values = {}
    for key, p in space.items():
        if p.type == "categorical":
            values[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
    return values


class Heartbeat:
    """Writes `heartbeat` on the trial every `interval` s from a daemon thread."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # a finished trial no longer takes attrs
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def fail_stale_trials(study, grace: float) -> list[int]:
    """Mark RUNNING trials with an old heartbeat FAIL, close their MLflow runs, enqueue one retry."""
    import mlflow
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = study._storage
    now, failed = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a retried trial inherits its parent's old heartbeat attr: its own start counts too
        started = t.datetime_start.timestamp() if t.datetime_start else now
        beat = max(t.user_attrs.get("heartbeat") or 0.0, started)
        if now - beat <= grace:
            continue
        if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            continue
        failed.append(t.number)
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            with contextlib.suppress(Exception):
                client = mlflow.MlflowClient()
                client.set_tag(run_id, "optuna_state", "FAIL")
                client.set_terminated(run_id, "KILLED")
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, storage.get_trial(t._trial_id))
        console.print(f"[yellow]trial {t.number}: no heartbeat for {now - beat:.0f}s; marked FAIL and queued a retry")
    return failed


def next_trial(study, spec: SweepSpec, storage_url: str | None, poll: float):
    """Ask for a trial slot, or None when the study has its n_trials. Waits while others may still fail."""
    from optuna.trial import TrialState

    while True:
        with slot_lock(storage_url, spec.study_name):
            fail_stale_trials(study, spec.heartbeat_grace)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state.name in FINISHED_STATES for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            if finished >= spec.n_trials:
                return None
            if finished + running < spec.n_trials or waiting:
                return study.ask()
        # every slot is taken by running trials; one may still die and need a retry
        time.sleep(poll)


def run_worker(spec: SweepSpec, storage_url: str | None, spec_path: str | None = None) -> int:
    """Run trials until the study has n_trials finished ones (or the timeout). Returns trials run here."""
    import optuna

    tracking.setup()
    tracking.check_reachable()  # before the study storage is touched: a dead server leaves nothing behind
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with slot_lock(storage_url, spec.study_name):
        study = open_study(spec, storage_url)
        parent = parent_run_id(study, spec, spec_path)
        if spec.enqueue and not study.get_trials(deepcopy=False):
            for params in spec.enqueue:
                study.enqueue_trial(params)
    finished = sum(t.state.name in FINISHED_STATES for t in study.get_trials(deepcopy=False))
    if finished:
        console.print(f"study {spec.study_name}: reusing {finished} finished trial(s) of {spec.n_trials} "
                      f"({storage_url or default_storage_url()})")
    base = base_config(spec)
    experiment = spec.experiment or f"sweep-{spec.study_name}"
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
        storage = study._storage
        with Heartbeat(storage, trial._trial_id, spec.heartbeat_interval):
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            state, value = _run_trial(study, trial, spec, base, experiment, parent)
        study.tell(trial, value if state == "COMPLETE" else None, state=getattr(optuna.trial.TrialState, state))
        done_here += 1
        failed_in_a_row = failed_in_a_row + 1 if state == "FAIL" else 0
    return done_here


def _run_trial(study, trial, spec: SweepSpec, base: TrainConfig, experiment: str, parent: str):
    import mlflow
    import optuna

    from research.train import train

    metric, maximize = spec.objective.metric, spec.objective.direction == "maximize"
    params = suggest(trial, spec.space)
    cfg = config_mod.replace(base, **nest(params), experiment=experiment,
                             run_name=f"{spec.study_name}-trial-{trial.number}")

    def on_start(run_id: str) -> None:
        trial.set_user_attr("mlflow_run_id", run_id)

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        trial.report(row[metric], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric}={row[metric]:.4f}")

    tags = {"optuna_study": spec.study_name, "optuna_trial": str(trial.number)}
    retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    if retried is not None:
        tags["optuna_retry_of"] = str(retried)
    try:
        result = train(cfg, on_epoch=on_epoch, on_start=on_start, parent_run_id=parent, tags=tags)
    except optuna.TrialPruned as exc:
        console.print(f"trial {trial.number}: [yellow]{exc}")
        return "PRUNED", None
    except KeyboardInterrupt:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except ConfigError:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except Exception as exc:  # a crashed trial fails alone; the study goes on
        console.print(f"[red]trial {trial.number} failed: {type(exc).__name__}: {exc}")
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            mlflow.MlflowClient().set_tag(run_id, "optuna_state", "FAIL")
        return "FAIL", None
    values = [row[metric] for row in result.history]
    value = max(values) if maximize else min(values)
    mlflow.MlflowClient().set_tag(result.run_id, "optuna_state", "COMPLETE")
    trial.set_user_attr("test_f1_macro", result.test.get("test_f1_macro"))
    return "COMPLETE", value


# ------------------------------------------------------------------------------- summary

def summarize(spec: SweepSpec, storage_url: str | None, spec_path: str | None = None) -> dict[str, Any]:
    """Close the parent run with the study's outcome: best params/value, counts, plots; print the top."""
    import mlflow
    from optuna.trial import TrialState

    tracking.setup()
    study = open_study(spec, storage_url)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    client = mlflow.MlflowClient()
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {"study": spec.study_name, "counts": counts, "parent_run_id": parent}
    if done:
        best = study.best_trial
        summary |= {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
                    "best_run_id": best.user_attrs.get("mlflow_run_id")}
    if parent:
        for state, n in counts.items():
            client.log_metric(parent, f"n_{state.lower()}", n)
        if done:
            client.log_metric(parent, f"best_{spec.objective.metric}", summary["best_value"])
            client.set_tag(parent, "best_trial", str(summary["best_trial"]))
            client.set_tag(parent, "best_run_id", str(summary["best_run_id"]))
        client.log_dict(parent, summary, "study_summary.json")
        _log_plots(client, parent, study, done)
        # stray child runs of dead workers: never leave one RUNNING
        for t in trials:
            rid = t.user_attrs.get("mlflow_run_id")
            if rid and t.state != TrialState.RUNNING:
                with contextlib.suppress(Exception):
                    if client.get_run(rid).info.status == "RUNNING":
                        client.set_terminated(rid, "KILLED")
        client.set_terminated(parent, "FINISHED")
    _print_top(study, spec, summary)
    return summary


def _log_plots(client, parent: str, study, done) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history, "slice": ovm.plot_slice,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    if len(done) >= 2 and len(study.best_trial.params) >= 1:
        plots["param_importances"] = ovm.plot_param_importances
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # one completed trial gives every parallel-coordinate axis a single value: matplotlib widens it,
        # and says so once per axis
        warnings.filterwarnings("ignore", message="Attempting to set identical", category=UserWarning)
        for name, fn in plots.items():
            try:
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
                path = Path(tmp) / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(fig)
                client.log_artifact(parent, str(path), artifact_path="plots")
            except Exception as exc:  # a plot needs enough trials; the study's result does not
                console.print(f"[dim]plot {name} skipped: {exc}")


def _print_top(study, spec: SweepSpec, summary: dict[str, Any], top: int = 5) -> None:
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=spec.objective.direction == "maximize")
    table = Table(title=f"study {spec.study_name}: {summary['counts']}")
    for col in ("trial", spec.objective.metric, "test_f1_macro", "params", "run"):
        table.add_column(col)
    for t in done[:top]:
        test = t.user_attrs.get("test_f1_macro")
        table.add_row(str(t.number), f"{t.value:.4f}", "" if test is None else f"{test:.4f}",
                      json.dumps(t.params, default=str), str(t.user_attrs.get("mlflow_run_id", "")))
    console.print(table)
    if done:
        from research.registry import DEFAULT_FILTER

        model = done[0].params.get("model", spec.base.get("model", TrainConfig().model))
        flag = "" if model == DEFAULT_FILTER else f" --model-filter {model}"  # promote's default filter
        console.print(f"promote the best trial: [bold]python -m research promote --study {spec.study_name}{flag}[/]",
                      soft_wrap=True)  # one line, so it copies as a command


# ------------------------------------------------------------------------------------ launch

def sweep(spec: SweepSpec, storage_url: str | None = None, workers: int = 1, spec_path: str | None = None) -> dict:
    """Run the study with `workers` processes (1 = this process), then summarise it."""
    t0 = time.time()
    if workers <= 1:
        run_worker(spec, storage_url, spec_path)
    else:
        _launch_workers(spec, storage_url, workers, spec_path)
    summary = summarize(spec, storage_url, spec_path)
    summary["wall_seconds"] = time.time() - t0
    console.print(f"study {spec.study_name} took {summary['wall_seconds']:.0f}s")
    return summary


def _launch_workers(spec: SweepSpec, storage_url: str | None, workers: int, spec_path: str | None) -> None:
    """N worker processes on one study: one GPU each when several are visible, else split the cores."""
    import optuna
    import torch

    tracking.setup()
    tracking.check_reachable()
    # Create the study, its schema and the parent run once, before workers race to do it.
    with slot_lock(storage_url, spec.study_name):
        study = open_study(spec, storage_url)
        parent_run_id(study, spec, spec_path)
    del study, optuna
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(config_mod.to_dict(spec), fh)
        resolved = fh.name
    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = []
    for i in range(workers):
        env = dict(os.environ)
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        elif gpus == 0:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
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


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("spec", help="a sweep spec (sweeps/*.yaml)")
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--timeout", type=float, help="seconds per worker")
    parser.add_argument("--study-name")
    parser.add_argument("--storage", help="journal:PATH (default mlruns/optuna.journal), postgresql://..., sqlite:///...")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, e.g. --set base.epochs=2")
    parser.add_argument("--worker-only", action="store_true", help=argparse_hidden())


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def run(args) -> int:
    overrides = config_mod.parse_overrides(args.overrides)
    for key in ("n_trials", "timeout", "study_name"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    path = Path(args.spec)
    if path.suffix == ".json":  # a worker launched by _launch_workers
        spec = config_mod.from_dict(SweepSpec, config_mod.merge(json.loads(path.read_text()), overrides))
    else:
        spec = load_spec(path, overrides)
    if args.worker_only:
        run_worker(spec, args.storage)
        return 0
    sweep(spec, args.storage, workers=args.workers, spec_path=None if path.suffix == ".json" else str(path))
    return 0
