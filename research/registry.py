"""Register the chosen run as the champion: `python -m research promote`.

`promote(...)` takes the best FINISHED run that has a model, as research/runquery.py ranks them (default: the
best of any architecture by its val macro F1 at the epoch whose weights it kept, or by its study's objective
with --study; `--model-filter vgg16_v2` keeps the seed's choice), registers the run's own model `model` as a new
version of `illustration-classifier` (no copy: that model is both a torch module and the pyfunc, see
research/runlog.py), and moves the aliases: `champion` to the new version, `previous` to the one it replaces.

Validation chooses, test reports: the ranking and the gate against the current champion read a
validation metric only (a test metric is refused), and compare like with like (same selection metric,
same dataset digest; each run's figure at the epoch whose weights it serves, research.store.selection_value;
an ensemble on a metric that temperature scaling cannot move, see `check_ensemble_metric`). The test figures
are shown beside, never used.

Aliases are the lasting interface (`models:/illustration-classifier@champion`). Stages
(`models:/illustration-classifier/Production`) are deprecated upstream (MLflow 2.9+) and still
work in MLflow 3.17 with a FutureWarning; we also transition the new version to `Production`
(archiving the old one) while the installed MLflow supports it, and warn when it does not.

Loading and serving a registered model lives in research.serving. The torch module loads for
fine-tuning with `mlflow.pytorch.load_model("models:/illustration-classifier@champion")`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from research import tracking
from research.errors import ConfigError, first_line
from research.runquery import (
    DEFAULT_FILTER,
    DEFAULT_METRIC,
    TORCH_NAME,
    Candidate,
    check_ensemble_metric,
    check_selection_metric,
    named_run,
    pick_run,
    quote,
    ranked_runs,
    run_model,
    study_metric,
)
from research.serving import (  # IllustrationClassifier here also unpickles pyfuncs logged when it lived here
    CHAMPION,
    MODEL_NAME,
    PREVIOUS,
    STAGE,
    IllustrationClassifier,
    load_model,  # noqa: F401 - re-exported: research/demo.py imports it from here
    pip_requirements,
    read_meta,
    signature,
)
from research.store import SELECTED, database_lock, minimise, search_all_runs

console = Console()

PYFUNC_NAME = "classifier"  # the pyfunc model's name inside the source run


class PromotionRefused(ConfigError):
    """The candidate does not beat the current champion on the selection metric (val), or the two were chosen
    on different data or metrics; pass --force to promote anyway. `champion` and `candidate`: what was compared."""

    def __init__(self, message: str, champion: Champion | None = None, candidate: Candidate | None = None,
                 comparable: bool = True):
        super().__init__(message)
        self.champion, self.candidate, self.comparable = champion, candidate, comparable


# ------------------------------------------------------------------------------ the champion the gate compares with

@dataclasses.dataclass
class Champion:
    """The registered champion as the gate sees it: its version's tags, written by `version_tags`."""

    version: str
    run_id: str
    metric: str | None  # the metric it was selected on
    score: float | None  # that metric at the epoch whose weights it serves
    dataset_digest: str
    dataset_version: str
    test_f1: float | None  # shown, never compared
    study: str | None
    ensemble: bool = False  # an ensemble's model (research.ensemble)
    teacher: str = ""  # the teacher it was distilled from (models:/NAME/VERSION), "" for none
    teacher_run_id: str = ""

    @classmethod
    def of(cls, mv) -> Champion:
        metric = mv.tags.get("selection_metric")
        score = _tag_float(mv, f"{SELECTED}{metric}") if metric else None
        if score is None and metric == DEFAULT_METRIC:  # a version tagged before selected_*: the epoch was chosen
            score = _tag_float(mv, f"best_{metric}")  # by this metric, so its best value is the chosen epoch's
        return cls(str(mv.version), mv.tags.get("source_run_id", "?"), metric, score, mv.tags.get("dataset_digest", ""),
                   mv.tags.get("dataset_version", ""), _tag_float(mv, "test_f1_macro"), mv.tags.get("optuna_study"),
                   mv.tags.get("model", "").startswith("ensemble of"), mv.tags.get("teacher", ""),
                   mv.tags.get("teacher_run_id", ""))

    @property
    def where(self) -> str:
        study = f"study {self.study}, " if self.study else ""
        return f"version {self.version}, {study}run {self.run_id}"


