"""The training input route (research/inputs): one object per run that owns its batches, what trains on them and
its own config checks; `cfg.loader` names it, and a config key of a route the run does not take is refused."""

from __future__ import annotations

import pytest

from research import inputs
from research.config import LOADERS, TrainConfig
from research.errors import ConfigError
from research.inputs.features import FeatureRoute
from research.inputs.loaders import Batch
from research.inputs.routes import Route


def test_every_loader_name_has_a_route():
    assert set(inputs.ROUTES) == set(LOADERS)
    assert type(inputs.route(TrainConfig(loader="cached"))) is Route
    assert type(inputs.route(TrainConfig(loader="features"))) is FeatureRoute


@pytest.mark.parametrize("changes, needle", [
    ({"trainable_stages": 2}, "trainable_stages=2 only applies to loader=features"),
    ({"feature_views": 1}, "feature_views=1 only applies to loader=features; set it to 0."),
    ({"loader": "features", "augment": {"mixup": 0.2}}, "mixup/cutmix of images cannot apply"),
])
def test_a_route_refuses_what_it_cannot_train(changes, needle):
    from research import configfile

    cfg = configfile.from_dict(TrainConfig, changes)  # the config alone is valid; the route says no
    with pytest.raises(ConfigError, match=needle):
        inputs.route(cfg)


def test_what_a_route_decides_in_the_resolved_config():
    cfg = TrainConfig(epochs=4, freeze_epochs=9)
    assert inputs.route(cfg).resolve(cfg).freeze_epochs == 4
    stored = TrainConfig(loader="features", epochs=4)
    assert inputs.route(stored).resolve(stored).freeze_epochs == 4  # the trunk never trains
    partial = TrainConfig(loader="features", epochs=4, trainable_stages=2)
    assert inputs.route(partial).resolve(partial).freeze_epochs == 0  # its last stages train from epoch 1
    assert (Route.compiles, Route.layer_decay) == (True, True)
    assert (FeatureRoute.compiles, FeatureRoute.layer_decay) == (False, False)


def test_a_batch_is_still_the_pair_it_was_with_extras_beside():
    batch = Batch("x", "y", {"index": [3, 1]})
    x, y = batch
    assert (x, y) == (batch.x, batch.y) == ("x", "y") and len(batch) == 2 and batch.extras == {"index": [3, 1]}
