"""What one training run writes to MLflow besides its params: epochs, reports, the model."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import torch

from research.figures import mistakes_gallery, per_class_f1_figure, save_figure
from research.metrics import classification_report_frame, confusion_matrix_figure, confusion_matrix_frame
from research.serving import pip_requirements, signature

EPOCH_METRICS = (
    "train_loss", "val_loss", "val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro",
    "lr", "epoch_seconds", "total_seconds",
)


VAL_METRICS = ("val_loss", "val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro")


def selected_metrics(row: dict[str, float], names=VAL_METRICS) -> dict[str, float]:
    """`selected_<metric>` for each val metric of the row whose weights the run keeps: the figures promote ranks
    and gates on (research.store.selection_value), not each metric's best over epochs."""
    from research.store import SELECTED

    return {f"{SELECTED}{k}": float(row[k]) for k in names}


def log_input(dataset, context: str, attempts: int = 4) -> None:
    """mlflow.log_input, retried: workers starting together race on MLflow's get-or-create of the same
    dataset row (sqlite/PostgreSQL UNIQUE constraint on experiment, name, digest); a retry finds the row."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.Random().random() * 0.2)  # own RNG: the seeded one stays untouched


def log_epoch(client, run_id: str, row: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(row[k]), now, int(row["epoch"])) for k in EPOCH_METRICS])


def log_missing_epochs(client, run_id: str, history: list[dict[str, float]]) -> None:
    """Log checkpointed epochs that never reached MLflow (a kill between checkpoint and log)."""
    logged = {m.step for m in client.get_metric_history(run_id, "val_f1_macro")}
    for row in history:
        if int(row["epoch"]) not in logged:
            log_epoch(client, run_id, row)


@contextlib.contextmanager
def hold_ctrl_c():
    """Delay Ctrl-C until an MLflow write is done: a KeyboardInterrupt inside SQLAlchemy can leave the
    sqlite store's connection mid-transaction ("database is locked"), and the run could not be ended."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def test_metrics(result: dict[str, Any], classes: list[str]) -> dict[str, float]:
    metrics = {f"test_{k}": float(result[k]) for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}
    for name, value in zip(classes, result["per_class_f1"]):
        metrics[f"test_f1_{metric_safe(name)}"] = float(value)
    return metrics


def write_split_reports(result: dict[str, Any], classes: list[str], split: str, version_name: str, out: Path, *,
                        paths=None, prob=None) -> None:
    """classification_report_, confusion_matrix_ (CSV, PNG) and per_class_f1_{split}.png into `out`; with `paths`
    and `prob` (each image's file and predicted-class probability, in result's order) also mistakes_{split}.png."""
    if (paths is None) != (prob is None):
        raise ValueError("write_split_reports: pass paths and prob together (the mistakes gallery needs both)")
    y_true, y_pred = result["y_true"], result["y_pred"]
    report = classification_report_frame(y_true, y_pred, classes)
    report.to_csv(out / f"classification_report_{split}.csv", index=False)
    confusion_matrix_frame(y_true, y_pred, classes).to_csv(out / f"confusion_matrix_{split}.csv")
    title = f"{split} ({version_name})"
    figures = {f"confusion_matrix_{split}.png": confusion_matrix_figure(y_true, y_pred, classes, title),
               f"per_class_f1_{split}.png": per_class_f1_figure(report["f1"], classes, report["support"], title)}
    if paths is not None:
        figures[f"mistakes_{split}.png"] = mistakes_gallery(paths, y_true, y_pred, prob, classes, title=title)
    for name, fig in figures.items():
        save_figure(fig, out / name)


PREDICTIONS_FILE = "predictions_test.csv"  # one row per test image: what the served model must reproduce


def write_predictions(result: dict[str, Any], classes: list[str], files: list[Path], out: Path) -> None:
    """file (relative to the dataset version), true, label, probability: the run's test predictions, image by image."""
    import pandas as pd

    frame = pd.DataFrame({"file": [Path(f).as_posix() for f in files], "true": [classes[i] for i in result["y_true"]],
                          "label": [classes[i] for i in result["y_pred"]], "probability": result["prob"]})
    frame.to_csv(out, index=False)


def write_calibration(val: dict[str, Any], test: dict[str, Any], temperature: float, version_name: str,
                      out: Path) -> dict[str, float]:
    """ECE before and after the temperature (fitted on val; the test probabilities are the served, calibrated
    ones) as metrics, and reliability_test.png beside the per-class F1 chart."""
    from research.metrics import expected_calibration_error as ece
    from research.metrics import reliability_figure, tempered

    raw_test = tempered(test["probs"], 1.0 / temperature)  # back to temperature 1: softmax(logits)
    fig = reliability_figure(test["probs"], test["y_true"], f"test ({version_name}), temperature {temperature:.2f}",
                             uncalibrated=raw_test)
    save_figure(fig, out / "reliability_test.png")
    return {"temperature": temperature, "val_ece_uncalibrated": ece(val["probs"], val["y_true"]),
            "val_ece": ece(tempered(val["probs"], temperature), val["y_true"]),
            "test_ece_uncalibrated": ece(raw_test, test["y_true"]), "test_ece": ece(test["probs"], test["y_true"])}


def metric_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_./ " else "_" for c in name)


def log_model(model: torch.nn.Module, meta_file: Path, classes: list[str]) -> None:
    """The best-val module as the run's one model `model`: an `mlflow.pytorch` model (pickle format, so
    `mlflow.pytorch.load_model` gives a module to fine-tune) whose pyfunc flavor is research.serving's
    classifier (base64 images in, labels out), so `promote` registers it as is and no copy is stored."""
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    # a signature, no input example: validating one would load the model a second time per run
    mlflow.models.Model.log(
        artifact_path=None, name="model", flavor=_ClassifierFlavor, flavor_name="mlflow.pytorch", pytorch_model=model,
        serialization_format="pickle", pip_requirements=pip_requirements(), signature=signature(classes),
        extra_files=[str(meta_file)], code_paths=[str(Path(__file__).resolve().parent)],
    )


class _ClassifierFlavor:
    """`mlflow.pytorch.save_model`, with the python_function flavor loaded by research.serving."""

    @staticmethod
    def save_model(path: str, mlflow_model, **kwargs) -> None:
        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["loader_module"] = "research.serving"
        mlflow_model.save(str(Path(path) / "MLmodel"))
