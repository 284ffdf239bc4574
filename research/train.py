"""Train one model on one dataset version; every epoch and every artifact goes to one MLflow run.

Order of writes per epoch, chosen so a kill at any point loses at most that epoch and never
logs a metric twice: train -> evaluate -> checkpoint (atomic) -> log the epoch's metrics in
one batch. On resume, epochs that are in the checkpoint but missing from MLflow (killed
between the two writes) are logged first, then training continues after the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from research import config as config_mod
from research import tracking
from research.config import ConfigError, TrainConfig

console = Console()

EPOCH_METRICS = (
    "train_loss", "val_loss", "val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro",
    "lr", "epoch_seconds", "total_seconds",
)
# MLflow param names for config fields (DESIGN.md): the config field `dataset` is `dataset_version`.
PARAM_NAMES = {"dataset": "dataset_version"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run is marked FAILED (a sweep records the trial as FAIL)."""


@dataclasses.dataclass
class TrainResult:
    run_id: str
    status: str  # FINISHED, KILLED (pruned / interrupted)
    best_epoch: int
    best_val_f1: float
    epochs_run: int
    test: dict[str, float]
    history: list[dict[str, float]]


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig keys (research/config.py)")
    flags = {
        "--model": str, "--dataset": str, "--batch-size": int, "--lr": float, "--lr-schedule": str,
        "--loss": str, "--sampler": str, "--epochs": int, "--image-size": int, "--seed": int,
        "--device": str, "--experiment": str, "--optimizer": str, "--loader": str, "--run-name": str,
    }
    for flag, tp in flags.items():
        parser.add_argument(flag, type=tp, default=None)
    parser.add_argument("--pretrained", action="store_true", default=None, help="ImageNet weights (needs them cached)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, e.g. --set augment.mixup=0.2 --set weight_decay=1e-4")
    parser.add_argument("--resume", metavar="RUN_ID_OR_CHECKPOINT",
                        help="continue a run from its last finished epoch (same MLflow run)")


def config_from_args(args) -> TrainConfig:
    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            overrides[field.name] = value
    overrides = config_mod.merge(overrides, config_mod.parse_overrides(args.overrides))
    return config_mod.load(TrainConfig, args.config, overrides)


def run(args) -> int:
    if args.resume:
        result = resume(args.resume)
    else:
        result = train(config_from_args(args))
    return 0 if result.status == "FINISHED" else 1


# ------------------------------------------------------------------------------------ helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is visible; use --device cpu or auto.")
    return torch.device(name)


def resolved_flags(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the CUDA-dependent defaults (channels_last, bf16 autocast, compile) for this device."""
    on_cuda = device.type == "cuda"
    pick = lambda value: on_cuda if value is None else value  # noqa: E731
    return dataclasses.replace(cfg, channels_last=pick(cfg.channels_last), amp=pick(cfg.amp), compile=pick(cfg.compile))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flat_params(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as MLflow params; nested keys flattened as `augment.mixup`."""
    out: dict[str, Any] = {}
    for key, value in config_mod.to_dict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[PARAM_NAMES.get(key, key)] = value
    return out


def atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_dir(cfg: TrainConfig, run_id: str) -> Path:
    return Path(cfg.checkpoint_dir) / run_id


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


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


def evaluate(model, batches, criterion, device, amp, num_classes) -> dict[str, Any]:
    from research.metrics import classification_metrics

    logits, y_true, y_pred = predict_batches(model, batches, device, amp)
    if len(y_true) == 0:
        raise ConfigError("An evaluation split is empty; rebuild the dataset version with `python -m research split`.")
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_true)))
    metrics = classification_metrics(y_true, y_pred, num_classes)
    metrics["loss"] = loss
    metrics["y_true"], metrics["y_pred"] = y_true, y_pred
    return metrics


def train_one_epoch(model, stream, epoch, criterion, optimizer, scheduler, device, amp, progress, grad_clip=0.0) -> float:
    model.train()
    total, count = 0.0, 0
    task = progress.add_task(f"epoch {epoch}", total=len(stream))
    with closing_iter(stream.epoch(epoch)) as batches:
        for x, y in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
            optimizer.step()
            scheduler.step_batch()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
            progress.advance(task)
    progress.remove_task(task)
    scheduler.step_epoch()
    if count == 0:
        raise ConfigError("The training split yielded no batch: batch_size is larger than the training set.")
    return total / count


