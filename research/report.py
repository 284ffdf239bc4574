"""`python -m research report --study NAME`: a study's champion against its baselines, on one page.

The sweep's summary says which trial won; this says by how much and where: the champion (the trial
with the best validation macro F1, `study.best_trial`) beside one or more baseline runs (`--baseline`,
repeatable: a study's best trial or an MLflow run id; by default the best trial of the `seed_recipe`
study, one fixed config), val and test macro F1 and accuracy, F1 per class, fANOVA parameter
importances, the champion's test confusion matrix, the trials, and how the champion's recipe carries to a
drawing style it never trained on (the newest `python -m research styles --run <champion>`, beside its
mixed-style val and test; a note with that command when there is none).
Selection uses the validation split only: the test split is evaluated once per finished trial and
only reported, so the test numbers stay an honest estimate of the champion.

The val numbers are those of the best epoch (the checkpoint that became the model). The same
content goes to the terminal, `report.md` (GitHub tables) and a self-contained `report.html` (the
champion's figures beside it: confusion_matrix_test.png, per_class_f1_test.png and the gallery of its most
confident test mistakes, mistakes_test.png; a run that predates a figure gets a note instead) in
reports/<study>/, with `report.json` holding the numbers; all are logged to the study's MLflow parent run
under `report/`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from research import styles as styles_mod
from research import tracking
from research.data import outputs
from research.errors import ConfigError
from research.runs import fmt_seconds

console = Console()
DEFAULT_BASELINE = "seed_recipe"
SELECTION = ("champion = best validation macro-F1; the test split is evaluated once per finished trial "
             "for reporting and never used to choose")
KEY_PARAMS = ("model", "image_size", "epochs", "batch_size", "optimizer", "lr", "lr_schedule", "loss", "sampler",
              "dataset_version")
PNG, F1_PNG, MISTAKES_PNG = "confusion_matrix_test.png", "per_class_f1_test.png", "mistakes_test.png"
FIGURES = (PNG, F1_PNG, MISTAKES_PNG)  # the champion's, copied next to report.html
PAGES = ("report.md", "report.html", "report.json")
ARTIFACTS = ("classification_report_val.csv", "classification_report_test.csv", "confusion_matrix_test.csv", *FIGURES)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TOP_TRIALS = 15
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;font-size:14px;"
       "text-align:left}th{background:#f3f3f3}li{margin:.2em 0}img{max-width:100%;display:block}")


@dataclasses.dataclass
class Section:
    title: str
    header: list[str] = dataclasses.field(default_factory=list)
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    image: str | None = None  # a PNG next to report.html


# ---------------------------------------------------------------------------- studies and runs

def completed(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def run_facts(client, run_id: str, dst: Path, trial=None) -> dict[str, Any]:
    """One run's numbers: best-epoch val, test, config, per-class F1, test confusion matrix."""
    import mlflow

    run = client.get_run(run_id)
    history = sorted((m for m in client.get_metric_history(run_id, "val_f1_macro") if not math.isnan(m.value)),
                     key=lambda m: m.step)
    best = max(history, key=lambda m: m.value, default=None)  # the first best epoch: the one checkpointed
    accuracy = {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}
    present = {f.path for f in client.list_artifacts(run_id)}
    files = {name: Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name,
                                                            dst_path=str(dst / run_id)))
             for name in ARTIFACTS if name in present}
    per_class: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        if f"classification_report_{split}.csv" in files:
            for r in pd.read_csv(files[f"classification_report_{split}.csv"], dtype={"class": str}).to_dict("records"):
                per_class.setdefault(r["class"], {})[f"{split}_f1"] = float(r["f1"])
                if split == "test":
                    per_class[r["class"]]["support"] = int(r["support"])
    confusion = None
    if "confusion_matrix_test.csv" in files:
        frame = pd.read_csv(files["confusion_matrix_test.csv"], index_col=0)
        confusion = {"true": [str(c) for c in frame.index], "predicted": [str(c) for c in frame.columns],
                     "counts": frame.to_numpy().astype(int).tolist()}
    metrics, params = run.data.metrics, run.data.params
    return {
        "trial": None if trial is None else trial.number, "run_id": run_id, "run_name": run.info.run_name,
        "val_f1_macro": best.value if best else None,
        "val_accuracy": accuracy.get(best.step) if best else None,
        "test_f1_macro": metrics.get("test_f1_macro"), "test_accuracy": metrics.get("test_accuracy"),
        "best_epoch": best.step if best else None, "epochs_run": len({m.step for m in history}),
        "params": dict(trial.params) if trial is not None else {},
        "config": {k: params.get(k) for k in KEY_PARAMS},
        "per_class": per_class, "confusion": confusion, "_params": params, "_files": files,
    }


