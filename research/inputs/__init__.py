"""The training input path: what the trainer reads each step, apart from the dataset stages in research/data.

A run's input is a route object (research/inputs/routes.py): it owns its batches, which module trains on them,
the per-epoch trunk freeze, the train mode, whether compile and layer decay apply, its loss, and its own config
checks. `cfg.loader` names the route (ROUTES); a layer joins any route when its config key is set (LAYERS):
- images (cached, folder): `decoded` decodes a dataset version once into a uint8 store per split; `loaders`
  serves batches over it (or over the image folders), with the batch augmentation on the GPU/CPU device;
- stored trunk activations (features): `features` runs the frozen prefix of the model once, stores its output
  (the pooled features, or the activations before the last trainable stages) with K augmented views per
  training image, and serves those;
- a teacher (`teacher: models:/NAME@ALIAS`, any route): `teacher` adds a registered model's logits on each
  training view beside the batch, stored once where the views are stored, and mixes distillation into the loss.

The submodules are imported when used, so importing one of them (or this package) stays light.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from research.config import TrainConfig
    from research.inputs.routes import Layer, Route
    from research.models import Preprocessing

# cfg.loader -> the route that serves it (module:class); research.config.LoaderName spells the same names
ROUTES: dict[str, str] = {
    "cached": "research.inputs.routes:Route",
    "folder": "research.inputs.routes:Route",
    "features": "research.inputs.features:FeatureRoute",
}
# layers that join any route, in the order they wrap it, each when its config key is set
LAYERS: tuple[str, ...] = (
    "research.inputs.teacher:TeacherLayer",
)


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def route(cfg: TrainConfig) -> Route:
    """The route `cfg` asks for (not built yet), its config checked: a key of a route or layer it does not take
    is refused by name, then the route and each layer check the rest."""
    from research.errors import ConfigError

    chosen = _load(ROUTES[cfg.loader])
    layers = [_load(ref) for ref in LAYERS]
    used = [chosen, *(layer for layer in layers if layer.applies(cfg))]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for kind in {_load(ref) for ref in ROUTES.values()} | set(layers):
        if kind in used:
            continue
        for key, rest in kind.KEYS.items():
            if getattr(cfg, key) != defaults[key]:
                raise ConfigError(f"{key}={getattr(cfg, key)} only applies to {kind.WHEN}{rest}")
    made: Route = chosen(cfg)
    made.check(cfg)
    for layer in used[1:]:
        made = layer(made, cfg)
        made.check(cfg)
    return made


def unused_keys(cfg: TrainConfig) -> set[str]:
    """The keys of the layers `cfg` does not use (the one that turns each on, and its KEYS): a run leaves them out
    of its params, so a run without a layer logs what runs logged before that layer existed."""
    layers: list[type[Layer]] = [_load(ref) for ref in LAYERS]
    return {key for layer in layers if not layer.applies(cfg) for key in (layer.KEY, *layer.KEYS)}


def build(version, model: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig, device: torch.device) -> Route:
    """The run's route with its train/val/test batches (`route.data`)."""
    return route(cfg).build(version, model, prep, cfg, device)
