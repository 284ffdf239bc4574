"""Train one model on one dataset version; every epoch and every artifact goes to one MLflow run.

`train(cfg)` reads as its steps: resolve the config for the device and model, build data and
model, open the MLflow run, fit, evaluate the best epoch on test, log the model. Per epoch the
order of writes is train -> evaluate -> checkpoint (atomic) -> log the epoch's metrics, so a
kill at any point loses at most that epoch and never logs a metric twice; `resume` logs the
checkpointed epochs MLflow missed, then continues in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from optuna import TrialPruned
from rich.console import Console

from research import checkpoints, configfile, inputs, models, runlog, tracking
from research.config import TrainConfig
from research.data.versions import Version, load_version, mlflow_dataset
from research.errors import ConfigError, UserFixable
from research.inputs.decoded import split_items
from research.inputs.loaders import Loaders
from research.inputs.routes import Route
from research.losses import build_loss
from research.metrics import classification_metrics, fit_temperature
from research.progress import EpochDisplay
from research.schedules import Schedule, build_optimizer, build_scheduler, layer_decay_scales, param_groups
from research.serving import Classifier, model_meta, served_probabilities

console = Console()

PARAM_NAMES = {"dataset": "dataset_version"}  # config field -> the MLflow param name users know


class TrainingDiverged(UserFixable, RuntimeError):
    """The loss became NaN/inf; the run is marked FAILED (a sweep records that trial alone as FAIL and goes on).
    Its message names the fix (a lower lr, warm-up), so the CLI shows it as one `error:` line."""


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as a plain dict."""

    epoch: int = 0  # last finished epoch
    best_val_f1: float = -1.0
    best_epoch: int = 0
    stale: int = 0  # epochs since the best
    total_seconds: float = 0.0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TrainResult:
    run_id: str
    status: str  # FINISHED
    best_epoch: int
    best_val_f1: float
    epochs_run: int
    test: dict[str, float]
    history: list[dict[str, float]]