def trial_facts(client, trial, dst: Path, study_name: str) -> dict[str, Any]:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise ConfigError(f"trial {trial.number} of study {study_name!r} has no mlflow_run_id user attribute.")
    return run_facts(client, run_id, dst, trial)


def baseline_refs(baseline: str | list[str] | None, study_name: str) -> list[str]:
    """The baselines asked for, in order, without repeats; comparing a study with itself is refused."""
    refs = [baseline] if isinstance(baseline, str) else list(baseline or [])
    if study_name in refs:
        raise ConfigError(f"--baseline {study_name}: that is the study being reported; its champion is already the "
                          "first column. Pass another study or an MLflow run id.")
    return list(dict.fromkeys(refs)) or [DEFAULT_BASELINE]


def column_label(facts: dict[str, Any]) -> str:
    """A column's name: the study (or the run id's first 8 chars) and its architecture."""
    model = facts["_params"].get("model")
    return facts["name"] + (f" ({model})" if model else "")


def resolve_baseline(ref: str, storage, client, dst: Path) -> tuple[dict[str, Any] | None, str]:
    """(facts, "") for `ref` (a study's best trial, else an MLflow run id), or (None, why) when it is missing."""
    import optuna
    from mlflow.exceptions import MlflowException

    if ref in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=ref, storage=storage)
        if completed(study):
            return trial_facts(client, study.best_trial, dst, ref) | {"source": f"study {ref}", "name": ref}, ""
        why = f"study {ref!r} has no completed trial"
    elif RUN_ID.match(ref):
        try:
            return run_facts(client, ref, dst) | {"source": f"run {ref[:8]}", "name": ref[:8]}, ""
        except MlflowException:
            why = f"{ref} is neither a study in this storage nor an MLflow run"
    else:
        why = f"no study {ref!r} in this storage, and it is not an MLflow run id"
    why += (f"; make one with `python -m research sweep sweeps/{ref}.yaml` (a fixed config: space: {{}}, "
            "n_trials: 1) or pass --baseline STUDY_OR_RUN_ID")
    return None, why


