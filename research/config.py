"""Dataclass configs: YAML file for defaults, `key=value` overrides on top, unknown keys are errors.

A config class is a plain dataclass; `load(cls, path, overrides)` builds it, checks every
key and type, and calls its `validate()` if it has one. `to_dict` gives what is saved with
every run (resolved, so a run can be re-created from it alone).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from research.errors import ConfigError  # re-exported: `config.ConfigError` is the usual spelling

T = TypeVar("T")



def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert where it is lossless (int -> float, str -> Path)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}.")
        return from_dict(tp, value, prefix=f"{where}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads "1e-3" as a string; accept it as the number it is
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; every key must be a field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"Unknown config key '{prefix}{key}'.{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["lr=1e-3", "augment.mixup=0.2"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not key=value (example: --set lr=1e-3).")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}.")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults from the dataclass, then the YAML file, then the overrides."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, merge(data, overrides or {}))


def save(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def replace(cfg: T, **changes: Any) -> T:
    """A copy of `cfg` with `changes` applied and validated like a file would be."""
    return from_dict(type(cfg), merge(to_dict(cfg), changes))


# ---------------------------------------------------------------------------------------
# The training config: one object, saved with every run and inside every checkpoint.
# The choices are typed here, once; each implementing module has one name -> builder table
# whose keys a test compares with these.

ModelName = Literal["vgg16", "vgg16_v2", "vgg16_bn_v2", "resnet18", "resnet50", "resnet101",
                    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]  # + "timm:<name>"
Head = Literal["auto", "linear", "v2"]
Loss = Literal["ce", "focal", "cb_focal", "balanced_softmax", "logit_adjust", "ldam"]
SamplerName = Literal["shuffle", "weighted", "sqrt"]
ScheduleName = Literal["constant", "step", "cosine", "onecycle"]  # + a per-epoch list "1e-3:10,1e-4:10,1e-5"
Optimizer = Literal["sgd", "adamw"]
LoaderName = Literal["cached", "folder", "features"]
Device = str  # auto, cpu, cuda, cuda:N, mps

MODELS = typing.get_args(ModelName)
HEADS = typing.get_args(Head)
LOSSES = typing.get_args(Loss)
SAMPLERS = typing.get_args(SamplerName)
SCHEDULES = typing.get_args(ScheduleName)
OPTIMIZERS = typing.get_args(Optimizer)
LOADERS = typing.get_args(LoaderName)


def _check_finite(obj: Any, prefix: str = "") -> None:
    """NaN and inf pass every `<` and `>` check, so refuse them first, by name."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}={value} is not a finite number; give a real value.")


@dataclasses.dataclass
class AugmentConfig:
    """Training-time augmentation, applied on batches on the training device."""

    crop_scale_min: float = 0.6  # RandomResizedCrop scale=(crop_scale_min, 1)
    hflip: float = 0.5  # probability
    rotation: float = 0.0  # degrees, +-
    color_jitter: float = 0.2  # brightness/contrast/saturation strength
    grayscale: float = 0.0  # probability
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off

    def validate(self) -> None:
        _check_finite(self, "augment.")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"augment.crop_scale_min={self.crop_scale_min} must be in (0, 1].")
        for key in ("hflip", "grayscale"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"augment.{key}={getattr(self, key)} is a probability: use 0..1.")
        for key in ("rotation", "color_jitter", "mixup", "cutmix"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key}={getattr(self, key)} must be >= 0 (0 turns it off).")