def epoch_table(rows: list[dict[str, float]]) -> Table:
    """The seed's per-epoch box: losses, val accuracy and macro P/R/F1, lr, seconds (fits 80 columns)."""
    table = Table(show_edge=False, padding=(0, 1), title_justify="left")
    for col in ("epoch", "train\nloss", "val\nloss", "val\nacc", "val\nP", "val\nR", "val\nF1", "lr", "sec"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{r['val_accuracy']:.3f}",
            f"{r['val_precision_macro']:.3f}", f"{r['val_recall_macro']:.3f}", f"{r['val_f1_macro']:.3f}",
            f"{r['lr']:.1e}", f"{r['epoch_seconds']:.0f}",
        )
    return table


# ------------------------------------------------------------------------------------ training

def train(
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    _resume_from: dict[str, Any] | None = None,
    _run_id: str | None = None,
) -> TrainResult:
    """Train per `cfg`, log everything to MLflow, return the run's outcome.

    `on_start(run_id)` is called once the MLflow run exists (a sweep records it on the trial).
    `on_epoch(epoch, metrics)` is called after each logged epoch (an Optuna trial reports and
    may raise optuna.TrialPruned there); the run then ends KILLED with tag `pruned=true`.
    """
    import mlflow

    from research.data.loaders import build_loaders
    from research.data.versions import load_version, mlflow_dataset
    from research.losses import build_loss
    from research.models import build_model
    from research.schedules import build_optimizer, build_scheduler

    tracking.setup()
    tracking.check_reachable()  # before any cache or checkpoint is written
    device = resolve_device(cfg.device)
    cfg = resolved_flags(cfg, device)
    version = load_version(cfg.dataset, cfg.data_root)
    n_train = len(version.split_frame("train"))
    if cfg.batch_size > n_train:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training set of {version.name} ({n_train} images); "
            f"use --batch-size {max(1, n_train // 4)} or a larger dataset version."
        )
    seed_everything(cfg.seed)
    loaders = build_loaders(version, cfg, device)
    classes = loaders.classes
    counts = np.bincount(loaders.train_labels, minlength=len(classes)).tolist()
    model = build_model(cfg.model, len(classes), pretrained=cfg.pretrained, dropout=cfg.dropout).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_loss(cfg, counts)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=len(loaders.train))
    step_model = torch.compile(model) if cfg.compile else model

    state = {"epoch": 0, "best_val_f1": -1.0, "best_epoch": 0, "history": [], "stale": 0, "total_seconds": 0.0}
    if _resume_from is not None:
        model.load_state_dict(_resume_from["model"])
        optimizer.load_state_dict(_resume_from["optimizer"])
        scheduler.load_state_dict(_resume_from["scheduler"])
        state = _resume_from["state"]
        set_rng_state(_resume_from["rng"])

    experiment_id = tracking.experiment_id(cfg.experiment)
    run_tags = {**tracking.run_tags(str(device)), **(tags or {})}
    try:
        import psutil  # noqa: F401

        system_metrics = True
    except ImportError:
        system_metrics = False
    active = mlflow.start_run(
        run_id=_run_id, experiment_id=None if _run_id else experiment_id, run_name=cfg.run_name,
        parent_run_id=parent_run_id, tags=run_tags if _run_id is None else None, log_system_metrics=system_metrics,
    )
    run_id = active.info.run_id
    client = mlflow.MlflowClient()
    ckdir = checkpoint_dir(cfg, run_id)
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        if _run_id is None:
            config_mod.save(cfg, ckdir / "config.yaml")
            # dataset_version is the version's name even when cfg.dataset is a directory path
            mlflow.log_params(flat_params(cfg) | {"dataset_version": version.name, "dataset_digest": version.digest,
                                                  "num_classes": len(classes)})
            mlflow.log_artifact(str(ckdir / "config.yaml"))
            for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
                _log_input(mlflow_dataset(version, split), context)
        else:
            _log_missing_epochs(client, run_id, state["history"])

        if on_start is not None:
            on_start(run_id)
    except BaseException as exc:  # never leave the run active: this process's next start_run would refuse
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    console.print(
        f"[bold]run[/] {run_id}  model={cfg.model} data={version.name} ({n_train} train) "
        f"device={device} epochs={cfg.epochs} start={state['epoch'] + 1}"
    )
    status, pruned = "FINISHED", False
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as progress:
            for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
                t0 = time.perf_counter()
                if hasattr(criterion, "set_epoch"):
                    criterion.set_epoch(epoch)
                lr = scheduler.current_lr()
                train_loss = train_one_epoch(step_model, loaders.train, epoch, criterion, optimizer, scheduler,
                                             device, cfg.amp, progress, cfg.grad_clip)
                if not math.isfinite(train_loss):
                    raise TrainingDiverged(
                        f"epoch {epoch}: train loss is {train_loss} (lr={lr:.2e}, {cfg.optimizer}); the run diverged. "
                        "Lower --lr, add warm-up (--set warmup_epochs=1 with --lr-schedule cosine) or use a BN model."
                    )
                val = evaluate(step_model, loaders.val, criterion, device, cfg.amp, len(classes))
                seconds = time.perf_counter() - t0
                state["total_seconds"] += seconds
                row = {
                    "epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "val_precision_macro": val["precision_macro"], "val_recall_macro": val["recall_macro"],
                    "val_f1_macro": val["f1_macro"], "lr": lr, "epoch_seconds": seconds,
                    "total_seconds": state["total_seconds"],
                }
                state["history"].append(row)
                state["epoch"] = epoch
                if val["f1_macro"] > state["best_val_f1"]:
                    state["best_val_f1"], state["best_epoch"], state["stale"] = val["f1_macro"], epoch, 0
                    atomic_save(unwrap(model).state_dict(), ckdir / "best.pt")
                else:
                    state["stale"] += 1
                atomic_save({
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state, "rng": rng_state(),
                    "config": config_mod.to_dict(cfg), "run_id": run_id, "classes": classes,
                }, ckdir / "last.pt")
                with _hold_ctrl_c():
                    _log_epoch(client, run_id, row)
                console.print(epoch_table([row]))  # a box per epoch, as the seed printed
                if on_epoch is not None:
                    on_epoch(epoch, row)
                if cfg.early_stopping_patience and state["stale"] >= cfg.early_stopping_patience:
                    console.print(f"early stop: no better val macro F1 for {state['stale']} epochs")
                    mlflow.set_tag("early_stopped_epoch", str(epoch))
                    break
        test = _finish(cfg, model, loaders, criterion, device, classes, version, ckdir, state["best_epoch"])
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # the store may be unusable now; resume takes a RUNNING run too
            mlflow.end_run("KILLED")
        console.print(f"[yellow]interrupted[/]: run {run_id} marked KILLED; resume with "
                      f"`python -m research train --resume {run_id}`")
        raise
    except Exception as exc:
        if type(exc).__name__ == "TrialPruned":
            mlflow.set_tags({"pruned": "true", "optuna_state": "PRUNED"})
            mlflow.end_run("KILLED")
            shutil.rmtree(ckdir, ignore_errors=True)
            raise
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run(status)
    shutil.rmtree(ckdir, ignore_errors=True)  # the best checkpoint and the model live in the run now
    return TrainResult(run_id, status, state["best_epoch"], state["best_val_f1"], state["epoch"], test, state["history"])