@dataclasses.dataclass
class Parts:
    """Everything one training needs, built from the config."""

    cfg: TrainConfig
    device: torch.device
    version: Version
    prep: models.Preprocessing
    route: Route  # the training input (research/inputs): its batches, what trains on them, its loss
    model: torch.nn.Module  # the whole classifier (logged and served; never the torch.compile wrapper)
    step_module: torch.nn.Module  # what the optimizer trains: the model, or its suffix on stored features
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    ema: Any | None  # timm ModelEmaV3 of step_module

    @property
    def data(self) -> Loaders:
        return self.route.data

    @property
    def trained(self) -> torch.nn.Module:
        """The module whose weights training changes; checkpoints hold its weights only (on stored
        features that is the head: the frozen trunk is rebuilt from the config)."""
        return models_unwrap(self.step_module)

    @property
    def eval_module(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.step_module

    def kept_weights(self) -> dict[str, torch.Tensor]:
        """The evaluated weights (the EMA's when on) of the trained module."""
        return (self.ema.module if self.ema is not None else self.trained).state_dict()


# ------------------------------------------------------------------------------------ training

def train(cfg: TrainConfig, *, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          on_start: Callable[[str], None] | None = None, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None) -> TrainResult:
    """Train per `cfg`, log everything to one MLflow run, return the run's outcome.

    `on_start(run_id)` is called once the run exists (a sweep records it on the trial);
    `on_epoch(epoch, row)` after each logged epoch (an Optuna trial reports there and may raise
    optuna.TrialPruned: the run then ends KILLED with tag `pruned=true`).
    """
    tracking.setup()
    tracking.check_reachable()  # before any cache or checkpoint is written
    parts = build_parts(cfg)
    state = TrainState()
    run_tags = {"device": str(parts.device), **(tags or {})}
    with tracked_run(parts.cfg, parent_run_id=parent_run_id, tags=run_tags) as run_id:
        log_run_inputs(parts, run_id)
        return _train_in_run(parts, state, run_id, on_start, on_epoch)


def resume(ref: str, checkpoint_root: str | None = None, **kwargs) -> TrainResult:
    """Continue an interrupted run in the same MLflow run from its last finished epoch."""
    ckdir, run_id = checkpoints.find_checkpoint(ref, checkpoint_root)
    checkpoint = checkpoints.load_checkpoint(ckdir / "last.pt")
    cfg = configfile.from_dict(TrainConfig, checkpoint["config"])
    tracking.setup()
    tracking.check_reachable()
    with checkpoints.live_run(ckdir, run_id):  # refused (pid, host) while another process trains it
        try:
            run = mlflow.MlflowClient().get_run(run_id).info
        except mlflow.exceptions.MlflowException as exc:
            raise ConfigError(f"Checkpoint {ckdir} belongs to run {run_id}, which is not in the tracking store "
                              f"{tracking.tracking_uri()}; "
                              "set MLFLOW_TRACKING_URI to the store it was trained in.") from exc
        checkpoints.check_resumable(ckdir, run_id, run.status, run.lifecycle_stage == "deleted")  # gc's rule too
        parts = build_parts(cfg)
        state = restore(parts, checkpoint)
        with tracked_run(parts.cfg, run_id=run_id, parent_run_id=kwargs.pop("parent_run_id", None)) as run_id:
            runlog.log_missing_epochs(mlflow.MlflowClient(), run_id, state.history)
            return _train_in_run(parts, state, run_id, kwargs.get("on_start"), kwargs.get("on_epoch"))


def _train_in_run(parts: Parts, state: TrainState, run_id: str, on_start, on_epoch) -> TrainResult:
    ckdir = checkpoints.checkpoint_dir(parts.cfg.checkpoint_dir, run_id)
    with checkpoints.live_run(ckdir, run_id):  # pid + host + heartbeat beside last.pt: `--resume` refuses it
        if on_start is not None:
            on_start(run_id)
        print_start(parts, run_id, state)
        fit(parts, state, ckdir, run_id, on_epoch)
        test = finish(parts, ckdir, state.best_epoch, chosen_row(state))
    return TrainResult(run_id, "FINISHED", state.best_epoch, state.best_val_f1, state.epoch, test, state.history)


def build_parts(cfg: TrainConfig) -> Parts:
    """Input route, device, data version, model (and its preprocessing), data, loss, optimizer, schedule, EMA."""
    route = inputs.route(cfg)  # the route's own config checks, before anything is built
    device = resolve_device(cfg.device)
    version = load_version(cfg.dataset, cfg.data_root)
    seed_everything(cfg.seed)
    model = models.build_model(cfg.model, len(version.classes), pretrained=cfg.pretrained, dropout=cfg.dropout,
                               head=cfg.head)
    cfg = resolved(cfg, device, model, route)
    check_batch_size(cfg, version, route.trained_part(model))
    prep = models.preprocessing(model, cfg.image_size)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = route.build(version, model, prep, cfg, device).data
    step_module = route.step_module(model)
    counts = np.bincount(data.train_labels, minlength=len(data.classes)).tolist()
    optimizer = build_optimizer(cfg.optimizer, optimizer_groups(cfg, model, step_module, route.layer_decay), cfg.lr,
                                cfg.momentum)
    scheduler = build_scheduler(cfg.lr_schedule, optimizer, epochs=cfg.epochs, steps_per_epoch=len(data.train),
                                base_lr=cfg.lr, warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size,
                                step_gamma=cfg.step_gamma)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(step_module, decay=cfg.ema_decay)
    if cfg.compile:  # only where the route compiles (resolved turns it off elsewhere)
        step_module = torch.compile(model)
    return Parts(cfg, device, version, prep, route, model, step_module, build_loss(cfg, counts), optimizer,
                 scheduler, ema)


def fit(parts: Parts, state: TrainState, ckdir: Path, run_id: str, on_epoch) -> None:
    """Epochs from state.epoch + 1: train, evaluate, checkpoint, log; best weights kept in best.pt."""
    cfg, client = parts.cfg, mlflow.MlflowClient()
    with EpochDisplay(console, cfg.epochs) as display:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            row = run_epoch(parts, epoch, display, state.total_seconds)
            state.history.append(row)
            state.epoch, state.total_seconds = epoch, row["total_seconds"]
            improved = row["val_f1_macro"] > state.best_val_f1
            if improved:
                state.best_val_f1, state.best_epoch, state.stale = row["val_f1_macro"], epoch, 0
            else:
                state.stale += 1
            # one write an epoch: an improving epoch's last.pt is also best.pt (a hard link, not a copy)
            best = (ckdir / "best.pt",) if improved else ()
            checkpoints.atomic_save(checkpoint(parts, state, run_id), ckdir / "last.pt", *best)
            with runlog.hold_ctrl_c():
                runlog.log_epoch(client, run_id, row)
            display.add(row)
            if on_epoch is not None:
                on_epoch(epoch, row)
            if cfg.early_stopping_patience and state.stale >= cfg.early_stopping_patience:
                console.print(f"early stop: no better val macro F1 for {state.stale} epochs")
                mlflow.set_tag("early_stopped_epoch", str(epoch))
                break


def run_epoch(parts: Parts, epoch: int, display: EpochDisplay, seconds_before: float) -> dict[str, float]:
    """One epoch of training and validation -> the epoch's metrics row."""
    cfg = parts.cfg
    t0 = time.perf_counter()
    parts.route.start_epoch(parts.model, epoch)  # the epoch's trunk freeze
    if hasattr(parts.criterion, "set_epoch"):
        parts.criterion.set_epoch(epoch)
    lr = parts.scheduler.current_lr()
    with display.batches(epoch, len(parts.data.train)) as advance:
        train_loss = train_one_epoch(parts, epoch, advance)
    if not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"epoch {epoch}: train loss is {train_loss} (lr={lr:.2e}, {cfg.optimizer}); the run diverged. "
            "Lower --lr, add warm-up (--set warmup_epochs=1 with --lr-schedule cosine) or use a BN model."
        )
    val = evaluate(parts.eval_module, parts.data.val, parts.device, cfg.amp, len(parts.data.classes))
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
        "val_precision_macro": val["precision_macro"], "val_recall_macro": val["recall_macro"],
        "val_f1_macro": val["f1_macro"], "lr": lr, "epoch_seconds": seconds, "total_seconds": seconds_before + seconds,
    }


