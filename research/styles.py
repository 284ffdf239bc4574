"""`python -m research styles`: leave-one-style-out, DomainBed's protocol on the dataset's drawing styles.

One recipe (a sweep spec's base, or a finished run's config) trains once per held-out style. Its version
`<base>-no-<style>` (`split --holdout-style`, built from the base version's clean dir, recipe and seed when
missing) tests on every drawing of that style; training and the choice of the epoch (val) see only the
other styles. One MLflow parent run per call and a child run per style; the parent logs each style's
held-out macro F1, their mean, and the base version's mixed-style test figure when the recipe came from a
run. Validation chooses, as everywhere: the held-out style is a second test, never a choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml
from rich.console import Console
from rich.table import Table

from research import config as config_mod
from research import tracking
from research.config import ConfigError, TrainConfig
from research.data.versions import Version, load_version

console = Console()
EXPERIMENT = "styles"


def recipe_of_spec(path: str | Path) -> TrainConfig:
    from research.sweep.spec import base_config, load_spec

    return base_config(load_spec(path))


def recipe_of_run(run_id: str) -> tuple[TrainConfig, float | None]:
    """A finished run's resolved config, and its test macro F1 on its own (mixed-style) version."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"No MLflow run {run_id!r} in {tracking.tracking_uri()}: pass a run id from "
                          "`python -m research runs`.") from exc
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp)
        data = yaml.safe_load(Path(local).read_text())
    return config_mod.from_dict(TrainConfig, data), run.data.metrics.get("test_f1_macro")


def holdout_version(base: Version, style: str) -> Version:
    """`<base>-no-<style>` beside the base version: built from the base's clean dir, recipe and seed with the
    style held out, or reused when one built that way is there."""
    from research.data.split import Recipe, build_version

    recipe = config_mod.from_dict(Recipe, {**base.info["recipe"], "holdout_style": style})
    name, root = f"{base.name}-no-{style}", base.dir.parent
    if (root / name / "version.json").is_file():
        version = load_version(name, root)
        if version.info.get("recipe") == config_mod.to_dict(recipe) and version.info.get("seed") == base.info["seed"]:
            return version
        raise ConfigError(f"{version.dir} exists but was not split from {base.name}'s recipe with {style} held out; "
                          f"delete it (or rebuild it: python -m research split {base.info['source']} --version {name} "
                          f"--recipe <{base.name}'s recipe> --holdout-style {style} --force).")
    build_version(base.info["source"], name, recipe, base.info["seed"], out_root=root)
    return load_version(name, root)


def styles_of_version(base: Version) -> list[str]:
    from research.data.split import read_clean_dir, styles_of

    return styles_of(read_clean_dir(base.info["source"])[0])


