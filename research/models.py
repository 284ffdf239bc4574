"""Model names -> nn.Module: the seed's VGG16 and VGG16_v2, a batch-norm VGG16_v2, ResNets, any timm model.

`build_model(name, num_classes, pretrained)` is the only entry point. Pretrained weights are
read from the local caches only (torch hub for torchvision, the Hugging Face cache or torch hub
for timm); when they are absent we fail before any download is attempted, because these
machines have no internet and a hanging download is worse than a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.utils import skip_init
from torchvision.models.vgg import cfgs as _VGG_CFGS
from torchvision.models.vgg import make_layers as _vgg_layers

from research.config import MODELS, ConfigError

# The seed's VGG16_v2 head (DESIGN.md): 25088-4096-4096-1024-1024-512-num_classes.
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
    folded = (weight.reshape(-1, 49) @ pool).view(linear.out_features, c * h * w)  # one GEMM (an einsum measured 10-15x slower)
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
# Pretrained weights: local caches only.

_OFFLINE_HINT = "or drop --pretrained (pretrained=false) to train from scratch"


def _torchvision_weights(arch: str):
    """The DEFAULT ImageNet weights enum for a torchvision architecture, checked to be cached."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        raise ConfigError(
            f"ImageNet weights for {arch} are not in the local cache {path}; on a box with internet run "
            f"`python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"` once "
            f"(then copy {path.parent} here, or set TORCH_HOME), {_OFFLINE_HINT}."
        )
    return weights


def _load_torchvision(arch: str, pretrained: bool, **kwargs) -> nn.Module:
    build = getattr(torchvision.models, arch)
    if pretrained:
        return build(weights=_torchvision_weights(arch), progress=False)
    return build(weights=None, **kwargs)


def _timm_cached_file(name: str) -> str | None:
    """Path of timm's pretrained file for `name` in the Hugging Face or torch hub cache, or None."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=constants.HF_HUB_CACHE)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _build_timm(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    import timm

    if not timm.models.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:10]
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models()."
        raise ConfigError(f"model='timm:{name}': timm has no model '{name}'.{hint}")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not timm.models.is_model_pretrained(name):
        raise ConfigError(f"timm model '{name}' has no pretrained weights; {_OFFLINE_HINT}.")
    path = _timm_cached_file(name)
    if path is None:
        from huggingface_hub import constants

        raise ConfigError(
            f"ImageNet weights for timm:{name} are not in the local cache {constants.HF_HUB_CACHE} "
            f"(nor {Path(torch.hub.get_dir()) / 'checkpoints'}); on a box with internet run "
            f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` once, {_OFFLINE_HINT}."
        )
    # Loading from the cached file directly: timm would otherwise ask the hub first.
    return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": path},
                             **kwargs)


def _build_v2(num_classes: int, pretrained: bool, batch_norm: bool, dropout: float) -> nn.Module:
    weights = _torchvision_weights("vgg16_bn" if batch_norm else "vgg16") if pretrained else None
    model = VGGv2(num_classes, batch_norm=batch_norm, dropout=dropout)
    if weights is not None:  # ImageNet weights for the trunk only; the deeper head always starts fresh
        state = weights.get_state_dict(progress=False)
        trunk = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        model.features.load_state_dict(trunk)
    return model


def _replace_last(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the 1000-class ImageNet layer of a torchvision VGG/ResNet for a num_classes one."""
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head's parameters: timm's get_classifier(), torchvision's `fc` (ResNet) or `classifier` (VGG)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    elif isinstance(getattr(model, "fc", None), nn.Module):
        head = model.fc
    elif isinstance(getattr(model, "classifier", None), nn.Module):
        head = model.classifier
    else:
        raise ConfigError(f"{type(model).__name__} has no classifier head (fc / classifier) for head_lr_scale; use 1.0.")
    return list(head.parameters())


def build_model(name: str, num_classes: int, pretrained: bool = False, dropout: float | None = None) -> nn.Module:
    """A freshly initialised (or ImageNet-initialised, from the local cache) classifier.

    Names: research.config.MODELS, or `timm:<name>`. Unknown names raise ConfigError.
    `dropout`: the head's dropout probability (None: the architecture's own, 0.5 for the VGGs);
    the VGGs and timm models take it, torchvision's ResNets have no head dropout.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes.")
    if name.startswith("timm:"):
        if dropout is not None:
            return _build_timm(name.removeprefix("timm:"), num_classes, pretrained, drop_rate=dropout)
        return _build_timm(name.removeprefix("timm:"), num_classes, pretrained)
    if name in ("vgg16_v2", "vgg16_bn_v2"):
        return _build_v2(num_classes, pretrained, batch_norm=name == "vgg16_bn_v2",
                         dropout=V2_DROPOUT if dropout is None else dropout)
    if dropout is not None and name != "vgg16":
        raise ConfigError(f"dropout={dropout}: {name} has no head dropout; leave dropout unset (null) for it.")
    if name == "vgg16" and dropout is not None:
        model = build_model(name, num_classes, pretrained)
        for m in model.classifier:
            if isinstance(m, nn.Dropout):
                m.p = dropout
        return model
    if name in ("vgg16", "resnet18", "resnet50", "resnet101"):
        if pretrained:
            return _replace_last(_load_torchvision(name, True), num_classes)
        return _load_torchvision(name, False, num_classes=num_classes)
    raise ConfigError(f"model={name!r} is not valid. Choose one of: {', '.join(MODELS)}, or timm:<name>.")