# ------------------------------------------------------------------------------ registering

@dataclasses.dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    metric: str
    score: float
    test_f1: float | None  # shown, never compared
    previous_version: str | None
    previous_score: float | None  # the replaced champion's best `metric`
    already_champion: bool = False
    reused_version: bool = False
    stage: str | None = None
    stage_note: str = ""
    torch_model_uri: str = ""
    overtaken_by: str | None = None  # another promote moved @champion here meanwhile (an mlflow server has no lock)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"


def current_champion(client, name: str):
    """The version holding alias `champion`, or None (no registered model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _tag_float(version, key: str) -> float | None:
    try:
        return float(version.tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def version_of_run(client, name: str, run_id: str):
    """An existing version of `name` registered from `run_id` (so a re-promotion re-uses it)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = {quote(name)} and tags.source_run_id = {quote(run_id)}")
    except MlflowException:
        return None
    versions = [v for v in versions if v.tags.get("source_run_id") == run_id]
    return max(versions, key=lambda v: int(v.version)) if versions else None


def version_tags(cand: Candidate, meta: dict[str, Any]) -> dict[str, str]:
    """Tags of a new version; dataset name and digest from model_meta.json (the param may hold a path)."""
    run = cand.run
    params, tags = run.data.params, run.data.tags
    out = {
        "source_run_id": cand.run_id,
        "torch_model_uri": f"runs:/{cand.run_id}/{TORCH_NAME}",
        "model": str(meta.get("model") or params.get("model", "")),
        "dataset_version": str(meta.get("dataset_version") or params.get("dataset_version", "")),
        "dataset_digest": str(meta.get("dataset_digest") or params.get("dataset_digest", "")),
        "selection_metric": cand.metric,
        f"{SELECTED}{cand.metric}": f"{cand.score:.6f}",
    }
    if cand.test_f1 is not None:
        out["test_f1_macro"] = f"{cand.test_f1:.6f}"
    for key in ("optuna_study", "optuna_trial"):
        if key in tags:
            out[key] = tags[key]
    if cand.teacher:  # its lineage: what the gate compares, and what the version's description names
        out |= {"teacher": cand.teacher, "teacher_run_id": cand.teacher_run_id,
                "teacher_dataset_digest": params.get("teacher.dataset_digest", "")}
    return out


def distilled_description(cand: Candidate) -> str | None:
    """A distilled run's version description: what it was distilled from, and how; None for any other run."""
    params = cand.run.data.params
    if not cand.teacher:
        return None
    return (f"Distilled from {cand.teacher} (given as {params.get('teacher.uri', cand.teacher)}; "
            f"{params.get('teacher.model', '?')}, run {params.get('teacher.run_id', '?')}, trained on dataset digest "
            f"{params.get('teacher.dataset_digest', '?')[:12]}): loss = (1 - {params.get('distill_weight')}) x label "
            f"loss + {params.get('distill_weight')} x T^2 x KL at T = {params.get('distill_temperature')}, the "
            f"teacher's logits {params.get('teacher.outputs', '')}. The teacher is part of this model's recipe: "
            "`promote` compares it only with versions distilled from the same teacher.")


def read_model_meta(model) -> dict[str, Any]:
    """A logged model's extra_files/model_meta.json, without downloading its weights."""
    import json

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model.artifact_location}/extra_files/model_meta.json", dst_path=tmp)
        return json.loads(Path(path).read_text())