def leave_one_style_out(cfg: TrainConfig, *, styles: list[str] | None = None, mixed_test_f1: float | None = None,
                        source: str = "", experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Train `cfg` once per held-out style as child runs of one parent run; per-style and mean results."""
    from research.train import train

    tracking.setup()
    tracking.check_reachable()
    base = load_version(cfg.dataset, cfg.data_root)
    every = styles_of_version(base)
    styles = styles or every
    unknown = sorted(set(styles) - set(every))
    if unknown or len(every) < 2:
        raise ConfigError(f"--style {', '.join(unknown) or '?'}: {base.name}'s clean dir has the styles "
                          f"{', '.join(every) or 'none (no style column)'}; leaving one out needs two or more.")
    versions = {style: holdout_version(base, style) for style in styles}  # all built before any training
    params = {"model": cfg.model, "dataset_version": base.name, "dataset_digest": base.digest,
              "styles": ",".join(styles), "source": source}
    with parent_run(f"styles {cfg.model} on {base.name}", source, params, experiment) as parent_id:
        rows = []
        for style, version in versions.items():
            result = train(dataclasses.replace(cfg, dataset=version.name, data_root=str(version.dir.parent),
                                               experiment=experiment, run_name=f"held out: {style}"),
                           parent_run_id=parent_id, tags={"holdout_style": style})
            rows.append({"style": style, "version": version.name, "run_id": result.run_id,
                         "val_f1_macro": result.best_val_f1, "heldout_f1_macro": result.test["test_f1_macro"],
                         "heldout_accuracy": result.test["test_accuracy"],
                         "heldout_images": len(version.split_frame("test"))})
        return log_summary(parent_id, rows, mixed_test_f1, source)


@contextlib.contextmanager
def parent_run(name: str, source: str, params: dict[str, Any], experiment: str) -> Iterator[str]:
    """One leave-one-style-out parent run: tagged so `latest_for_run` finds it, ended FINISHED only when the body
    returns (FAILED on an error, KILLED on Ctrl-C), so a half-done call never reads as a result."""
    client = mlflow.MlflowClient()
    parent = client.create_run(tracking.experiment_id(experiment), run_name=name,
                               tags={**tracking.run_tags(), "styles_role": "parent", "styles_source": source})
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    status = "FAILED"
    try:
        yield parent_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status)


def log_summary(parent_id: str, rows: list[dict[str, Any]], mixed_test_f1: float | None,
                source: str) -> dict[str, Any]:
    summary = summarize(rows, mixed_test_f1)
    mlflow.MlflowClient().log_batch(parent_id, metrics=[mlflow.entities.Metric(k, v, 0, 0)
                                                        for k, v in summary["metrics"].items()])
    return summary | {"parent_run_id": parent_id, "rows": rows, "source": source}


def summarize(rows: list[dict[str, Any]], mixed_test_f1: float | None) -> dict[str, Any]:
    metrics = {f"heldout_{r['style']}_f1_macro": r["heldout_f1_macro"] for r in rows}
    metrics |= {f"val_{r['style']}_heldout_f1_macro": r["val_f1_macro"] for r in rows}
    mean = statistics.fmean(r["heldout_f1_macro"] for r in rows)
    metrics["heldout_mean_f1_macro"] = mean
    if mixed_test_f1 is not None:
        metrics["mixed_test_f1_macro"] = mixed_test_f1
    return {"mean_heldout_f1_macro": mean, "mixed_test_f1_macro": mixed_test_f1, "metrics": metrics}


def ensemble_by_style(outs: list[dict[str, Any]], *, experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Per held-out style, the runs that several recipes trained without it (`leave_one_style_out` results, one
    per recipe) as one ensemble (research.ensemble: their calibrated probabilities averaged, measured as served
    on the held-out style), under a parent run of its own. Each ensemble is chosen by nothing: its members
    are the recipes given, and val (other styles) is reported beside the held-out figure as for one recipe."""
    from research.ensemble import build_ensemble
    from research.registry import Candidate

    client = mlflow.MlflowClient()
    styles = [r["style"] for r in outs[0]["rows"]]
    if any([r["style"] for r in o["rows"]] != styles for o in outs[1:]):
        raise ConfigError("an ensemble by style needs every recipe left out on the same styles")
    source = "ensemble of " + "; ".join(o["source"] for o in outs)
    params = {"styles": ",".join(styles), "members": "; ".join(o["source"] for o in outs)}
    with parent_run(f"styles ensemble of {len(outs)}", source, params, experiment) as parent_id:
        rows = []
        for i, style in enumerate(styles):
            members = [Candidate(client.get_run(o["rows"][i]["run_id"]), o["rows"][i]["val_f1_macro"], "val_f1_macro")
                       for o in outs]
            run_id = build_ensemble(members, None)
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)
            client.set_tag(run_id, "holdout_style", style)
            m = client.get_run(run_id).data.metrics
            first = outs[0]["rows"][i]
            rows.append({"style": style, "version": first["version"], "run_id": run_id,
                         "val_f1_macro": m["val_f1_macro"], "heldout_f1_macro": m["test_f1_macro"],
                         "heldout_accuracy": m["test_accuracy"], "heldout_images": first["heldout_images"]})
        return log_summary(parent_id, rows, None, source)  # no mixed-style run of this average was measured


