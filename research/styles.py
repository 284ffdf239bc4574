"""`python -m research styles`: leave-one-style-out, DomainBed's protocol on the dataset's drawing styles.

One recipe (a sweep spec's base, or a finished run's config) trains once per held-out style family (a style,
or the renderings of one design, such as Fluent's flat and high contrast: held out together, or the figure
would measure a re-colouring of drawings training saw). Its version `<base>-no-<family>` (`split
--holdout-style`, built from the base version's clean dir, recipe and seed when missing) tests on every
drawing of that family; training and the choice of the epoch (val) see only the other families. One MLflow
parent run per call and a child run per family; the parent logs each family's held-out macro F1, their mean,
and the base version's mixed-style test figure when the recipe came from a run. Validation chooses, as
everywhere: the held-out family is a second test, never a choice.
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
from rich.console import Console
from rich.table import Table

from research import configfile, tracking, verify
from research.config import TrainConfig
from research.data.versions import Version, load_version
from research.errors import ConfigError

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
    data = verify.run_config(client, run_id, "styles --run (its config is the recipe)")
    return configfile.from_dict(TrainConfig, data), run.data.metrics.get("test_f1_macro")


def holdout_version(base: Version, style: str) -> Version:
    """`<base>-no-<style>` beside the base version: built from the base's clean dir, recipe and seed with the
    style held out, or reused when one built that way from the same clean data (source digest) is there."""
    from research.data.split import Recipe, build_version, read_clean_dir, source_digest

    recipe = configfile.from_dict(Recipe, {**base.info["recipe"], "holdout_style": style})
    name, root = f"{base.name}-no-{style}", base.dir.parent
    rebuild = (f"python -m research split {base.info['source']} --version {{name}} --recipe <{base.name}'s recipe>"
               f"{{extra}} --force")
    frame, _, info = read_clean_dir(base.info["source"])
    clean = source_digest(frame, info)
    if base.info.get("source_digest") != clean:  # the held-out figures would be of other images than the mixed ones
        raise ConfigError(f"{base.info['source']} changed since {base.name} was split from it (source digest "
                          f"{str(base.info.get('source_digest'))[:12]}, now {clean[:12]}); rebuild {base.name} "
                          f"first: {rebuild.format(name=base.name, extra='')}.")
    if (root / name / "version.json").is_file():
        version = load_version(name, root)
        if (version.info.get("recipe") == configfile.to_dict(recipe) and version.info.get("seed") == base.info["seed"]
                and version.info.get("source_digest") == clean):
            return version
        raise ConfigError(f"{version.dir} exists but was not split from {base.name}'s clean data and recipe with "
                          f"{style} held out; delete it (or rebuild it: "
                          f"{rebuild.format(name=name, extra=f' --holdout-style {style}')}).")
    build_version(base.info["source"], name, recipe, base.info["seed"], out_root=root)
    return load_version(name, root)


def families_of_version(base: Version) -> dict[str, list[str]]:
    """The style families of the base version's clean dir (family -> its styles): what is held out, one at a
    time."""
    from research.data.split import families_of, read_clean_dir

    return families_of(read_clean_dir(base.info["source"])[0])


def leave_one_style_out(cfg: TrainConfig, *, styles: list[str] | None = None, mixed_test_f1: float | None = None,
                        source: str = "", experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Train `cfg` once per held-out style as child runs of one parent run; per-style and mean results."""
    from research.train import train

    tracking.setup()
    tracking.check_reachable()
    base = load_version(cfg.dataset, cfg.data_root)
    families = families_of_version(base)
    every = list(families)
    styles = styles or every
    unknown = sorted(set(styles) - set(every))
    if unknown or len(every) < 2:
        raise ConfigError(f"--style {', '.join(unknown) or '?'}: {base.name}'s clean dir has the style families "
                          f"{', '.join(every) or 'none (no style column)'}; leaving one out needs two or more.")
    versions = {style: holdout_version(base, style) for style in styles}  # all built before any training
    params = {"model": cfg.model, "dataset_version": base.name, "dataset_digest": base.digest,
              "styles": ",".join(styles), "source": source,
              "style_families": "; ".join(f"{f}: {', '.join(families[f])}" for f in styles)}
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
    from research.runquery import Candidate

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
    members = dict(part.split(": ", 1) for part in parent.data.params.get("style_families", "").split("; ") if part)
    rows = [{"style": style, "val_f1_macro": m.get(f"val_{style}_heldout_f1_macro"),
             "heldout_f1_macro": m.get(f"heldout_{style}_f1_macro"), "members": members.get(style, style)}
            for style in parent.data.params.get("styles", "").split(",") if style]
    return {"parent_run_id": parent.info.run_id, "rows": rows, "mean_heldout_f1_macro": m.get("heldout_mean_f1_macro"),
            "dataset_version": parent.data.params.get("dataset_version")}