def register(client, cand: Candidate, name: str) -> str:
    """Register the run's own model (no copy); a model logged before it served as the pyfunc gets a
    pyfunc `classifier` around a copy of it, as earlier versions of this code did."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model = run_model(client, cand.run_id)
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    if info.flavors.get("python_function", {}).get("loader_module") == "research.serving":
        model_uri, meta = f"models:/{model.model_id}", read_model_meta(model)
    else:
        model_uri, meta = log_pyfunc(client, cand.run_id)
    said = io.StringIO()  # MLflow prints "Successfully registered model ..." to stderr: it goes to the log
    with contextlib.redirect_stderr(said):
        version = mlflow.register_model(model_uri, name, tags=version_tags(cand, meta))
    for line in said.getvalue().splitlines():
        logging.getLogger(__name__).info(line)
    description = distilled_description(cand)
    if description:
        client.update_model_version(name, version.version, description=description)
    with contextlib.suppress(MlflowException):
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=(
                "Illustration classifier (pyfunc: column `image` = base64 image bytes -> label, probability, "
                f"p_<class>, error). Load `models:/{name}@{CHAMPION}`: the alias is the lasting interface; stage "
                f"`{STAGE}` is kept while MLflow supports stages (deprecated upstream). The same model loads as a "
                "torch module with mlflow.pytorch.load_model, for fine-tuning."))
    return str(version.version)


def input_example() -> pd.DataFrame:
    """A 32x32 white PNG, base64: the shape of a request."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def log_pyfunc(client, run_id: str) -> tuple[str, dict[str, Any]]:
    """For a run logged before its model was the pyfunc: log a pyfunc `classifier` into `run_id` (its end
    time kept) around a copy of its torch model. Returns the logged model's URI and its model_meta.json."""
    import mlflow

    run = client.get_run(run_id)
    end_time, status = run.info.end_time, run.info.status
    with tempfile.TemporaryDirectory() as tmp:
        torch_dir = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{TORCH_NAME}", dst_path=tmp)
        meta = read_meta(torch_dir)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_NAME, python_model=IllustrationClassifier(), artifacts={"torch_model": torch_dir},
                code_paths=[str(Path(__file__).resolve().parent)], pip_requirements=pip_requirements(),
                signature=signature(meta["classes"]), input_example=input_example(),
            )
    # re-opening the run set it RUNNING and moved its end time; the training's own times stay
    client.set_terminated(run_id, status=status, end_time=end_time)
    return info.model_uri, meta


def move_aliases(client, name: str, new: str, old: str | None) -> None:
    if old is not None and old != new:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, new)


def transition_stage(client, name: str, version: str) -> tuple[str | None, str]:
    """Production stage + archive the rest, while MLflow has stages; (stage or None, note)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, version, STAGE, archive_existing_versions=True)
        return STAGE, "stages are deprecated upstream; aliases are the lasting interface"
    except Exception as exc:  # a future MLflow without stages: the aliases are enough
        note = f"stage transition unavailable ({first_line(exc)}); use the alias @{CHAMPION}"
        warnings.warn(note, stacklevel=2)
        return None, note


def promote(*, study: str | None = None, run_id: str | None = None, experiment: str | None = None,
            model_filter: str | None = DEFAULT_FILTER, metric: str | None = None, name: str = MODEL_NAME,
            force: bool = False, ensemble: int = 1) -> Promotion:
    """Register the best run as the champion version of `name`; see the module docstring.

    The best run of any architecture by `metric` (None: the study's objective with `study`, else
    val_f1_macro), unless `model_filter` names one (None or "any": all), within `study` or `experiment`
    when given; `run_id` skips the choice. `ensemble` K > 1: the K best runs of the scope become one logged
    run whose model averages their probabilities (research.ensemble), and that run is the candidate.

    Raises PromotionRefused, unless `force`, when the candidate's best `metric` does not beat the champion's,
    or when the two are not comparable (another selection metric or dataset digest).
    Promoting the current champion's run again changes nothing. Promotes of one name are serialised
    (a lock on the store: a file lock beside sqlite, an advisory lock on PostgreSQL); against an
    `mlflow server`, which offers no lock, the champion is re-read at the end and reported as it is.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    check_name(name)
    if metric is not None:
        check_selection_metric(metric)  # before the store is touched
    tracking.setup()
    tracking.check_reachable()
    client = mlflow.MlflowClient()
    metric = metric or (study_metric(client, study) if study else None) or DEFAULT_METRIC
    built = False
    if ensemble > 1:
        check_ensemble_metric(metric)
        cand, built = ensemble_candidate(client, ensemble, name=name, study=study, experiment=experiment,
                                         model_filter=model_filter, metric=metric)
    else:
        cand = pick_run(client, study=study, run_id=run_id, experiment=experiment, model_filter=model_filter,
                        metric=metric)
    uri = tracking.tracking_uri()
    try:
        with database_lock(uri, f"promote:{name}"):
            result = _promote(client, cand, name, metric, force)
        champ = current_champion(client, name)  # what is true now, whatever ran beside us
    except BaseException as exc:
        if built and version_of_run(client, name, cand.run_id) is None:  # built for this promote, not registered
            from research.artifacts import discard_run

            discard_run(client, cand.run_id)
        if isinstance(exc, (MlflowException, OSError)):
            raise ConfigError(f"promote could not write to the tracking store {uri}: {first_line(exc)}. Check that "
                              "the store is writable (file permissions, the server's access rules).") from None
        raise
    if champ is not None and str(champ.version) != result.version:
        result.overtaken_by = str(champ.version)
    return result


