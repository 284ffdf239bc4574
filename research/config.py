"""The training config: one dataclass (`TrainConfig`, with `AugmentConfig`), its typed choices and ranges.

Read with research/configfile.py (`configfile.load(TrainConfig, path, overrides)`): a YAML file for defaults,
`key=value` overrides on top, unknown keys are errors, and `TrainConfig.validate()` checks the values. The
resolved config is saved with every run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Literal

from research.errors import ConfigError

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


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number may take, written as an interval: "[0, 1)" (a bracket includes its end), inf for
    no end; `why` says where a limit comes from, or what the usual values are."""

    interval: str
    why: str = ""

    @property
    def ends(self) -> tuple[float, float]:
        low, high = self.interval[1:-1].split(",")
        return float(low), float(high)

    def contains(self, value: float) -> bool:
        (low, high), closed_low, closed_high = self.ends, self.interval[0] == "[", self.interval[-1] == "]"
        return (low <= value if closed_low else low < value) and (value <= high if closed_high else value < high)

    def describe(self) -> str:
        low, high = self.ends
        if high == math.inf:
            return f"{'>=' if self.interval[0] == '[' else '>'} {self.interval[1:-1].split(',')[0]}"
        return f"in {self.interval}"


def check_ranges(obj: Any, ranges: dict[str, Range], prefix: str = "") -> None:
    """Refuse the first field of `obj` outside its Range (None means unset and passes)."""
    _check_finite(obj, prefix)
    for key, allowed in ranges.items():
        value = getattr(obj, key)
        if value is not None and not allowed.contains(value):
            why = f"; {allowed.why}" if allowed.why else ""
            raise ConfigError(f"{prefix}{key}={value} must be {allowed.describe()}{why}.")


SEED_MAX = 2**32 - 1  # numpy's seed range: the trainer seeds numpy, torch and random with the one seed
WORKERS_MAX = 256  # DataLoader processes: far past any machine's cores, below a fork bomb


@functools.cache
def image_size_max() -> int:
    """The largest square side within the one pixel limit (research/data/image.py MAX_PIXELS): an image the
    decode rule would refuse to read is not one to train at. (Imported here, not at the top: PIL.)"""
    from research.data.image import MAX_PIXELS

    return math.isqrt(MAX_PIXELS)


@dataclasses.dataclass
class AugmentConfig:
    """Training-time augmentation, applied on batches on the training device."""

    crop_scale_min: float = 0.6  # RandomResizedCrop scale=(crop_scale_min, 1)
    hflip: float = 0.5  # probability
    rotation: float = 0.0  # degrees, +-
    color_jitter: float = 0.2  # brightness/contrast/saturation strength
    grayscale: float = 0.0  # probability
    # style: how a drawing is drawn, not what it shows (another artist's palette, pen and paper)
    hue: float = 0.0  # palette: hue rotated by up to +-hue x 180 degrees
    line_weight: float = 0.0  # probability of thicker (3x3 min filter) or thinner (3x3 max filter) dark lines
    background: float = 0.0  # probability of a random paper colour under the drawing's white background
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off

    def validate(self) -> None:
        check_ranges(self, AUGMENT_RANGES, "augment.")


AUGMENT_RANGES = {
    "crop_scale_min": Range("(0, 1]", "the smallest crop's share of the image"),
    "hflip": Range("[0, 1]", "a probability"),
    "rotation": Range("[0, 180]", "degrees either way; 0 turns it off"),
    "color_jitter": Range("[0, inf)", "0 turns it off"),
    "grayscale": Range("[0, 1]", "a probability"),
    "hue": Range("[0, 1]", "1 rotates the hue by up to 180 degrees either way; 0 turns it off"),
    "line_weight": Range("[0, 1]", "a probability"),
    "background": Range("[0, 1]", "a probability"),
    "mixup": Range("[0, inf)", "Beta(alpha, alpha); 0 turns it off"),
    "cutmix": Range("[0, inf)", "Beta(alpha, alpha); 0 turns it off"),
}


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
    # distillation (research/inputs/teacher.py): a registered model's tempered probabilities on the same augmented
    # view; loss = (1 - distill_weight) * label loss + distill_weight * T^2 * KL(teacher_T || student_T)
    teacher: str | None = None  # models:/NAME@ALIAS, models:/NAME/VERSION; null: no teacher
    distill_weight: float = 0.5
    distill_temperature: float = 2.0  # T
    # machinery
    # cached: decoded images on disk; folder: ImageFolder + per-image transforms; features: the frozen
    # trunk's embeddings on disk, only the head trains (the trunk is frozen throughout)
    loader: LoaderName = "cached"
    feature_views: int = 0  # features loader: augmented views embedded per training image, besides the plain one
    trainable_stages: int = 0  # features loader: the trunk's last k stages train too, on stored activations
    num_workers: int = 0  # DataLoader workers for the folder loader; 0 = main process
    device: Device = "auto"
    channels_last: bool | None = None  # None: on for CUDA
    amp: bool | None = None  # bf16 autocast; None: on where bf16 kernels are native (CUDA, AVX-512+ CPUs)
    compile: bool | None = None  # torch.compile; None: on for CUDA
    seed: int = 0
    early_stopping_patience: int = 0  # epochs without a better val macro F1; 0 = off
    experiment: str = "train"
    run_name: str | None = None
    checkpoint_dir: str = "mlruns/checkpoints"

    @property
    def trunk_frozen_throughout(self) -> bool:
        """In a resolved config (the route has set freeze_epochs): whether the trunk never trains."""
        return self.freeze_epochs >= self.epochs

    def validate(self) -> None:
        from research.schedules import parse_epoch_list  # here, not at the top: schedules imports torch

        if self.model not in MODELS and not (self.model.startswith("timm:") and len(self.model) > 5):
            raise ConfigError(f"model={self.model!r} is not valid. Choose one of: {', '.join(MODELS)}, "
                              "or timm:<name>.")
        check_device(self.device)
        if self.lr_schedule not in SCHEDULES:
            parse_epoch_list(self.lr_schedule, SCHEDULES)  # raises a ConfigError with an example
        check_ranges(self, train_ranges())
        # each input route checks the keys it reads itself (research.inputs.route(cfg), before a run starts)


