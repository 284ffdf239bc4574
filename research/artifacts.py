"""What runs store and what is worth keeping: `python -m research gc`, and a study's keep_top_k.

A finished training run stores its best weights once, as its logged model `model` (research/runlog.py);
a registered version is that same model (research/registry.py). Weights are the only large
artifacts, so the rules are about them:

- a study keeps the weights of its `keep_top_k` best trials by the objective (sweep spec key, default 3;
  `all` keeps everything); pruned and failed trials never log any;
- the weights of a registered version's run are never deleted, whatever k says;
- a trial whose weights were dropped keeps everything else (params, metrics, reports, config) and the
  tag `weights_deleted=true`.

Deleting goes through MLflow's APIs (the logged model is marked deleted, its artifacts are removed
through the artifact repository), so it works the same on a local store and behind `mlflow server`.
`gc` also frees what MLflow keeps of deleted runs (`mlflow gc`) and the local checkpoints of runs
that ended. Which checkpoints those are is `checkpoints.resumability`, the rule `train --resume` follows
too: a run that another process trains now (live) is never touched; a resumable one (not FINISHED, has a
last.pt, not live; FAILED included, e.g. a run the tracking server dropped) is listed as kept and freed only
with `--resumable`; the others (finished, deleted, or stopped before their first checkpoint) are freed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from research import checkpoints, tracking
from research.errors import ConfigError
from research.runquery import WEIGHTS_DELETED  # the run tag saying the keep rules dropped its weights
from research.store import DEFAULT_OBJECTIVE, logged_models, search_all_runs, selection_value, study_objective

console = Console()

OLD_WEIGHT_DIRS = ("checkpoint",)  # run artifact folders earlier versions filled with weight copies


# ------------------------------------------------------------------------------ sizes and weights

def tree_bytes(list_fn, path: str | None = None) -> int:
    """Total bytes under `path` of an MLflow artifact listing (client.list_artifacts / list_logged_model_artifacts)."""
    total = 0
    for f in list_fn(path):
        total += tree_bytes(list_fn, f.path) if f.is_dir else int(f.file_size or 0)
    return total


def model_bytes(client, model) -> int:
    return tree_bytes(lambda p: client.list_logged_model_artifacts(model.model_id, p))


def protected_runs(client) -> set[str]:
    """Runs whose weights a registered version needs (its source run): never dropped."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(max_results=10_000)
    except MlflowException:  # a store without a registry
        return set()
    return {v.run_id for v in versions if v.run_id}


def drop_weights(client, run, models: list) -> int:
    """Delete a run's weights (its logged models and old checkpoint copies) through MLflow; bytes freed.

    The logged model is marked deleted first, so `promote` can no longer pick the run, then its files go.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    freed = 0
    for model in models:
        try:
            size = model_bytes(client, model)
            client.delete_logged_model(model.model_id)
        except MlflowException:  # already deleted: another worker of the study was first
            continue
        with contextlib.suppress(FileNotFoundError):
            get_artifact_repository(model.artifact_location).delete_artifacts()
        freed += size
    run_id = run.info.run_id
    for folder in OLD_WEIGHT_DIRS:
        size = tree_bytes(lambda p: client.list_artifacts(run_id, p), folder)
        if size:
            freed += size
            get_artifact_repository(run.info.artifact_uri).delete_artifacts(folder)
    client.set_tag(run_id, WEIGHTS_DELETED, "true")
    return freed


# ------------------------------------------------------------------------------ a study's keep rule

@dataclasses.dataclass
class Study:
    parent: Any  # the study's parent run
    name: str
    metric: str
    maximize: bool
    keep_top_k: int | None  # None: keep all

    @classmethod
    def of(cls, parent, default_k: int | None, override: bool = False) -> Study:
        """From the parent run's params (its objective, keep_top_k); `override`: `default_k` wins."""
        objective = study_objective(parent) or DEFAULT_OBJECTIVE
        k = default_k if override else parent.data.params.get("keep_top_k", default_k)
        return cls(parent, parent.data.tags.get("optuna_study", parent.info.run_name or parent.info.run_id),
                   objective.metric, objective.maximize, None if k in (None, "all") else int(k))