def ensemble_candidate(client, k: int, *, metric: str, name: str, **scope) -> tuple[Candidate, bool]:
    """The K best runs of the scope as one ensemble run (research.ensemble), as a Candidate, and whether it was
    built now. Idempotent: an ensemble of the same members that is the champion, or any finished one that
    still has its model, is that candidate again (no new run, no new copy of the weights). A build that fails or
    is stopped leaves no run behind; one killed outright stays RUNNING until `gc` frees it."""
    import mlflow

    from research.ensemble import build_ensemble

    ranked = [c for c in ranked_runs(client, metric=metric, **scope) if "ensemble_of" not in c.run.data.tags]
    if len(ranked) < k:
        raise ConfigError(f"--ensemble {k}: the scope holds {len(ranked)} finished run(s) with a model; use "
                          f"--ensemble {len(ranked)} or fewer (a study keeps the weights of its keep_top_k best).")
    members = ranked[:k]
    existing = ensemble_run_of(client, {c.run_id for c in members}, members[0].run.info.experiment_id, name)
    if existing is not None:
        return named_run(client, existing, metric), False
    started = int(time.time() * 1000)
    try:
        run_id = build_ensemble(members, scope.get("study"))
    except BaseException:
        last = mlflow.last_active_run()
        if last is not None and last.data.tags.get("ensemble_of") and (last.info.start_time or 0) >= started:
            from research.artifacts import discard_run

            discard_run(client, last.info.run_id)
        raise
    return named_run(client, run_id, metric), True


def ensemble_run_of(client, members: set[str], experiment_id: str, name: str) -> str | None:
    """A run that already averages exactly `members`: the champion of `name` first, else the newest FINISHED
    ensemble run of the experiment whose model is still there."""
    champ = current_champion(client, name)
    if champ is not None:
        with contextlib.suppress(Exception):
            tags = client.get_run(champ.run_id).data.tags
            if set(tags.get("ensemble_of", "").split(",")) == members:
                return champ.run_id
    runs = search_all_runs(client, [experiment_id], "attributes.status = 'FINISHED' and tags.ensemble_of LIKE '%'",
                           order_by=["attributes.start_time DESC"])
    for run in runs:
        if set(run.data.tags.get("ensemble_of", "").split(",")) == members:
            with contextlib.suppress(ConfigError):
                run_model(client, run.info.run_id)
                return run.info.run_id
    return None