@dataclasses.dataclass
class TrainConfig:
    # what to train, on what
    model: str = "vgg16_v2"  # ModelName or "timm:<name>"
    pretrained: bool = False
    head: Head = "auto"  # auto: the model's own (v2 for vgg16_v2, linear otherwise); v2: the seed's deeper head
    dropout: float | None = None  # head dropout; None = the architecture's (0.5 in the VGGs, as the seed had)
    dataset: str = "v3"  # a version name under data/versions/, or a version directory
    data_root: str = "data/versions"
    image_size: int | None = None  # None: the model's own input size (its pretrained config)
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    optimizer: Optimizer = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"  # ScheduleName or a per-epoch list
    warmup_epochs: int = 0  # linear warm-up, for cosine
    grad_clip: float = 0.0  # max global gradient norm per step (torch clip_grad_norm_); 0 = off
    # lr multiplier for the classifier head (differential learning rates), e.g. 10 with a pretrained trunk.
    head_lr_scale: float = 1.0
    # timm's layer-wise lr decay: the trunk's layer i of L trains at lr * layer_decay ** (L - i); 1 = off
    layer_decay: float = 1.0
    # the trunk (and its batch-norm statistics) is frozen for the first freeze_epochs; >= epochs: always
    freeze_epochs: int = 0
    ema_decay: float = 0.0  # timm ModelEmaV3 of the weights, evaluated and kept instead of them; 0 = off
    step_size: int = 10  # for step
    step_gamma: float = 0.1  # for step
    # imbalance
    loss: Loss = "ce"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    focal_alpha: bool = False  # per-class alpha from inverse class frequency
    cb_beta: float = 0.999  # class-balanced loss: effective number of samples
    ldam_max_margin: float = 0.5
    drw_epoch: int | None = None  # deferred re-weighting (LDAM-DRW, CB): epoch from which class weights apply
    sampler: SamplerName = "shuffle"
    drs_epoch: int | None = None  # deferred re-sampling: epoch from which the sampler applies
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    # machinery
    # cached: decoded images on disk; folder: ImageFolder + per-image transforms; features: the frozen
    # trunk's embeddings on disk, only the head trains (the trunk is frozen throughout)
    loader: LoaderName = "cached"
    feature_views: int = 0  # features loader: augmented views embedded per training image, besides the plain one
    num_workers: int = 0  # DataLoader workers for the folder loader; 0 = main process
    device: Device = "auto"
    channels_last: bool | None = None  # None: on for CUDA
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    compile: bool | None = None  # torch.compile; None: on for CUDA
    seed: int = 0
    early_stopping_patience: int = 0  # epochs without a better val macro F1; 0 = off
    experiment: str = "train"
    run_name: str | None = None
    checkpoint_dir: str = "mlruns/checkpoints"

    @property
    def trunk_frozen_throughout(self) -> bool:
        return self.loader == "features" or self.freeze_epochs >= self.epochs

    def validate(self) -> None:
        from research.schedules import parse_epoch_list  # here, not at the top: schedules imports torch

        _check_finite(self)
        if self.model not in MODELS and not (self.model.startswith("timm:") and len(self.model) > 5):
            raise ConfigError(f"model={self.model!r} is not valid. Choose one of: {', '.join(MODELS)}, "
                              "or timm:<name>.")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r} is not valid. Choose auto, cpu, cuda, cuda:N or mps.")
        if self.lr_schedule not in SCHEDULES:
            parse_epoch_list(self.lr_schedule, SCHEDULES)  # raises a ConfigError with an example
        positive = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
                    "head_lr_scale": self.head_lr_scale, "layer_decay": self.layer_decay}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}={value} must be > 0.")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size} is too small; use 32 or more (or null: the model's own).")
        for key in ("weight_decay", "momentum", "label_smoothing", "warmup_epochs", "grad_clip",
                    "early_stopping_patience", "num_workers", "freeze_epochs", "feature_views", "seed", "ema_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0.")
        if self.layer_decay > 1.0:
            raise ConfigError(f"layer_decay={self.layer_decay} must be in (0, 1]; 1 turns it off, 0.7 is typical.")
        if self.ema_decay >= 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1); 0 turns it off, 0.999 is typical.")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} is a probability in [0, 1); null keeps the model's own.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1).")
        if not 0.0 < self.cb_beta < 1.0:
            raise ConfigError(f"cb_beta={self.cb_beta} must be in (0, 1), e.g. 0.999.")
        if self.loader == "features" and (self.augment.mixup > 0 or self.augment.cutmix > 0):
            raise ConfigError("loader=features trains the head on stored embeddings, where mixup/cutmix of images "
                              "cannot apply: set augment.mixup=0 and augment.cutmix=0, or use loader=cached.")
        if self.feature_views and self.loader != "features":
            raise ConfigError(f"feature_views={self.feature_views} only applies to loader=features; set it to 0.")