def resolve_baselines(refs: list[str], champ: dict[str, Any], storage, client,
                      dst: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The baselines found, in the order asked, and a note for each missing one (which never stops the report)."""
    found, notes = [], []
    for ref in refs:
        if ref == champ["run_id"]:
            raise ConfigError(f"--baseline {ref}: that is the champion's own run; pass another study or run id.")
        facts, why = resolve_baseline(ref, storage, client, dst)
        if facts is None:
            notes.append(f"no baseline {ref}: {why}")
        else:
            found.append(facts | {"ref": ref, "label": column_label(facts)})
    return found, notes


def check_asked_baselines(baseline: str | list[str] | None, notes: list[str], out: Path) -> None:
    """A baseline asked for by name (--baseline) that is missing stops the report before it writes anything, so
    a typo never replaces the last good report (nor the study's logged one). Without --baseline, a missing
    default baseline stays a note: nothing was asked for."""
    if baseline and notes:
        kept = f"; the report in {out} is left as it was" if (out / "report.json").is_file() else ""
        raise ConfigError("; ".join(notes) + kept + ".")
def teacher_facts(client, champ: dict[str, Any], dst: Path) -> tuple[dict[str, Any] | None, str]:
    """The run of the model a distilled champion was distilled from, as a column beside it, and a note saying
    what it is; (None, "") for a champion without a teacher."""
    from mlflow.exceptions import MlflowException

    params = champ["_params"]
    run_id = params.get("teacher.run_id")
    if not run_id:
        return None, ""
    pinned = params.get("teacher", "?")
    try:
        facts = run_facts(client, run_id, dst)
    except MlflowException:
        return None, f"the champion was distilled from {pinned} (run {run_id}), which is not in this store"
    label = f"teacher {pinned}" + (f" ({params['teacher.model']})" if params.get("teacher.model") else "")
    note = (f"teacher: the champion was distilled from {pinned} (given as {params.get('teacher.uri', pinned)}, run "
            f"{run_id}) with distill_weight {params.get('distill_weight')}, distill_temperature "
            f"{params.get('distill_temperature')}; its val figures chose it, as the champion's chose the champion")
    return facts | {"source": f"teacher run {run_id[:8]}", "name": "teacher", "label": label}, note


def importances(study) -> tuple[dict[str, float], str]:
    """fANOVA importances, and what they were computed over (or, with no values, why not).

    Over the completed trials' objective values when no trial was pruned. With pruning, the
    completed trials are the survivors, a biased handful; then every finished trial (completed or
    pruned) that reported epoch k, the last epoch all of them reached, is scored by its best val
    macro F1 up to k, so the parameters are judged on the epochs every trial saw.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    done = [t for t in done if t.params]
    if not done:
        return {}, "not computed: no finished trial with searched parameters (a fixed config, or none yet)"
    pruned = any(t.state == TrialState.PRUNED for t in done)
    if pruned:
        k = min(max(t.intermediate_values) for t in done if t.intermediate_values)
        scored = [(t, max(v for step, v in t.intermediate_values.items() if step <= k))
                  for t in done if t.intermediate_values and min(t.intermediate_values) <= k]
        basis = f"best val macro F1 up to epoch {k} of all {len(scored)} finished trials (pruned ones included)"
    else:
        scored = [(t, t.value) for t in done]
        basis = f"the objective of the completed trials ({len(scored)})"
    if len(scored) < 2:
        return {}, f"not computed: needs at least 2 scored trials ({basis})"
    target = optuna.create_study(direction=study.direction)  # in memory: the scored trials only
    for t, value in scored:
        target.add_trial(create_trial(params=t.params, distributions=t.distributions, value=value))
    try:
        values = optuna.importance.get_param_importances(
            target, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception as exc:  # a dynamic search space, a degenerate fit: the report goes on
        return {}, f"not computed: {type(exc).__name__}: {exc}"
    if not values or not all(math.isfinite(v) for v in values.values()) or sum(values.values()) <= 0:
        return {}, ("not computed: no variance to attribute (each parameter took one value, "
                    "or all trials scored the same)")
    return dict(values), f"fANOVA (seed 0) over {basis}; they sum to 1"


# ----------------------------------------------------------------------------------- content

def _f(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _p(v: Any) -> str:
    """A param for a table: short floats, everything else as logged."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-" if v is None else str(v)
    return str(v) if x.is_integer() or len(str(v)) <= 8 else f"{x:.4g}"


def sections(rep: dict[str, Any], study) -> list[Section]:
    champ = rep["champion"]
    bases = ([rep["teacher"]] if rep.get("teacher") else []) + rep["baselines"]  # a distilled champion's teacher first
    runs = [champ, *bases]
    counts = ", ".join(f"{k} {v}" for k, v in rep["counts"].items() if v)
    head = Section(f"Study {rep['study']}", notes=[
        f"storage: {rep['storage']}", f"trials: {counts}", f"wall time: {fmt_seconds(rep['wall_seconds'])} "
        "(first trial start to last trial end)", f"selection: {SELECTION}",
        f"MLflow parent run: {rep['parent_run_id'] or '-'}"])

    model = champ["_params"].get("model")
    cols = [f"champion (trial {champ['trial']}" + (f", {model})" if model else ")"), *[b["label"] for b in bases]]
    rows = [["run id", *[r["run_id"] for r in runs]]]
    for label, key in (("val macro-F1", "val_f1_macro"), ("val accuracy", "val_accuracy"),
                       ("test macro-F1", "test_f1_macro"), ("test accuracy", "test_accuracy")):
        rows.append([label, *[_f(r[key]) for r in runs]])
    rows.append(["epochs run / best epoch", *[f"{r['epochs_run']} / {r['best_epoch']}" for r in runs]])
    searched = list(champ["params"])
    for key in searched + [k for k in KEY_PARAMS if k not in searched]:
        rows.append([key + (" *" if key in searched else ""), *[_p(r["_params"].get(key)) for r in runs]])
    compare = Section("Champion vs baseline" + ("s" if len(bases) > 1 else ""), ["", *cols], rows, [
        "val numbers are those of the best epoch (the checkpoint kept); * = searched by the study"]
        + rep["baseline_notes"] + ([rep["teacher_note"]] if rep.get("teacher_note") else []))

    names = sorted(set().union(*(r["per_class"] for r in runs)))
    header = ["class", "test support", "champion val F1", "champion test F1"]
    header += [f"{b['label']} {split} F1" for b in bases for split in ("val", "test")]
    rows = []
    for name in names:
        row = [name, str(champ["per_class"].get(name, {}).get("support", "-"))]
        for r in runs:
            c = r["per_class"].get(name, {})
            row += [_f(c.get("val_f1")), _f(c.get("test_f1"))]
        rows.append(row)
    mean = ["macro mean", str(sum(c.get("support", 0) for c in champ["per_class"].values()))]
    for r in runs:
        for split in ("val_f1", "test_f1"):
            vals = [c[split] for c in r["per_class"].values() if split in c]
            mean.append(_f(sum(vals) / len(vals) if vals else None))
    notes = [f"run {r['run_id']} has no classification_report_*.csv" for r in runs if not r["per_class"]]
    per_class = Section("Per-class F1", header, rows + [mean] if names else [], notes)

    imp = rep["importances"]
    importance = Section("Parameter importances", ["parameter", "importance", ""],
                         [[k, f"{v:.3f}", "█" * max(1, round(v * 30))] for k, v in imp.items()],
                         [rep["importance_note"]])

    cm = champ["confusion"]
    confusion = Section("Champion confusion matrix (test)", image=PNG if PNG in rep["figures"] else None)
    if cm:
        short = all(len(n) <= 10 for n in cm["predicted"])
        labels = cm["predicted"] if short else [str(i) for i in range(len(cm["predicted"]))]
        confusion.header = ["true \\ predicted", *labels]
        confusion.rows = [[t if short else f"{i} {t}", *map(str, row)]
                          for i, (t, row) in enumerate(zip(cm["true"], cm["counts"]))]
        confusion.notes = ["counts; rows = true class, columns = predicted class"]
        if not short:
            confusion.notes.append("columns: " + ", ".join(f"{i} = {n}" for i, n in enumerate(cm["predicted"])))
    else:
        confusion.notes = [f"run {champ['run_id']} has no confusion_matrix_test.csv (it predates it)"
                           + ("; the figure is below" if rep["png"] else "")]

    trials = Section("Trials", ["trial", "state", "val macro-F1", "test macro-F1", "params", "run"],
                     [[str(t["number"]), t["state"], _f(t["value"]), _f(t["test_f1_macro"]),
                       ", ".join(f"{k}={_p(v)}" for k, v in t["params"].items()), (t["run_id"] or "")[:8]]
                      for t in rep["trials"][:TOP_TRIALS]])
    rest = rep["trials"][TOP_TRIALS:]
    if rest:
        left = {s: sum(t["state"] == s for t in rest) for s in {t["state"] for t in rest}}
        trials.notes = [f"{len(rest)} more: " + ", ".join(f"{k} {v}" for k, v in sorted(left.items()))]
    loso = rep.get("styles")
    if loso:
        style_rows = [[r["style"] + (f" ({r['members']})" if r.get("members", r["style"]) != r["style"] else ""),
                       _f(r["val_f1_macro"]), _f(r["heldout_f1_macro"])] for r in loso["rows"]]
        style_rows += [["mean of held-out families", "", _f(loso["mean_heldout_f1_macro"])],
                       [f"{champ['_params'].get('dataset_version') or 'its version'}, styles mixed (the champion)",
                        _f(champ["val_f1_macro"]), _f(champ["test_f1_macro"])]]
        styles = Section("Leave one style family out (the champion's recipe)",
                         ["held-out style family", "val macro-F1 (other families)", "test macro-F1 (held-out family)"],
                         style_rows, [f"MLflow parent run {loso['parent_run_id']} (python -m research styles "
                                      f"--run {champ['run_id']}); val chose each run's epoch, the held-out style "
                                      "only reports"])
    else:
        styles = Section("Leave one style out", notes=[
            f"not measured for this champion: python -m research styles --run {champ['run_id']}"])
    pictures = [figure_section(title, name, champ["run_id"], rep["figures"]) for title, name in (
        ("Champion per-class F1 (test)", F1_PNG), ("Champion's most confident test mistakes", MISTAKES_PNG))]
    return [head, compare, styles, per_class, importance, confusion, *pictures, trials]


def figure_section(title: str, name: str, run_id: str, figures: list[str]) -> Section:
    """The champion's figure `name`, or a note when its run predates that figure."""
    if name in figures:
        return Section(title, image=name)
    return Section(title, notes=[f"run {run_id} has no {name} (it predates it)"])


# --------------------------------------------------------------------------------- renderers

def to_console(title: str, secs: list[Section]) -> None:
    console.rule(f"[bold]{title}")
    for s in secs:
        if s.header:
            table = Table(title=s.title, title_justify="left")
            for col in s.header:
                table.add_column(col, overflow="fold")  # a narrow terminal wraps a value, never cuts it to "…"
            for row in s.rows:
                table.add_row(*map(Text, row))
            console.print(table)
        else:
            console.print(Text(s.title, style="bold"))
        if s.image:
            console.print(Text(f"  figure: {s.image} (beside report.html)", style="dim"))
        for note in s.notes:
            console.print(Text(f"  {note}", style="dim"))


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def to_markdown(title: str, secs: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in secs:
        out += [f"## {s.title}", ""]
        if s.image:
            out += [f"![{s.title}]({s.image})", ""]
        if s.header:
            out += ["| " + " | ".join(map(_md, s.header)) + " |", "|" + "|".join("---" for _ in s.header) + "|"]
            out += ["| " + " | ".join(map(_md, row)) + " |" for row in s.rows] + [""]
        out += [f"- {note}" for note in s.notes] + ([""] if s.notes else [])
    return "\n".join(out)


def to_html(title: str, secs: list[Section]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
           f"</head><body><h1>{e(title)}</h1>"]
    for s in secs:
        out.append(f"<h2>{e(s.title)}</h2>")
        if s.image:
            out.append(f"<img src='{e(s.image)}' alt='{e(s.title)}'>")
        if s.header:
            out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in s.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in s.rows]
            out.append("</table>")
        if s.notes:
            out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in s.notes) + "</ul>")
    return "\n".join(out + ["</body></html>", ""])


# ------------------------------------------------------------------------------------ report

def report_folder(study_name: str, out_dir: str | Path | None) -> Path:
    """`--out`, else reports/<study>; checked as every stage's output is (`outputs.check_folder`): never a
    source's folder nor another stage's, and an existing folder only if an earlier report wrote it."""
    if out_dir is None:
        try:
            outputs.plain_name(study_name, "the study name")
        except ConfigError:
            raise ConfigError(f"report: the study name {study_name[:80]!r} is not a plain folder name, so it cannot "
                              "name the default folder reports/<study>/; pass --out FOLDER.") from None
    out = Path(out_dir) if out_dir is not None else Path("reports") / study_name
    outputs.check_folder("report", out)
    return out


def write_figures(out: Path, files: dict[str, str]) -> list[str]:
    """Copy the champion's figures beside the report; an earlier report's figure goes first (it must not outlive
    its champion), deleted only if that report recorded writing it. Returns the names copied."""
    earlier = outputs.recorded_files(out, "report") if out.is_dir() else set()
    copied = [name for name in FIGURES if name in files]
    for name in FIGURES:
        if name in earlier:
            outputs.output_path(out, name).unlink(missing_ok=True)
    outputs.mark(out, "report", [*PAGES, *copied])
    for name in copied:
        shutil.copy(files[name], outputs.output_path(out, name))
    return copied


def _public(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if facts is None else {k: v for k, v in facts.items() if not k.startswith("_")}


def _metric_key(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


@outputs.holding
def report(study_name: str, baseline: str | list[str] | None = None, storage_url: str | None = None,
           out_dir: str | Path | None = None, log: bool = True) -> dict[str, Any]:
    """Write report.md/.html/.json (+ the champion's figures) and log them to the parent run.

    `baseline`: one study name or MLflow run id, or a list of them (one column each, in order); none
    means `seed_recipe`. A missing baseline asked for by name is an error before anything is written; the
    default one, when missing, is a note in the report.
    """
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from research.sweep import default_storage_url, make_storage

    out = report_folder(study_name, out_dir)  # before anything is read or written
    tracking.setup()
    tracking.check_reachable()
    outputs.claim(out, "report")  # one report into `out` at a time
    refs = baseline_refs(baseline, study_name)
    url = storage_url or default_storage_url()
    storage = make_storage(url)
    names = sorted(optuna.get_all_study_names(storage))
    if study_name not in names:
        raise ConfigError(f"no study {study_name!r} in {url} (studies there: {', '.join(names) or 'none'}). Run it "
                          f"first: python -m research sweep sweeps/{study_name}.yaml, or pass --storage with the "
                          "storage the sweep used.")
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    if not completed(study):
        raise ConfigError(f"study {study_name!r} has no completed trial yet ({counts}); run or resume it: "
                          f"python -m research sweep sweeps/{study_name}.yaml")
    client = mlflow.MlflowClient()
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(trials, key=lambda t: (t.value is None, -(t.value or 0) if maximize else (t.value or 0), t.number))
    parent = study.user_attrs.get("mlflow_parent_run_id")
    with tempfile.TemporaryDirectory() as tmp:
        champ = trial_facts(client, study.best_trial, Path(tmp), study_name) | {"source": f"study {study_name}"}
        if refs == [DEFAULT_BASELINE] and study_name == DEFAULT_BASELINE:  # the default cannot be the study itself
            bases, notes = [], [f"no baseline: the default baseline {DEFAULT_BASELINE} is this study; pass --baseline"]
        else:
            bases, notes = resolve_baselines(refs, champ, storage, client, Path(tmp))
            check_asked_baselines(baseline, notes, out)
        teacher, teacher_note = teacher_facts(client, champ, Path(tmp))
        figures = write_figures(out, champ["_files"])
        imp, imp_note = importances(study)
        rep: dict[str, Any] = {
            "study": study_name, "storage": url, "direction": study.direction.name.lower(), "selection": SELECTION,
            "counts": counts, "wall_seconds": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
            "parent_run_id": parent, "champion": champ, "baseline_refs": refs, "baselines": bases,
            "baseline_notes": notes, "teacher": teacher, "teacher_note": teacher_note,
            "styles": styles_mod.latest_for_run(champ["run_id"], client),
            "importances": imp, "importance_note": imp_note, "png": PNG in figures, "figures": figures,
            "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                        "test_f1_macro": t.user_attrs.get("test_f1_macro"), "run_id": t.user_attrs.get("mlflow_run_id")}
                       for t in ranked],
        }
        secs = sections(rep, study)
    title = f"{study_name}: champion vs " + (", ".join(b["name"] for b in bases) or "baseline")
    to_console(title, secs)
    outputs.output_path(out, "report.md").write_text(to_markdown(title, secs))
    outputs.output_path(out, "report.html").write_text(to_html(title, secs))
    # `baseline` and `baseline_note` as before this took several, for readers of older reports: the first of each
    rep |= {"champion": _public(champ), "baselines": [_public(b) for b in bases], "teacher": _public(teacher),
            "baseline": _public(bases[0]) if bases else None, "baseline_note": "; ".join(notes),
            "logged_to": parent if log and parent else None,
            "files": [str(out / n) for n in (*PAGES, *figures)]}
    outputs.output_path(out, "report.json").write_text(json.dumps(rep, indent=2, default=str))
    if log and parent:
        for path in rep["files"]:
            client.log_artifact(parent, path, artifact_path="report")
        metrics = {"report_champion_test_f1_macro": champ["test_f1_macro"],
                   "report_champion_val_f1_macro": champ["val_f1_macro"]}
        if teacher:
            metrics |= {f"report_teacher_{k}": teacher[k] for k in ("test_f1_macro", "val_f1_macro")}
        if bases:  # the unnamed keys stay the first baseline's, as when there was only one
            metrics |= {"report_baseline_test_f1_macro": bases[0]["test_f1_macro"],
                        "report_baseline_val_f1_macro": bases[0]["val_f1_macro"]}
        for b in bases:
            key = _metric_key(b["name"])
            metrics |= {f"report_baseline_{key}_{k}": b[k] for k in ("test_f1_macro", "val_f1_macro")}
        for key, value in metrics.items():
            if value is not None:
                client.log_metric(parent, key, value)
        client.set_tag(parent, "report_champion_run_id", champ["run_id"])
        client.set_tag(parent, "report_baselines", ", ".join(b["label"] for b in bases) or "-")
        client.set_tag(parent, "report_baseline_run_ids", ", ".join(b["run_id"] for b in bases) or "-")
    return rep


# --------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--study", required=True, help="the Optuna study to report on")
    parser.add_argument("--baseline", action="append", metavar="STUDY_OR_RUN_ID",
                        help="a study name (its best trial) or an MLflow run id; repeat it for several baselines, "
                             f"shown side by side in that order (default {DEFAULT_BASELINE})")
    parser.add_argument("--storage", help="the sweep's storage: journal:PATH (default mlruns/optuna.journal), "
                                          "postgresql://..., sqlite:///...")
    parser.add_argument("--out", help="output folder (default reports/<study>/)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the study's MLflow parent run")


def run(args) -> int:
    rep = report(args.study, args.baseline, args.storage, args.out, log=not args.no_log)
    names = ", ".join(Path(f).name for f in rep["files"])
    console.print(f"report written to [bold]{Path(rep['files'][0]).parent}/[/] ({names})")
    if rep["logged_to"]:
        console.print(f"logged to MLflow run {rep['logged_to']} (artifacts report/, store {tracking.tracking_uri()})")
    else:
        console.print("not logged to MLflow" + ("" if args.no_log else ": the study has no parent run"))
    return 0
