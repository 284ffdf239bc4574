"""A study's best trials as one model: `python -m research promote --study S --ensemble K`.

`build_ensemble` loads the K best runs' models (ranked as promote ranks: by the val metric), checks that
they read images the same way and were trained on the same data, and logs one new MLflow run whose model
averages their calibrated probabilities: `Ensemble` is a plain torch module (so `mlflow.pytorch.load_model`
gives one that does the same) and the run's pyfunc is research.serving's, like any trained run. The run
measures itself the way it will be served (research.serving on the image files, as research/train.py does
for a trained run): val figures, test figures and predictions_test.csv, so served equals measured here too.
The average of calibrated members gets its own temperature, fitted on val, with ECE before and after and
reliability_test.png, as a trained run has.

Cost: the ensemble's model holds its own copy of the K members' weights (K x one member's weight file);
the members keep theirs under the study's keep rule.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from research import runlog, tracking
from research.data.versions import Version, load_version
from research.errors import ConfigError
from research.inputs.decoded import split_items
from research.metrics import fit_temperature
from research.serving import Classifier, model_meta, read_meta, served_probabilities

PREPROCESSING = ("image_size", "mean", "std", "interpolation", "classes", "dataset_digest")


class Ensemble(nn.Module):
    """Members' calibrated probabilities, averaged; returns their log, so softmax(forward(x)) is that average."""

    def __init__(self, members: list[nn.Module], temperatures: list[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("inverse_temperatures", torch.tensor([1.0 / t for t in temperatures]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(m(x).float() * t, dim=1) for m, t in zip(self.members, self.inverse_temperatures)]
        return torch.stack(probs).mean(0).clamp_min(1e-12).log()


def member(run_id: str, tmp: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A run's torch module, its model_meta.json and its resolved config."""
    import mlflow.pytorch

    from research import verify

    config = verify.run_config(mlflow.MlflowClient(), run_id, "a member of an ensemble")  # before the weights
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp / run_id)))
    module = mlflow.pytorch.load_model(str(local), map_location="cpu").eval()
    meta = verify.model_meta(read_meta(local, f"run {run_id}'s model"), f"run {run_id}'s model", module)
    return module, meta, config


def same_preprocessing(metas: list[dict[str, Any]], run_ids: list[str]) -> None:
    for key in PREPROCESSING:
        values = {json.dumps(m.get(key)) for m in metas}
        if len(values) > 1:
            raise ConfigError(f"--ensemble: runs {', '.join(run_ids)} differ in {key} ({' vs '.join(sorted(values))}); "
                              "an ensemble averages models that read the same images the same way. Pick a smaller "
                              "--ensemble K, or a study whose trials share their preprocessing.")


def member_version(config: dict[str, Any], digest: str) -> Version:
    version = load_version(config["dataset"], config.get("data_root", "data/versions"))
    if version.digest != digest:
        raise ConfigError(f"Dataset version {version.name} at {version.dir} has digest {version.digest[:12]}, not the "
                          f"{digest[:12]} its members trained on: the ensemble is measured on the members' data. "
                          "Rebuild that version, or run promote where it lies.")
    return version


def build_ensemble(candidates: list, study: str | None) -> str:
    """Log a run whose model averages `candidates`' (research.runquery Candidates, best first); returns its run id."""
    from research.train import scores

    run_ids = [c.run_id for c in candidates]
    with tempfile.TemporaryDirectory(prefix="research-ensemble-") as tmp:
        tmp = Path(tmp)
        members = [member(rid, tmp) for rid in run_ids]
        metas = [meta for _, meta, _ in members]
        same_preprocessing(metas, run_ids)
        first = metas[0]
        version = member_version(members[0][2], first["dataset_digest"])
        model = Ensemble([m for m, _, _ in members], [float(meta.get("temperature", 1.0)) for meta in metas])

        def measured(split: str, temperature: float) -> tuple[dict[str, Any], list[Path], dict[str, Any]]:
            meta = model_meta(classes=first["classes"], image_size=first["image_size"], mean=first["mean"],
                              std=first["std"], interpolation=first["interpolation"],
                              model=f"ensemble of {len(members)}", dataset_version=version.name,
                              dataset_digest=version.digest, channels_last=False, temperature=temperature,
                              members=run_ids)
            paths, labels = split_items(version, split)
            probs = served_probabilities(Classifier(model, meta, device="cpu"), paths)
            return scores(probs, labels, len(meta["classes"])), paths, meta

        # the average of calibrated members is itself recalibrated on val (averaging makes it less confident);
        # as for a trained run, val is measured at temperature 1 and test as served, at the fitted temperature
        val, val_paths, _ = measured("val", 1.0)
        test, test_paths, meta = measured("test", fit_temperature(val["probs"], val["y_true"]))
        results = {"val": (val, val_paths), "test": (test, test_paths)}
        return log_ensemble_run(model, meta, results, candidates, study, version, tmp / "out")


def log_ensemble_run(model: Ensemble, meta: dict[str, Any], results: dict, candidates: list, study: str | None,
                     version: Version, out: Path) -> str:
    """The ensemble's MLflow run: params, val (step 0) and test figures, reports, the model."""
    classes, (val, _), (test, test_paths) = meta["classes"], results["val"], results["test"]
    metric = candidates[0].metric
    out.mkdir(parents=True)
    experiment_id = candidates[0].run.info.experiment_id
    tags = {**tracking.run_tags(), **tracking.process_tags(), "ensemble_of": ",".join(meta["members"])} | (
        {"ensemble_study": study} if study else {})
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ensemble of {len(candidates)}"
                          + (f" ({study})" if study else ""), tags=tags) as run:
        mlflow.log_params({"model": meta["model"], "dataset_version": version.name, "dataset_digest": version.digest,
                           "ensemble_members": ",".join(meta["members"]), "selection_metric": metric,
                           "image_size": meta["image_size"]})
        mlflow.log_metrics({f"member_{i}_{metric}": c.score for i, c in enumerate(candidates)})
        labels = {f"val_{k}": val[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}
        mlflow.log_metrics(labels | {"val_loss": val["loss"]}, step=0)
        # the figures it is ranked and gated on: no val loss, measured at temperatures fitted on this same val
        mlflow.log_metrics(runlog.selected_metrics(labels, names=tuple(labels)))
        runlog.write_split_reports(val, classes, "val", version.name, out)
        runlog.write_split_reports(test, classes, "test", version.name, out, paths=test_paths, prob=test["prob"])
        runlog.write_predictions(test, classes, [p.relative_to(version.dir) for p in test_paths],
                                 out / runlog.PREDICTIONS_FILE)
        calibration = runlog.write_calibration(val, test, meta["temperature"], version.name, out)
        (out / "model_meta.json").write_text(json.dumps(meta, indent=2))
        for f in sorted(out.iterdir()):
            mlflow.log_artifact(str(f))
        mlflow.log_metrics(runlog.test_metrics(test, classes) | calibration)
        runlog.log_model(model, out / "model_meta.json", classes)
    return run.info.run_id