def train_one_epoch(parts: Parts, epoch: int, advance=lambda images: None) -> float:
    """Mean training loss over the epoch's batches."""
    module, optimizer, device, amp, route = parts.step_module, parts.optimizer, parts.device, parts.cfg.amp, parts.route
    route.train_mode(parts.model, module)
    total, count = 0.0, 0
    with closing_iter(parts.data.train.epoch(epoch)) as batches:
        for batch in batches:
            x = batch[0]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = route.loss(parts.criterion, module(x), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if parts.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), parts.cfg.grad_clip, foreach=True)
            optimizer.step()
            parts.scheduler.step_batch()
            if parts.ema is not None:
                parts.ema.update(models_unwrap(module))
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
            advance(x.shape[0])
    parts.scheduler.step_epoch()
    if count == 0:
        raise ConfigError("The training split yielded no batch: batch_size is larger than the training set.")
    return total / count


def chosen_row(state: TrainState) -> dict[str, float]:
    """The metrics row of the epoch whose weights the run keeps (the best val macro F1)."""
    return next(row for row in state.history if int(row["epoch"]) == state.best_epoch)


def finish(parts: Parts, ckdir: Path, best_epoch: int, chosen: dict[str, float]) -> dict[str, float]:
    """Best-val weights -> val/test metrics, reports, confusion matrices, the MLflow model.

    Val is the training-time figure that chose the epoch; `chosen` (that epoch's row) is logged as the run's
    selection figures, `selected_val_*`: what promote ranks and gates on, whichever val metric it reads. Test is
    measured the way the registered model predicts (research.serving on the image files, fp32 on the CPU, whatever
    amp and device trained it), so `models:/...` reproduces the logged test figures image for image
    (predictions_test.csv lists them).
    """
    parts.trained.load_state_dict(checkpoints.kept_weights(ckdir / "best.pt"))
    classes, version = parts.data.classes, parts.version
    val = evaluate(parts.trained, parts.data.val, parts.device, parts.cfg.amp, len(classes))
    temperature = fit_temperature(val["probs"], val["y_true"])  # on val: the served probabilities are calibrated
    model = models_unwrap(parts.model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    meta = model_meta(classes=classes, **parts.prep.as_dict(), model=parts.cfg.model, dataset_version=version.name,
                      dataset_digest=version.digest, channels_last=bool(parts.cfg.channels_last),
                      temperature=temperature)
    paths, labels = split_items(version, "test")
    test = scores(served_probabilities(Classifier(model, meta, device="cpu"), paths), labels, len(classes))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runlog.write_split_reports(val, classes, "val", version.name, tmp)
        runlog.write_split_reports(test, classes, "test", version.name, tmp, paths=paths, prob=test["prob"])
        calibration = runlog.write_calibration(val, test, temperature, version.name, tmp)
        files = [p.relative_to(version.dir) for p in paths]
        runlog.write_predictions(test, classes, files, tmp / runlog.PREDICTIONS_FILE)
        (tmp / "confusion_matrix.png").write_bytes((tmp / "confusion_matrix_test.png").read_bytes())
        (tmp / "model_meta.json").write_text(json.dumps(meta, indent=2))
        for f in sorted(tmp.iterdir()):
            mlflow.log_artifact(str(f))
        metrics = (runlog.test_metrics(test, classes) | calibration | runlog.selected_metrics(chosen)
                   | {"best_epoch": float(best_epoch)})
        mlflow.log_metrics(metrics)
        runlog.log_model(model, tmp / "model_meta.json", classes)
    return metrics


# ------------------------------------------------------------------------------ configuration

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is visible; use --device cpu or auto.")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on fast kernels on `device`: a CUDA GPU that supports bf16, or a CPU for which
    oneDNN has bf16 kernels (its own check, the one torch uses: AVX-512 or newer; AVX-512-BF16 and AMX in
    hardware). Elsewhere autocast falls back to slow kernels, and a CPU step gets slower, not faster
    (benchmarks/amp_cpu.py: a step 7-9x slower on an AVX2-only EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def resolved(cfg: TrainConfig, device: torch.device, model: torch.nn.Module, route: Route | None = None) -> TrainConfig:
    """Fill what the device, model and input route decide (None: the route cfg names): CUDA flags, bf16 where it is
    native, the image size, the head, the trunk-freeze epochs (and whatever else the route pins, a teacher's
    version)."""
    route = route or inputs.route(cfg)
    on_cuda = device.type == "cuda"
    pick = lambda value: on_cuda if value is None else value  # noqa: E731
    native = native_bf16(device)
    if cfg.amp and not native:
        console.print(f"[yellow]amp=true on a {device.type} without native bf16[/] "
                      f"({torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else device}): autocast "
                      "emulates it, several times slower than float32 (benchmarks/amp_cpu.py); leave amp unset "
                      "(on where bf16 is native) or set amp=false.")
    head = cfg.head if cfg.head != "auto" else ("v2" if cfg.model.endswith("_v2") else "linear")
    # where the route does not compile (stored features: only the suffix trains), the param says what happened
    return route.resolve(dataclasses.replace(
        cfg, channels_last=pick(cfg.channels_last), amp=native if cfg.amp is None else cfg.amp,
        compile=pick(cfg.compile) and route.compiles, image_size=models.preprocessing(model, cfg.image_size).image_size,
        head=head))


def check_batch_size(cfg: TrainConfig, version: Version, trained: torch.nn.Module | None = None) -> None:
    """A batch fits the training set; with BatchNorm in what trains (`trained`, the route's trained part), every
    batch holds 2 images or more (one image has no batch statistics: BatchNorm raises, and a trailing batch of one
    is dropped)."""
    n_train = len(version.split_frame("train"))
    least = 2 if trained is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                             for m in trained.modules()) else 1
    if n_train < least:
        raise ConfigError(
            f"The training set of {version.name} holds {n_train} image(s); {cfg.model} has BatchNorm layers, which "
            f"need at least {least} images per batch. Rebuild the version with more training images "
            "(`python -m research split`), or choose another --dataset.")
    if cfg.batch_size < least:
        raise ConfigError(
            f"batch_size={cfg.batch_size}: {cfg.model} has BatchNorm layers, which need at least {least} images per "
            f"batch (one image has no batch statistics); use --batch-size {least} or more.")
    if cfg.batch_size > n_train:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training set of {version.name} ({n_train} images); "
            f"use --batch-size {min(n_train, max(least, n_train // 4))} or a larger dataset version."
        )