@contextlib.contextmanager
def _hold_ctrl_c():
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


def _log_input(dataset, context: str, attempts: int = 4) -> None:
    """mlflow.log_input, retried: workers starting together race on MLflow's get-or-create of the same
    dataset row (sqlite/PostgreSQL UNIQUE constraint on experiment, name, digest); a retry finds the row."""
    import mlflow

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.Random().random() * 0.2)  # own RNG: the seeded one stays untouched


def _log_epoch(client, run_id: str, row: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(row[k]), now, int(row["epoch"])) for k in EPOCH_METRICS])


def _log_missing_epochs(client, run_id: str, history: list[dict[str, float]]) -> None:
    """Log checkpointed epochs that never reached MLflow (a kill between checkpoint and log)."""
    logged = {m.step for m in client.get_metric_history(run_id, "val_f1_macro")}
    for row in history:
        if int(row["epoch"]) not in logged:
            _log_epoch(client, run_id, row)


def _finish(cfg, model, loaders, criterion, device, classes, version, ckdir, best_epoch) -> dict[str, float]:
    """Best-val weights -> test metrics, reports, confusion matrices, checkpoint and MLflow model."""
    import mlflow

    from research.metrics import classification_report_frame, confusion_matrix_figure, confusion_matrix_frame

    best = torch.load(ckdir / "best.pt", map_location=device, weights_only=True)
    model = unwrap(model)
    model.load_state_dict(best)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for split, batches in (("val", loaders.val), ("test", loaders.test)):
            res = evaluate(model, batches, criterion, device, cfg.amp, len(classes))
            results[split] = res
            classification_report_frame(res["y_true"], res["y_pred"], classes).to_csv(
                tmp / f"classification_report_{split}.csv", index=False)
            confusion_matrix_frame(res["y_true"], res["y_pred"], classes).to_csv(tmp / f"confusion_matrix_{split}.csv")
            fig = confusion_matrix_figure(res["y_true"], res["y_pred"], classes, f"{split} ({version.name})")
            fig.savefig(tmp / f"confusion_matrix_{split}.png", dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
        (tmp / "confusion_matrix.png").write_bytes((tmp / "confusion_matrix_test.png").read_bytes())
        meta = model_meta(cfg, classes, version)
        (tmp / "model_meta.json").write_text(json.dumps(meta, indent=2))
        for f in sorted(tmp.iterdir()):
            mlflow.log_artifact(str(f))
        mlflow.log_artifact(str(ckdir / "best.pt"), artifact_path="checkpoint")
        test = results["test"]
        metrics = {f"test_{k}": float(test[k]) for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}
        for name, value in zip(classes, test["per_class_f1"]):
            metrics[f"test_f1_{_metric_safe(name)}"] = float(value)
        metrics["best_epoch"] = float(best_epoch)
        mlflow.log_metrics(metrics)
        log_torch_model(model, cfg, meta, tmp)
    return metrics


def _metric_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_./ " else "_" for c in name)


def model_meta(cfg: TrainConfig, classes: list[str], version) -> dict[str, Any]:
    """What a consumer of the model needs besides its weights: the preprocessing and class names."""
    return {
        "classes": list(classes), "image_size": cfg.image_size, "mean": list(MEAN), "std": list(STD),
        "resize": "RGB (alpha on white, EXIF transposed), resized to image_size x image_size, antialiased",
        "model": cfg.model, "dataset_version": version.name, "dataset_digest": version.digest,
        "channels_last": bool(cfg.channels_last),
    }


def pip_requirements() -> list[str]:
    from importlib.metadata import version as v

    reqs = [f"torch=={v('torch').split('+')[0]}", f"torchvision=={v('torchvision').split('+')[0]}",
            f"pillow=={v('pillow')}", f"pandas=={v('pandas')}", f"numpy=={v('numpy')}", f"mlflow=={v('mlflow')}"]
    try:
        reqs.append(f"timm=={v('timm')}")
    except Exception:
        pass
    return reqs


def log_torch_model(model: torch.nn.Module, cfg: TrainConfig, meta: dict[str, Any], tmp: Path) -> None:
    """The best-val module as an MLflow pytorch model `model` (pickle format: it can be fine-tuned)."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    example = np.zeros((1, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    meta_file = tmp / "model_meta.json"
    mlflow.pytorch.log_model(
        model, name="model", serialization_format="pickle", pip_requirements=pip_requirements(),
        signature=infer_signature(example, out), input_example=example, extra_files=[str(meta_file)],
        code_paths=[str(Path(__file__).resolve().parent)],
    )


# ------------------------------------------------------------------------------------- resume

def find_checkpoint(ref: str, checkpoint_root: str | None = None) -> tuple[Path, str]:
    """A run id or a checkpoint path -> (checkpoint dir, run id)."""
    path = Path(ref)
    if path.is_file():
        return path.parent, path.parent.name
    if path.is_dir():
        return path, path.name
    root = Path(checkpoint_root or TrainConfig().checkpoint_dir)
    if (root / ref).is_dir():
        return root / ref, ref
    raise ConfigError(
        f"No checkpoint for {ref!r} under {root}/. Pass the run id of a run that was interrupted "
        f"(its checkpoints live in {root}/<run_id>/) or a path to its last.pt."
    )


def resume(ref: str, checkpoint_root: str | None = None, **kwargs) -> TrainResult:
    """Continue an interrupted run in the same MLflow run from its last finished epoch."""
    ckdir, run_id = find_checkpoint(ref, checkpoint_root)
    cfg = config_mod.load(TrainConfig, ckdir / "config.yaml")
    last = ckdir / "last.pt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False) if last.is_file() else None
    tracking.setup()
    tracking.check_reachable()
    import mlflow

    status = mlflow.MlflowClient().get_run(run_id).info.status
    if status == "FINISHED":
        raise ConfigError(f"Run {run_id} already finished; nothing to resume.")
    return train(cfg, _resume_from=checkpoint, _run_id=run_id, **kwargs)