@functools.cache
def train_ranges() -> dict[str, Range]:
    """The Range of every number in TrainConfig (a test holds every int and float field to having one)."""
    return {
        "dropout": Range("[0, 1)", "a probability; null keeps the model's own"),
        "image_size": Range(f"[16, {image_size_max()}]", "pixels a side; the upper end is the largest square within "
                            "research/data/image.py's MAX_PIXELS; null: the model's own"),
        "epochs": Range("(0, inf)"),
        "batch_size": Range("(0, inf)"),
        "lr": Range("(0, inf)"),
        "momentum": Range("[0, 1)", "SGD momentum or AdamW's beta1; 0.9 is typical"),
        "weight_decay": Range("[0, inf)"),
        "warmup_epochs": Range("[0, inf)"),
        "grad_clip": Range("[0, inf)", "0 turns it off"),
        "head_lr_scale": Range("(0, inf)"),
        "layer_decay": Range("(0, 1]", "1 turns it off, 0.7 is typical"),
        "freeze_epochs": Range("[0, inf)"),
        "ema_decay": Range("[0, 1)", "0 turns it off, 0.999 is typical"),
        "step_size": Range("[1, inf)", "epochs between two lr drops of the step schedule"),
        "step_gamma": Range("(0, 1]", "the step schedule multiplies the lr by it every step_size epochs"),
        "label_smoothing": Range("[0, 1)"),
        "focal_gamma": Range("[0, inf)", "0 is plain cross-entropy"),
        "cb_beta": Range("(0, 1)", "e.g. 0.999"),
        "ldam_max_margin": Range("(0, inf)", "e.g. 0.5"),
        "drw_epoch": Range("[0, inf)", "null: never"),
        "drs_epoch": Range("[0, inf)", "null: never"),
        "distill_weight": Range("[0, 1]", "the teacher's share of the loss; 1: the teacher alone"),
        "distill_temperature": Range("(0, inf)", "1: the teacher's own probabilities; 2-8 soften them"),
        "feature_views": Range("[0, inf)"),
        "trainable_stages": Range("[0, 16]", "the trunk's last stages trained on stored activations (lite0 has 7)"),
        "num_workers": Range(f"[0, {WORKERS_MAX}]", "DataLoader processes; 0 = the main process"),
        "seed": Range(f"[0, {SEED_MAX}]", "numpy's seed range (the trainer seeds numpy, torch and random)"),
        "early_stopping_patience": Range("[0, inf)", "0 turns it off"),
    }


def check_device(device: str) -> None:
    """A device name torch knows and this machine has (auto always: it picks cuda, mps or cpu)."""
    kind, _, index = device.partition(":")
    if device not in ("auto", "cpu", "cuda", "mps") and not (kind == "cuda" and index.isdigit()):
        raise ConfigError(f"device={device!r} is not valid. Choose auto, cpu, cuda, cuda:N or mps.")
    if kind not in ("cuda", "mps"):
        return
    import torch

    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' is not available on this machine (torch.backends.mps.is_available() is "
                          "False): use --device auto (cuda, mps or cpu, whichever it has) or --device cpu.")
    count = torch.cuda.device_count() if kind == "cuda" else 0
    if kind == "cuda" and count <= int(index or 0):
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(f"device={device!r}: this machine has {have} (torch.cuda.device_count() = {count}); use "
                          "--device auto (cuda, mps or cpu, whichever it has) or --device cpu.")