def optimizer_groups(cfg: TrainConfig, model: torch.nn.Module, step_module: torch.nn.Module,
                     layer_decay: bool = True) -> list[dict]:
    """Parameter groups with their lr factors: the head's head_lr_scale, the trunk's layer decay (where the route
    trains the trunk: `layer_decay`), and VGG16_v2's first-head-layer scale below 224 px."""
    trunk, head = models.trunk_and_head(model)
    scales: dict[int, float] = {}
    if layer_decay and cfg.layer_decay < 1.0:
        scales = layer_decay_scales(trunk, cfg.layer_decay)
    if hasattr(model, "lr_scales"):  # VGG16_v2's first head layer, on images or on stored features alike
        scales.update({id(p): f for p, f in model.lr_scales(cfg.image_size).items()})
    for p in head.parameters():
        scales[id(p)] = scales.get(id(p), 1.0) * cfg.head_lr_scale
    return param_groups(step_module.parameters(), cfg.lr, cfg.weight_decay, scales)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flat_params(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as MLflow params; nested keys flattened as `augment.mixup`; the keys of an input layer
    the run does not use (a teacher's) left out."""
    out: dict[str, Any] = {}
    unused = inputs.unused_keys(cfg)
    for key, value in configfile.to_dict(cfg).items():
        if key in unused:
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[PARAM_NAMES.get(key, key)] = value
    return out


def models_unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


# ------------------------------------------------------------------------------------ tracking

@contextlib.contextmanager
def tracked_run(cfg: TrainConfig, *, run_id: str | None = None, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[str]:
    """The MLflow run's life: FINISHED on success (local checkpoints then go), KILLED on Ctrl-C
    (resumable) or pruning (tag pruned=true, checkpoints go), FAILED on any other error."""
    active = mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else tracking.experiment_id(cfg.experiment),
        run_name=cfg.run_name, parent_run_id=parent_run_id,
        tags=None if run_id else {**tracking.run_tags(), **(tags or {})}, log_system_metrics=_has_psutil(),
    )
    run_id = active.info.run_id
    ckdir = checkpoints.checkpoint_dir(cfg.checkpoint_dir, run_id)
    try:
        yield run_id
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # the store may be unusable now; resume takes a RUNNING run too
            mlflow.end_run("KILLED")
        hint = (f"resume with `python -m research train --resume {run_id}`" if (ckdir / "last.pt").is_file()
                else "it stopped before its first epoch was checkpointed, so there is nothing to resume: run the "
                     "command again")
        console.print(f"[yellow]interrupted[/]: run {run_id} marked KILLED; {hint}")
        raise
    except TrialPruned:
        mlflow.set_tags({"pruned": "true", "optuna_state": "PRUNED"})
        mlflow.end_run("KILLED")
        shutil.rmtree(ckdir, ignore_errors=True)
        raise
    except BaseException:
        tracking.end_run_failed(run_id)  # never raises: the error that got here is the one to show
        raise
    mlflow.end_run("FINISHED")
    shutil.rmtree(ckdir, ignore_errors=True)  # the best weights live in the run's model now


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401  (MLflow's system metrics need it)
    except ImportError:
        return False
    return True


def log_run_inputs(parts: Parts, run_id: str) -> None:
    """Params (the resolved config, the preprocessing, the data's identity), config.yaml, datasets."""
    cfg, version = parts.cfg, parts.version
    ckdir = checkpoints.checkpoint_dir(cfg.checkpoint_dir, run_id)
    ckdir.mkdir(parents=True, exist_ok=True)
    configfile.save(cfg, ckdir / "config.yaml")
    prep = {f"preprocess.{k}": v for k, v in parts.prep.as_dict().items() if k != "image_size"}
    source = models.weights_source(parts.model)
    prep |= source.as_params() if source is not None else {}
    # dataset_version is the version's name even when cfg.dataset is a directory path
    mlflow.log_params(flat_params(cfg) | prep | parts.route.params()
                      | {"dataset_version": version.name, "dataset_digest": version.digest,
                         "num_classes": len(parts.data.classes)})
    if parts.route.tags():
        mlflow.set_tags(parts.route.tags())
    mlflow.log_artifact(str(ckdir / "config.yaml"))
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        runlog.log_input(mlflow_dataset(version, split), context)


# -------------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def closing_iter(iterable):
    """Iterate, and close the iterator on any exit: a loader's prefetch thread must stop before a
    Ctrl-C reaches the interpreter's exit (a torch op still running there aborts the process)."""
    it = iter(iterable)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


@torch.no_grad()
def predict_batches(model, batches, device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, targets and predictions over an evaluation iterable."""
    model.eval()
    logits, targets = [], []
    with closing_iter(batches) as it:
        for x, y in it:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            logits.append(out.float().cpu())
            targets.append(y.cpu())
    all_logits = torch.cat(logits) if logits else torch.empty(0)
    all_targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return all_logits.numpy(), all_targets.numpy(), all_logits.argmax(1).numpy()


def evaluate(model, batches, device, amp, num_classes) -> dict[str, Any]:
    logits, y_true, _ = predict_batches(model, batches, device, amp)
    return scores(torch.softmax(torch.from_numpy(logits), 1).double().numpy(), y_true, num_classes)


def scores(probs: np.ndarray, y_true: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Metrics of [N, C] class probabilities: accuracy, macro P/R/F1, per-class F1, loss (mean -log p of the true
    class), and per image y_true, y_pred (argmax), prob (the predicted class's probability) and probs (all)."""
    if len(y_true) == 0:
        raise ConfigError("An evaluation split is empty; rebuild the dataset version with `python -m research split`.")
    y_pred = probs.argmax(1)
    metrics = classification_metrics(y_true, y_pred, num_classes)
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean())
    metrics["y_true"], metrics["y_pred"], metrics["prob"], metrics["probs"] = y_true, y_pred, probs.max(1), probs
    return metrics


def print_start(parts: Parts, run_id: str, state: TrainState) -> None:
    cfg, prep = parts.cfg, parts.prep
    frozen = "frozen trunk, " if cfg.trunk_frozen_throughout else ""
    if cfg.trainable_stages:
        frozen = f"trunk frozen but its last {cfg.trainable_stages} stage(s), "
    start = f"epochs {state.epoch + 1}-{cfg.epochs}" if state.epoch else f"{cfg.epochs} epochs"
    extra = parts.route.describe()
    console.print(
        f"[bold]run[/] {run_id}: {cfg.model} ({cfg.head} head) on {parts.version.name}, "
        f"{len(parts.data.train_labels)} training images, {frozen}{prep.image_size} px {prep.interpolation}, "
        f"{parts.device}, {start}" + (f", {extra}" if extra else ""), soft_wrap=True,  # one line in a log file too
    )


# ---------------------------------------------------------------------------------- checkpoints

def checkpoint(parts: Parts, state: TrainState, run_id: str) -> dict[str, Any]:
    """Everything `resume` needs, config included, as tensors and plain containers; "kept" is the evaluated
    weights (the model's own, or the EMA's), which torch.save stores once when they are the same tensors."""
    return {
        "model": parts.trained.state_dict(), "kept": parts.kept_weights(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "state": dataclasses.asdict(state), "rng": checkpoints.rng_state(), "config": configfile.to_dict(parts.cfg),
        "run_id": run_id, "classes": list(parts.data.classes),
    }


def restore(parts: Parts, ck: dict[str, Any]) -> TrainState:
    parts.trained.load_state_dict(ck["model"])
    parts.optimizer.load_state_dict(ck["optimizer"])
    parts.scheduler.load_state_dict(ck["scheduler"])
    if parts.ema is not None and ck.get("ema") is not None:
        parts.ema.load_state_dict(ck["ema"])
    checkpoints.set_rng_state(ck["rng"])
    return TrainState(**ck["state"])