def print_table(out: dict[str, Any]) -> None:
    table = Table(title=f"leave one style out (macro F1): {out['source'] or 'the recipe'}")
    for col in ("held-out style family", "val (other families: chose the epoch)", "held-out family (test)",
                "accuracy", "images"):
        table.add_column(col, justify="left" if col == "held-out style family" else "right")
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
    parser.add_argument("--style", action="append", default=None, metavar="FAMILY",
                        help="hold out only this style family (repeatable; default: every family of the dataset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change the recipe, e.g. --set epochs=5")
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")


def run(args) -> int:
    tracking.setup()
    if args.ensemble and len(args.run_ids or []) < 2:
        raise ConfigError("--ensemble averages several recipes: pass two or more --run RUN_ID.")
    if args.spec:
        recipes = [(recipe_of_spec(args.spec), None, f"spec {args.spec}")]
    else:  # all read before training: a run without config.yaml is refused now (research/verify.py)
        recipes = [(*recipe_of_run(run_id), f"run {run_id}") for run_id in args.run_ids]
    overrides = configfile.parse_overrides(args.overrides)
    if overrides:
        recipes = [(configfile.from_dict(TrainConfig, configfile.merge(configfile.to_dict(cfg), overrides)),
                    None,  # another recipe than the run's: not the run's own leave-one-style-out either
                    source + " with " + " ".join(args.overrides)) for cfg, _, source in recipes]
    if args.ensemble:
        check_members(recipes)
    outs = []
    with interrupted_hint(args):
        for cfg, mixed, source in recipes:
            outs.append(leave_one_style_out(cfg, styles=args.style, mixed_test_f1=mixed, source=source,
                                            experiment=args.experiment))
            print_table(outs[-1])
        if args.ensemble:
            print_table(ensemble_by_style(outs, experiment=args.experiment))
    return 0


# ------------------------------------------------------------------------ checks before any training

def check_members(recipes: list[tuple[TrainConfig, float | None, str]]) -> None:
    """`--ensemble` averages, per held-out style, the models the recipes train: they must read the same images
    the same way (the dataset version, image size, interpolation, mean and std), or the average is refused
    after every recipe trained. Checked from the configs before any training."""
    from research.ensemble import PREPROCESSING

    seen = [(source, recipe_reads(cfg)) for cfg, _, source in recipes]
    for key in (k for k in PREPROCESSING if k != "classes"):
        if len({json_text(reads[key]) for _, reads in seen}) > 1:
            shown = "; ".join(f"{source}: {json_text(reads[key])}" for source, reads in seen)
            raise ConfigError(f"styles --ensemble: the recipes differ in {key} ({shown}); an ensemble averages "
                              "models that read the same images the same way, so it would be refused after every "
                              "recipe trained. Drop --ensemble, pass runs that share it, or make them agree with "
                              f"--set (e.g. --set image_size=...).")


def recipe_reads(cfg: TrainConfig) -> dict[str, Any]:
    """How a recipe's models will read images: its base version's digest and the model's preprocessing at the
    recipe's image size (the model built without weights on the meta device: nothing is allocated)."""
    import torch

    from research import models

    base = load_version(cfg.dataset, cfg.data_root)
    with torch.device("meta"):
        model = models.build_model(cfg.model, len(base.classes), pretrained=False, dropout=cfg.dropout, head=cfg.head)
    return models.preprocessing(model, cfg.image_size).as_dict() | {"dataset_digest": base.digest}


def json_text(value: Any) -> str:
    import json

    return json.dumps(value)


@contextlib.contextmanager
def interrupted_hint(args) -> Iterator[None]:
    """Ctrl-C: say what continues the call. A child run's own `train --resume` would finish that style alone,
    outside this call's parent run, and not at all before its first checkpoint: the call is run again."""
    try:
        yield
    except KeyboardInterrupt:
        console.print("[yellow]styles interrupted[/]: its parent run is marked KILLED. Run the same "
                      "`python -m research styles` command again: the held-out versions are reused and every "
                      "style trains again under a new parent run.", soft_wrap=True)
        raise