def check_name(name: str) -> None:
    """A registered model name MLflow accepts, checked before anything is written."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise ConfigError(f"--name {name!r}: {first_line(exc)} Use a plain name such as {MODEL_NAME}.") from None
    if "@" in name or "/" in name or name != name.strip():  # models:/NAME@alias and models:/NAME/version
        raise ConfigError(f"--name {name!r}: a `models:/{name}@{CHAMPION}` URI could not load it ('@' starts an "
                          "alias, '/' a version, and spaces around a name are lost); use a plain name such as "
                          f"{MODEL_NAME}.")


def _promote(client, cand: Candidate, name: str, metric: str, force: bool) -> Promotion:
    """The decision and the writes, under the promote lock: the champion read here is the current one."""
    mv = current_champion(client, name)
    champ = Champion.of(mv) if mv is not None else None
    result = Promotion(name, "", cand.run_id, metric, cand.score, cand.test_f1,
                       champ.version if champ else None, champ.score if champ else None,
                       torch_model_uri=f"runs:/{cand.run_id}/{TORCH_NAME}")
    if champ is not None and champ.run_id == cand.run_id:
        result.version, result.already_champion = champ.version, True
        result.previous_version = _alias_version(client, name, PREVIOUS)
        return result
    if champ is not None and not force:
        gate(champ, cand, name)
    existing = version_of_run(client, name, cand.run_id)
    if existing is not None:
        result.version, result.reused_version = str(existing.version), True
    else:
        result.version = register(client, cand, name)
    move_aliases(client, name, result.version, result.previous_version)
    result.stage, result.stage_note = transition_stage(client, name, result.version)
    return result


def champion_promotion(champ: Champion, metric: str, name: str = MODEL_NAME) -> Promotion:
    """The standing champion as a Promotion that changed nothing (what `demo` goes on with when it keeps it)."""
    return Promotion(name, champ.version, champ.run_id, champ.metric or metric, math.nan if champ.score is None
                     else champ.score, champ.test_f1, None, None, already_champion=True,
                     torch_model_uri=f"runs:/{champ.run_id}/{TORCH_NAME}")


def gate(champ: Champion, cand: Candidate, name: str) -> None:
    """Refuse a candidate that is not comparable with the champion, or does not beat it on the selection metric."""
    metric = cand.metric
    force = f"pass --force to make run {cand.run_id} the champion anyway"
    if champ.metric != metric or champ.score is None:
        raise PromotionRefused(
            f"Not comparable: {name} {champ.where} was selected on {champ.metric or 'no recorded metric'}, this "
            f"candidate on {metric}. Promote with --metric {champ.metric or metric}, register it beside with "
            f"--name OTHER_NAME, or {force}.", champ, cand, comparable=False)
    if minimise(metric) and (champ.ensemble or cand.ensemble):
        raise PromotionRefused(
            f"Not comparable: {name} {champ.where} and run {cand.run_id} would be compared on {metric}, and "
            f"{'the champion' if champ.ensemble else 'the candidate'} is an ensemble, whose val loss is measured at "
            "temperatures fitted on that same val (a single run's at temperature 1). Promote with --metric "
            f"{DEFAULT_METRIC}, or {force}.", champ, cand, comparable=False)
    if champ.dataset_digest != cand.dataset_digest:
        raise PromotionRefused(
            f"Not comparable: {name} {champ.where} was selected on dataset {champ.dataset_version} (digest "
            f"{champ.dataset_digest[:12] or '?'}), run {cand.run_id} on digest {cand.dataset_digest[:12] or '?'}: "
            f"their val figures measure different images. Register it beside with --name OTHER_NAME, or {force}.",
            champ, cand, comparable=False)
    if champ.teacher_run_id != cand.teacher_run_id:  # the teacher's weights: one run may be registered twice
        raise PromotionRefused(
            f"Not comparable: {name} {champ.where} was distilled from {champ.teacher or 'no teacher'}, run "
            f"{cand.run_id} from {cand.teacher or 'no teacher'}: a teacher is part of the recipe (the teacher was "
            "chosen, and its probabilities calibrated, on val). Register it beside with --name OTHER_NAME, or "
            f"{force}.", champ, cand, comparable=False)
    score = round(cand.score, 6)  # at the precision of the champion's tag: an equal score is not better
    better = score < champ.score if minimise(metric) else score > champ.score
    if not better:
        raise PromotionRefused(
            f"Run {cand.run_id} has {metric} {_fmt(cand.score)} (at its kept epoch), not better than the champion's "
            f"{_fmt(champ.score)} ({name} {champ.where}). Not promoted (test figures are reported, never compared: "
            f"candidate {_fmt(cand.test_f1)}, champion {_fmt(champ.test_f1)} test macro F1); {force}.", champ, cand)


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


# ------------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--study", help="pick among the trials of this Optuna study (tag optuna_study)")
    scope.add_argument("--run", dest="run_id", metavar="RUN_ID", help="promote this run")
    scope.add_argument("--experiment", help="pick among the runs of this MLflow experiment (default: all)")
    parser.add_argument("--model-filter", default=DEFAULT_FILTER, metavar="MODEL",
                        help="only runs with params.model = MODEL, e.g. vgg16_v2 for the seed's choice "
                             "(default: any model; the best run wins whatever its architecture)")
    parser.add_argument("--metric", default=None,
                        help="rank and gate by this validation metric at the epoch whose weights a run kept "
                             f"(default: the study's objective with --study, else {DEFAULT_METRIC}); test metrics "
                             "are refused")
    parser.add_argument("--name", default=MODEL_NAME, help=f"registered model name (default {MODEL_NAME})")
    parser.add_argument("--ensemble", type=int, default=1, metavar="K",
                        help="register one model that averages the probabilities of the K best runs (a new run, "
                             "measured on val and test as served; default 1: the best run alone)")
    parser.add_argument("--force", action="store_true",
                        help="promote even if the champion's val score is better or the two are not comparable")


def run(args) -> int:
    if args.ensemble > 1 and args.run_id:
        raise ConfigError("--ensemble K takes the K best runs of a --study or --experiment, not --run.")
    if args.ensemble < 1:
        raise ConfigError(f"--ensemble {args.ensemble}: use 1 (the best run alone) or more.")
    result = promote(study=args.study, run_id=args.run_id, experiment=args.experiment, model_filter=args.model_filter,
                     metric=args.metric, name=args.name, force=args.force, ensemble=args.ensemble)
    print_promotion(result)
    return 0


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_promotion(p: Promotion) -> None:
    if p.already_champion:
        console.print(f"[green]run {p.run_id} is already the champion[/]: {p.name} version {p.version} "
                      f"(@{CHAMPION}); nothing changed.")
    else:
        table = Table(title=f"promoted {p.name} version {p.version}", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        rows = [
            ("source run", p.run_id),
            (f"{p.metric} (kept epoch)", _fmt(p.score)),
            ("test_f1_macro", f"{_fmt(p.test_f1)} (reported, never compared)"),
            ("version", p.version + (" (existing version of this run)" if p.reused_version else " (new)")),
            (f"alias @{CHAMPION}", f"-> version {p.version}"),
            (f"alias @{PREVIOUS}", f"-> version {p.previous_version} ({p.metric} {_fmt(p.previous_score)})"
             if p.previous_version and p.previous_version != p.version else "-"),
            ("stage", f"{p.stage} (older versions archived; {p.stage_note})" if p.stage else p.stage_note),
            ("load (pyfunc)", p.uri),
            ("load (torch)", f"mlflow.pytorch.load_model({p.torch_model_uri!r})"),
            ("serve", f"mlflow models serve -m {p.uri} --env-manager local -p 5001"),
        ]
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
    if p.overtaken_by:
        console.print(f"[yellow]meanwhile another promote moved @{CHAMPION} to version {p.overtaken_by}[/]: that is "
                      f"the champion now (`python -m research promote --run {p.run_id} --force` makes this one again)")
    console.print(tracking.ui_line(tracking.model_version_url(p.name, p.version)), markup=False, soft_wrap=True)