def latest_for_run(run_id: str, client=None) -> dict[str, Any] | None:
    """The newest finished `styles --run RUN_ID` of this store: {"parent_run_id", "rows", "mean_heldout_f1_macro"},
    or None when that run's recipe was never left one style out."""
    client = client or mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    query = f"tags.styles_role = 'parent' and tags.styles_source = 'run {run_id}' and attributes.status = 'FINISHED'"
    found = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        return None
    parent = found[0]
    m = parent.data.metrics
    rows = [{"style": style, "val_f1_macro": m.get(f"val_{style}_heldout_f1_macro"),
             "heldout_f1_macro": m.get(f"heldout_{style}_f1_macro")}
            for style in parent.data.params.get("styles", "").split(",") if style]
    return {"parent_run_id": parent.info.run_id, "rows": rows, "mean_heldout_f1_macro": m.get("heldout_mean_f1_macro"),
            "dataset_version": parent.data.params.get("dataset_version")}


def print_table(out: dict[str, Any]) -> None:
    table = Table(title=f"leave one style out (macro F1): {out['source'] or 'the recipe'}")
    for col in ("held-out style", "val (other styles: chose the epoch)", "held-out style (test)", "accuracy",
                "images"):
        table.add_column(col, justify="left" if col == "held-out style" else "right")
    for r in out["rows"]:
        table.add_row(r["style"], f"{r['val_f1_macro']:.3f}", f"{r['heldout_f1_macro']:.3f}",
                      f"{r['heldout_accuracy']:.3f}", str(r["heldout_images"]))
    table.add_row("mean", "", f"{out['mean_heldout_f1_macro']:.3f}", "", "", style="bold")
    console.print(table)
    mixed = out["mixed_test_f1_macro"]
    if mixed is not None and not math.isnan(mixed):
        console.print(f"the same recipe's test macro F1 with the styles mixed (its source run): {mixed:.3f}")
    console.print(tracking.ui_line(tracking.run_url(out["parent_run_id"])), markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="a sweep spec (sweeps/*.yaml): its base config is the recipe")
    source.add_argument("--run", dest="run_ids", metavar="RUN_ID", action="append",
                        help="a finished run: its config is the recipe (repeatable: one leave-one-style-out each)")
    parser.add_argument("--ensemble", action="store_true",
                        help="with several --run: also average, per held-out style, the runs trained without it "
                             "(one model, as promote --ensemble builds) and report it as one more recipe")
    parser.add_argument("--style", action="append", default=None,
                        help="hold out only this style (repeatable; default: every style of the dataset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change the recipe, e.g. --set epochs=5")
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")


def run(args) -> int:
    tracking.setup()
    if args.ensemble and len(args.run_ids or []) < 2:
        raise ConfigError("--ensemble averages several recipes: pass two or more --run RUN_ID.")
    if args.spec:
        recipes = [(recipe_of_spec(args.spec), None, f"spec {args.spec}")]
    else:
        recipes = [(*recipe_of_run(run_id), f"run {run_id}") for run_id in args.run_ids]  # all read before training
    overrides = config_mod.parse_overrides(args.overrides)
    outs = []
    for cfg, mixed, source in recipes:
        if overrides:
            cfg = config_mod.from_dict(TrainConfig, config_mod.merge(config_mod.to_dict(cfg), overrides))
            mixed = None  # another recipe than the run's: not the run's own leave-one-style-out either
            source += " with " + " ".join(args.overrides)
        outs.append(leave_one_style_out(cfg, styles=args.style, mixed_test_f1=mixed, source=source,
                                        experiment=args.experiment))
        print_table(outs[-1])
    if args.ensemble:
        print_table(ensemble_by_style(outs, experiment=args.experiment))
    return 0
