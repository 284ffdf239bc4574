"""A training input route: where a run's training batches come from, and what of the model trains on them.

`research.inputs.route(cfg)` gives the route that `cfg.loader` names, wrapped in every layer whose key the config
sets (research/inputs/__init__.py: ROUTES and LAYERS); `route.build(...)` makes its batches. The trainer asks the
route and never reads the config's route strings:

- `check(cfg)`: the route's own config checks, run when the route is made (before anything is written);
- `resolve(cfg)`: what the route decides in the resolved config (the trunk-freeze epochs);
- `step_module(model)`: the module the optimizer trains (the model, or its suffix on stored activations);
- `start_epoch(model, epoch)`: the epoch's trunk freeze; `train_mode(model, module)`: the train/eval modes;
- `loss(criterion, logits, batch)`: one batch's training loss (a teacher mixes in its own term);
- `params()` and `tags()`: what the run records about the route beyond its config (a teacher's lineage);
- `compiles`, `layer_decay`: whether torch.compile and the trunk's layer-wise lr decay apply.

Training batches are `loaders.Batch`es: the (x, y) pair they always were, with `extras` beside them that say how
each batch's view was made, so a layer can add what belongs to the same view.

A new route is one file with a Route subclass (its KEYS: the config keys only it reads) and one line in ROUTES;
a new layer (something that joins any route, like a teacher) a Layer subclass and one line in LAYERS.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from research import models

if TYPE_CHECKING:
    from research.config import TrainConfig
    from research.inputs.loaders import Batch, Loaders
    from research.models import Preprocessing


class Route:
    """The image route (loader cached or folder): the whole model trains on decoded images; its trunk is frozen,
    in eval mode, for the first `freeze_epochs`."""

    WHEN: ClassVar[str] = "loader=cached or folder"  # when the route applies, in the config's words
    # config keys only this route reads -> the rest of the message when another route is given one
    KEYS: ClassVar[dict[str, str]] = {}
    compiles: ClassVar[bool] = True  # torch.compile may wrap the model
    layer_decay: ClassVar[bool] = True  # the trunk's layer-wise lr decay applies
    stored_views: ClassVar[bool] = False  # training views are stored once (train batches carry `view`)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.data: Loaders | None = None

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a config this route cannot train (ConfigError naming the key and the fix)."""

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        return dataclasses.replace(cfg, freeze_epochs=min(cfg.freeze_epochs, cfg.epochs))

    def build(self, version, model: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig,
              device: torch.device) -> Route:
        """Make the train/val/test batches (self.data); returns the route."""
        from research.inputs.loaders import build_loaders

        self.cfg = cfg
        self.data = build_loaders(version, cfg, device, prep=prep)
        return self

    def trained_part(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the model that trains on this route's batches (no side effects: checks read it)."""
        return model

    def step_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def start_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        models.set_trunk_frozen(model, epoch <= self.cfg.freeze_epochs)

    def train_mode(self, model: torch.nn.Module, module: torch.nn.Module) -> None:
        models.train_mode(model)  # a frozen trunk stays in eval mode: its batch-norm statistics hold

    def loss(self, criterion: torch.nn.Module, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return criterion(logits, batch[1])

    def params(self) -> dict[str, Any]:
        return {}

    def tags(self) -> dict[str, str]:
        return {}

    def describe(self) -> str:
        """A few words for the run's start line ("" when there is nothing to add)."""
        return ""


class Layer(Route):
    """A route around another: what it does not say is the inner route's. It joins when its config key `KEY` is
    set (away from its default); its KEYS then apply too."""

    KEY: ClassVar[str]

    def __init__(self, inner: Route, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.inner = inner

    @classmethod
    def applies(cls, cfg: TrainConfig) -> bool:
        field = next(f for f in dataclasses.fields(cfg) if f.name == cls.KEY)
        return getattr(cfg, cls.KEY) != field.default

    @property
    def compiles(self) -> bool:  # type: ignore[override]
        return self.inner.compiles

    @property
    def layer_decay(self) -> bool:  # type: ignore[override]
        return self.inner.layer_decay

    @property
    def stored_views(self) -> bool:  # type: ignore[override]
        return self.inner.stored_views

    def check(self, cfg: TrainConfig) -> None:
        self.inner.check(cfg)

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        return self.inner.resolve(cfg)

    def build(self, version, model, prep, cfg, device) -> Route:
        self.cfg = cfg
        self.inner.build(version, model, prep, cfg, device)
        self.data = self.inner.data
        return self

    def trained_part(self, model):
        return self.inner.trained_part(model)

    def step_module(self, model):
        return self.inner.step_module(model)

    def start_epoch(self, model, epoch):
        self.inner.start_epoch(model, epoch)

    def train_mode(self, model, module):
        self.inner.train_mode(model, module)

    def loss(self, criterion, logits, batch):
        return self.inner.loss(criterion, logits, batch)

    def params(self):
        return self.inner.params()

    def tags(self):
        return self.inner.tags()

    def describe(self) -> str:
        return self.inner.describe()