def trial_runs(client, parent) -> list:
    """The child runs of a study's parent run."""
    return search_all_runs(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def objective(client, run, study: Study) -> float:
    """The trial's objective (metric `objective`, logged by the sweep), else its metric at the kept epoch."""
    value = run.data.metrics.get("objective")
    if value is None:
        value = selection_value(client, run, study.metric)
    if value is None or math.isnan(value):
        return -math.inf
    return value if study.maximize else -value


def surplus(client, study: Study, protected: set[str]) -> list[tuple[Any, list, str]]:
    """(run, its logged models, why) for every trial whose weights the keep rule drops."""
    runs = trial_runs(client, study.parent)
    models: dict[str, list] = {}
    for m in logged_models(client, [study.parent.info.experiment_id], {r.info.run_id for r in runs}):
        models.setdefault(m.source_run_id, []).append(m)
    finished = [r for r in runs if r.info.status == "FINISHED" and r.info.run_id in models]
    ranked = sorted(finished, key=lambda r: (-objective(client, r, study), r.info.start_time or 0))
    keep = {r.info.run_id for r in (ranked if study.keep_top_k is None else ranked[: study.keep_top_k])}
    out = []
    for run in runs:
        rid = run.info.run_id
        if rid not in models or rid in keep or rid in protected or run.info.status in ("RUNNING", "SCHEDULED"):
            continue  # a running trial may be logging its model right now: it is ranked once it finished
        why = (f"outside the top {study.keep_top_k} by {study.metric}" if run.info.status == "FINISHED"
               else f"{run.info.status.lower()} trial")
        out.append((run, models[rid], why))
    return out


def keep_top_weights(client, parent_id: str, keep_top_k: int | None) -> int:
    """Apply a study's keep rule now (the sweep calls it after each trial); bytes freed."""
    if keep_top_k is None:
        return 0
    study = Study.of(client.get_run(parent_id), keep_top_k, override=True)
    return sum(drop_weights(client, run, models) for run, models, _ in surplus(client, study, protected_runs(client)))


def study_bytes(client, parent_id: str) -> dict[str, int]:
    """What a study stores, through MLflow: all its runs' artifacts (`total`), the weights among them
    (`weights`), and how many trials keep weights (`kept`)."""
    parent = client.get_run(parent_id)
    runs = [parent, *trial_runs(client, parent)]
    models = logged_models(client, [runs[0].info.experiment_id], {r.info.run_id for r in runs})
    weights = sum(model_bytes(client, m) for m in models)
    files = sum(tree_bytes(lambda p, rid=r.info.run_id: client.list_artifacts(rid, p)) for r in runs)
    return {"total": files + weights, "weights": weights, "kept": len({m.source_run_id for m in models}),
            "runs": len(runs) - 1}


# ------------------------------------------------------------------------------ gc

@dataclasses.dataclass
class Item:
    kind: str  # weights | deleted run | checkpoint
    where: str  # experiment / study
    what: str  # run or model id, or a path
    why: str
    bytes: int
    free: Any = None  # a callable that frees it; None: listed only


def plan(experiment: str | None = None, keep_top_k: int | None = 3, override: bool = False,
         checkpoint_root: str | Path = checkpoints.DEFAULT_ROOT, resumable: bool = False) -> list[Item]:
    """Everything gc would free, nothing freed yet. `keep_top_k` applies to studies that logged none of
    their own, or to all with `override`; `resumable`: resumable runs' checkpoints too."""
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient()
    exps = client.search_experiments(view_type=ViewType.ALL)
    if experiment:
        exps = [e for e in exps if e.name == experiment]
        if not exps:
            raise ConfigError(f"No MLflow experiment named {experiment!r}; `python -m research runs` lists them.")
    protected = protected_runs(client)
    items: list[Item] = []
    for exp in exps:
        ids = [exp.experiment_id]
        if exp.lifecycle_stage == "active":
            for parent in search_all_runs(client, ids, "tags.optuna_role = 'parent'"):
                study = Study.of(parent, keep_top_k, override)
                for run, models, why in surplus(client, study, protected):
                    items.append(Item("weights", f"{exp.name} / {study.name}", run.info.run_id, why,
                                      sum(model_bytes(client, m) for m in models),
                                      lambda run=run, models=models: drop_weights(client, run, models)))
            items += ensemble_runs(client, exp, protected)
            items += deleted_runs(client, exp, protected)
        else:
            items += deleted_experiment(client, exp, protected)
    states = (checkpoints.ENDED, checkpoints.RESUMABLE) if resumable else (checkpoints.ENDED,)
    items += [item for item, state in checkpoint_folders(client, checkpoint_root) if state in states]
    return items


def ensemble_runs(client, exp, protected: set[str]) -> list[Item]:
    """Ensemble runs (`promote --ensemble`, `styles --ensemble`) that hold weights no registered version uses:
    their model is a copy of their members' weights, so it goes (their figures stay, and `promote --ensemble`
    builds it again); one whose process was killed (still RUNNING, its pid gone on this host) goes whole."""
    out = []
    runs = search_all_runs(client, [exp.experiment_id], "tags.ensemble_of LIKE '%'")
    models: dict[str, list] = {}
    for m in logged_models(client, [exp.experiment_id], {r.info.run_id for r in runs}):
        models.setdefault(m.source_run_id, []).append(m)
    for run in runs:
        rid = run.info.run_id
        if rid in protected:
            continue
        if run.info.status == "RUNNING" and writer_gone(run):
            out.append(Item("killed ensemble", exp.name, rid, "RUNNING, but the process building it is gone",
                            sum(model_bytes(client, m) for m in models.get(rid, [])),
                            lambda rid=rid: _discard(client, rid)))
        elif run.info.status != "RUNNING" and models.get(rid):
            out.append(Item("weights", exp.name, rid, "ensemble no registered version uses (a copy of its members')",
                            sum(model_bytes(client, m) for m in models[rid]),
                            lambda run=run, ms=models[rid]: drop_weights(client, run, ms)))
    return out


def writer_gone(run) -> bool:
    """Whether the process that wrote a RUNNING run (tags host, pid, process_started) is gone; a run of another
    host, or one without those tags, is never judged gone."""
    tags = run.data.tags
    try:
        holder = checkpoints.Holder(int(tags["pid"]), tags["host"], float(tags["process_started"]), 0.0)
    except (KeyError, ValueError):
        return False
    import socket

    return holder.host == socket.gethostname() and not checkpoints.alive(holder)


def discard_run(client, run_id: str) -> None:
    """An unregistered run a command made (a refused or stopped ensemble): its weights deleted and the run
    deleted (`gc` frees what MLflow keeps of it). Never raises: the error that got here is the one to show."""
    with contextlib.suppress(Exception):
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        drop_weights(client, run, list(logged_models(client, [run.info.experiment_id], {run_id})))
        client.delete_run(run_id)


def _discard(client, run_id: str) -> None:
    discard_run(client, run_id)
    mlflow_gc("--run-ids", run_id)


def deleted_runs(client, exp, protected: set[str]) -> list[Item]:
    from mlflow.entities import ViewType

    out = []
    for run in search_all_runs(client, [exp.experiment_id], "", run_view_type=ViewType.DELETED_ONLY):
        rid = run.info.run_id
        if rid not in protected:
            size = tree_bytes(lambda p, rid=rid: client.list_artifacts(rid, p))
            out.append(Item("deleted run", exp.name, rid, "run deleted in MLflow (mlflow gc)", size,
                            lambda rid=rid: mlflow_gc("--run-ids", rid)))
    return out


def deleted_experiment(client, exp, protected: set[str]) -> list[Item]:
    """A deleted experiment, freed whole by `mlflow gc`, unless a registered version still needs one of its runs."""
    from mlflow.entities import ViewType

    runs = search_all_runs(client, [exp.experiment_id], "", run_view_type=ViewType.ALL)
    if any(r.info.run_id in protected for r in runs):
        return []
    size = sum(tree_bytes(lambda p, rid=r.info.run_id: client.list_artifacts(rid, p)) for r in runs)
    return [Item("deleted experiment", exp.name, exp.experiment_id, f"experiment deleted, {len(runs)} run(s)",
                 size, lambda: mlflow_gc("--experiment-ids", exp.experiment_id))]


def checkpoint_folders(client, root: str | Path) -> list[tuple[Item, str]]:
    """Each local checkpoint folder of a run in this store, with `checkpoints.resumability`'s state (LIVE,
    RESUMABLE, ENDED): the same rule `train --resume` follows."""
    from mlflow.exceptions import MlflowException

    out = []
    for folder in sorted(Path(root).glob("*/")) if Path(root).is_dir() else []:
        try:
            run = client.get_run(folder.name)
        except MlflowException:
            continue  # a run of another store: not ours to judge
        verdict = checkpoints.resumability(folder, run.info.status, run.info.lifecycle_stage == "deleted")
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        free = None if verdict.state == checkpoints.LIVE else (lambda folder=folder: _free_checkpoint(folder))
        out.append((Item("checkpoint", str(root), str(folder), f"run {verdict.why}", size, free), verdict.state))
    return out


def _free_checkpoint(folder: Path) -> None:
    """Remove a checkpoint folder unless a process took the run meanwhile (it would lose its checkpoint)."""
    holder = checkpoints.live_holder(folder)
    if holder is not None:
        raise ConfigError(f"{folder} is in use: its run is being trained now by {holder}; it was kept.")
    shutil.rmtree(folder)


def kept_checkpoints(client, root: str | Path, resumable: bool) -> list[Item]:
    """The checkpoint folders gc keeps: live runs' always, resumable runs' unless `resumable`."""
    keep = (checkpoints.LIVE,) if resumable else (checkpoints.LIVE, checkpoints.RESUMABLE)
    return [item for item, state in checkpoint_folders(client, root) if state in keep]


def mlflow_gc(flag: str, ids: str) -> None:
    """`mlflow gc` on the backend store (it needs the store itself, not a tracking server)."""
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise ConfigError(f"Permanently deleting {ids} needs the backend store, not the server {uri}: run "
                          f"`mlflow gc --backend-store-uri <the server's --backend-store-uri> {flag} {ids}` "
                          "where the database is reachable, with MLFLOW_TRACKING_URI set to the server.")
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, flag, ids],
                   check=True, capture_output=True, text=True)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", help="only this MLflow experiment (default: all)")
    parser.add_argument("--keep-top-k", default=None, metavar="K",
                        help="weights kept per study (default: the study's own keep_top_k, else 3; `all` keeps all)")
    parser.add_argument("--checkpoints", default=checkpoints.DEFAULT_ROOT, metavar="DIR",
                        help=f"local checkpoint root, train's checkpoint_dir (default {checkpoints.DEFAULT_ROOT})")
    parser.add_argument("--resumable", action="store_true",
                        help="also free the checkpoints of resumable runs (interrupted, killed or failed; "
                             "`train --resume` needs them); a run being trained now is never touched")
    parser.add_argument("--yes", action="store_true", help="free it (default: only show what would be freed)")


def run(args) -> int:
    import mlflow

    k = args.keep_top_k
    if k not in (None, "all") and not (str(k).isdigit() and int(k) >= 1):
        raise ConfigError(f"--keep-top-k {k!r}: give a positive number of trials, or `all`.")
    tracking.setup()
    tracking.check_reachable()
    items = plan(args.experiment, 3 if k is None else None if k == "all" else int(k), override=k is not None,
                 checkpoint_root=args.checkpoints, resumable=args.resumable)
    print_plan(items, freed=False)
    print_kept(kept_checkpoints(mlflow.MlflowClient(), args.checkpoints, args.resumable))
    if not items:
        return 0
    if not args.yes:
        console.print("Nothing freed: run again with --yes to free it.")
        return 0
    total, left = 0, []
    for item in items:
        try:
            item.free()
            total += item.bytes
        except ConfigError as exc:  # e.g. `mlflow gc` of a server's store: it says where to run it
            left.append(item)
            console.print(f"[yellow]not freed[/] {item.kind} {item.what}: {exc}", soft_wrap=True)
    console.print(f"freed {human(total)} in {len(items) - len(left)} item(s)"
                  + (f"; {len(left)} left, see above." if left else "."))
    return 1 if left else 0


def print_kept(kept: list[Item]) -> None:
    """The checkpoints gc keeps, and how to free the resumable ones."""
    for item in kept:
        console.print(f"kept checkpoint {item.what} ({human(item.bytes)}): {item.why}", soft_wrap=True)
    if any(item.free is not None for item in kept):
        console.print("  resume one with `python -m research train --resume RUN_ID`, or free them with "
                      "`python -m research gc --resumable --yes`", soft_wrap=True)


def print_plan(items: list[Item], freed: bool) -> None:
    if not items:
        console.print("gc: nothing to free (registered versions and each study's top trials keep their weights).")
        return
    table = Table(title="what gc frees", show_lines=False)
    for col in ("kind", "experiment / study", "run, model or path", "why", "size"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    groups: dict[str, int] = {}
    for item in items:
        table.add_row(item.kind, item.where, item.what, item.why, human(item.bytes))
        groups[item.where] = groups.get(item.where, 0) + item.bytes
    console.print(table)
    for where, size in groups.items():
        console.print(f"  {where}: {human(size)}")
    console.print(f"  total: {human(sum(groups.values()))}")
