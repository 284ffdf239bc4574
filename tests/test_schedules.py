"""The per-epoch list parser, the lr of every schedule at known points, optimizers, state round-trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from research.config import TrainConfig
from research.configfile import replace
from research.errors import ConfigError
from research.schedules import build_optimizer, build_scheduler, param_groups, parse_epoch_list
from research.train import optimizer_groups

STEPS = 4  # batches per epoch


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    return build_optimizer(cfg.optimizer, param_groups(params, cfg.lr, cfg.weight_decay), cfg.lr, cfg.momentum)


def scheduler(cfg: TrainConfig, opt):
    return build_scheduler(cfg.lr_schedule, opt, epochs=cfg.epochs, steps_per_epoch=STEPS, base_lr=cfg.lr,
                           warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size, step_gamma=cfg.step_gamma)


def lrs_per_batch(cfg: TrainConfig) -> list[list[float]]:
    """lr used by each batch of each epoch, driving the schedule exactly as the trainer does."""
    opt = optimizer(cfg, tiny_model().parameters())
    sched = scheduler(cfg, opt)
    epochs = []
    for _ in range(cfg.epochs):
        seen = []
        for _ in range(STEPS):
            seen.append(sched.current_lr())
            opt.step()
            sched.step_batch()
        epochs.append(seen)
        sched.step_epoch()
    return epochs


def test_parse_epoch_list():
    assert parse_epoch_list("1e-3:10,1e-4:10,1e-5") == [(1e-3, 10), (1e-4, 10), (1e-5, None)]
    assert parse_epoch_list(" 0.01 : 2 , 0.001:3 ") == [(0.01, 2), (0.001, 3)]
    assert parse_epoch_list("3e-4") == [(3e-4, None)]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("1e-3,1e-4:10", "entry 1 .* needs ':epochs'; only the last may omit it"),
        ("1e-3:10,,1e-5", "entry 2 is empty"),
        ("1e-3:ten,1e-4", "'ten' in entry 1 is not a whole number of epochs"),
        ("1e-3:2.5", "not a whole number"),
        ("fast:3", "'fast' in entry 1 is not a learning rate"),
        ("-1e-3:3,1e-4", "must be > 0"),
        ("1e-3:0,1e-4", "entry 1 has 0 epochs"),
        ("", "empty schedule"),
        ("cosin", "Did you mean 'cosine'"),
    ],
)
def test_parse_epoch_list_errors_say_what_and_show_an_example(text, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        parse_epoch_list(text)
    assert "1e-3:10,1e-4:10,1e-5" in str(err.value) and "constant" in str(err.value)


def test_config_validation_uses_the_parser():
    with pytest.raises(ConfigError, match="not a learning rate"):
        replace(TrainConfig(), lr_schedule="warm")
    assert replace(TrainConfig(), lr_schedule="1e-2:1,1e-3").lr_schedule == "1e-2:1,1e-3"


def test_constant_and_step():
    epochs = lrs_per_batch(TrainConfig(lr=0.1, epochs=3))
    assert all(lr == pytest.approx(0.1) for e in epochs for lr in e)
    step = lrs_per_batch(TrainConfig(lr=0.1, epochs=7, lr_schedule="step", step_size=3, step_gamma=0.5))
    assert [e[0] for e in step] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    assert all(len(set(e)) == 1 for e in step)  # constant within an epoch


def test_per_epoch_list_replaces_lr_and_holds_the_last_value():
    epochs = lrs_per_batch(TrainConfig(lr=0.5, epochs=6, lr_schedule="1e-2:2,1e-3:1,1e-4:1"))
    assert [e[0] for e in epochs] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4, 1e-4, 1e-4])
    open_ended = lrs_per_batch(TrainConfig(lr=1e-3, epochs=4, lr_schedule="1e-3:1,1e-5"))
    assert [e[-1] for e in open_ended] == pytest.approx([1e-3, 1e-5, 1e-5, 1e-5])


def test_cosine_with_warmup_per_batch():
    cfg = TrainConfig(lr=0.1, epochs=4, lr_schedule="cosine", warmup_epochs=1)
    flat = [lr for e in lrs_per_batch(cfg) for lr in e]
    warm = STEPS  # batches 0..3 ramp linearly from lr/4 to 3lr/4 + lr/16 ... reaching lr at batch 4
    assert flat[:warm] == pytest.approx([0.1 * (1 / warm + (1 - 1 / warm) * k / warm) for k in range(warm)])
    decay = cfg.epochs * STEPS - warm
    expected = [0.05 * (1 + math.cos(math.pi * k / decay)) for k in range(decay)]
    assert flat[warm:] == pytest.approx(expected, abs=1e-9)
    assert flat[warm] == pytest.approx(0.1) and flat[-1] < 0.01


def test_cosine_without_warmup_and_warmup_too_long():
    flat = [lr for e in lrs_per_batch(TrainConfig(lr=0.2, epochs=2, lr_schedule="cosine")) for lr in e]
    assert flat == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    with pytest.raises(ConfigError, match="warmup_epochs=2 must be less than epochs=2"):
        lrs_per_batch(TrainConfig(epochs=2, lr_schedule="cosine", warmup_epochs=2))


def test_onecycle_peaks_at_lr_and_survives_extra_batches():
    cfg = TrainConfig(lr=0.1, epochs=5, lr_schedule="onecycle")
    flat = [lr for e in lrs_per_batch(cfg) for lr in e]
    assert flat[0] == pytest.approx(0.1 / 25)  # torch default div_factor
    assert max(flat) == pytest.approx(0.1, rel=1e-3)
    assert flat.index(max(flat)) == round(0.3 * len(flat)) - 1  # pct_start = 0.3
    assert flat[-1] < 1e-4
    opt = optimizer(cfg, tiny_model().parameters())
    sched = scheduler(cfg, opt)
    for _ in range(cfg.epochs * STEPS + 5):  # a loader one batch longer than announced must not crash
        opt.step()
        sched.step_batch()


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle", "1e-2:2,1e-3"])
def test_state_dict_round_trip(schedule):
    cfg = TrainConfig(lr=0.05, epochs=5, lr_schedule=schedule, step_size=1, warmup_epochs=1)

    def fresh():
        opt = optimizer(cfg, tiny_model().parameters())
        return opt, scheduler(cfg, opt)

    def run(opt, sched, epochs):
        out = []
        for _ in range(epochs):
            for _ in range(STEPS):
                opt.step()
                sched.step_batch()
                out.append(sched.current_lr())
            sched.step_epoch()
        return out

    opt, sched = fresh()
    straight = run(opt, sched, 5)
    opt, sched = fresh()
    first = run(opt, sched, 2)
    saved = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt, sched = fresh()
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert first + run(opt, sched, 3) == pytest.approx(straight)


def test_optimizers_and_decay_groups():
    model = tiny_model()
    sgd = optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8, weight_decay=1e-3), model.parameters())
    assert isinstance(sgd, torch.optim.SGD)
    decay, no_decay = sgd.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert decay["momentum"] == 0.8 and decay["nesterov"] is False
    # conv + linear weights decay; conv/linear biases and the batch-norm scale and shift do not
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert len(no_decay["params"]) == 4
    adamw = optimizer(TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05), model.parameters())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="sgd, adamw"):
        build_optimizer("adam", param_groups(model.parameters(), 0.1, 0.0), 0.1)


def small_resnet():
    from research.models import build_model

    return build_model("resnet18", num_classes=2)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "1e-2:2,1e-3"])
def test_head_lr_scale_holds_through_every_schedule(schedule):
    model = small_resnet()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, head_lr_scale=0.05, lr_schedule=schedule, epochs=4, warmup_epochs=1,
                      step_size=1)
    opt = build_optimizer(cfg.optimizer, optimizer_groups(cfg, model, model), cfg.lr, cfg.momentum)
    head = {id(p) for p in model.head.parameters()}
    by_head = {all(id(p) in head for p in g["params"]) for g in opt.param_groups}
    assert by_head == {True, False} and len(opt.param_groups) == 4  # trunk and head, each decayed / not decayed
    sched = scheduler(cfg, opt)
    for _ in range(cfg.epochs):
        for _ in range(STEPS):
            for g in opt.param_groups:
                ratio = 0.05 if all(id(p) in head for p in g["params"]) else 1.0
                assert g["lr"] == pytest.approx(opt.param_groups[0]["lr"] * ratio)
            opt.step()
            sched.step_batch()
        sched.step_epoch()


def test_head_lr_scale_must_be_positive():
    with pytest.raises(ConfigError, match="head_lr_scale"):
        TrainConfig(head_lr_scale=0.0).validate()


def test_layer_decay_uses_timm_groups_and_stacks_with_the_head_scale():
    """timm's layer-wise decay: the stem trains slowest, the trunk's top layer at the base lr,
    the head at head_lr_scale."""
    from research.models import build_model

    model = build_model("efficientnet_lite0", num_classes=3)
    cfg = TrainConfig(model="efficientnet_lite0", lr=1e-3, layer_decay=0.7, head_lr_scale=10.0)
    opt = build_optimizer("adamw", optimizer_groups(cfg, model, model), cfg.lr)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    stem, top = model.trunk.conv_stem.weight, model.trunk.conv_head.weight
    blocks = [model.trunk.blocks[i][0].conv_dw.weight for i in range(len(model.trunk.blocks))]
    assert lr_of[id(top)] == pytest.approx(1e-3)
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-2)
    assert lr_of[id(stem)] < min(lr_of[id(b)] for b in blocks)
    assert [lr_of[id(b)] for b in blocks] == sorted(lr_of[id(b)] for b in blocks)  # deeper blocks train faster
    with pytest.raises(ConfigError, match="layer_decay"):
        TrainConfig(layer_decay=1.5).validate()
    resnet = small_resnet()
    with pytest.raises(ConfigError, match="timm trunk"):
        optimizer_groups(TrainConfig(model="resnet18", layer_decay=0.7), resnet, resnet)


@pytest.mark.parametrize(("size", "factor"), [(32, 1 / 49), (64, 4 / 49), (224, None)])
def test_vgg16_v2_first_head_layer_lr_follows_the_pool_copies(size, factor):
    """Below 224 px the 7x7 pool copies the trunk's map; the first head layer's lr is divided by the copy count."""
    from research.models import build_model

    with torch.device("meta"):  # only the parameter shapes matter here
        model = build_model("vgg16_v2", num_classes=3)
    cfg = TrainConfig(model="vgg16_v2", lr=0.1, image_size=size)
    opt = build_optimizer(cfg.optimizer, optimizer_groups(cfg, model, model), cfg.lr)
    first = model.classifier[0].weight
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.features[0].weight)] == pytest.approx(0.1)
    assert lr_of[id(model.classifier[3].weight)] == pytest.approx(0.1)
    assert lr_of[id(first)] == pytest.approx(0.1 * (factor or 1.0))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # group 0 (the logged lr) is the base lr


def test_base_lr_group_comes_first_when_the_head_runs_faster():
    """The trainer logs param_groups[0]'s lr: it must be the base lr, also with head_lr_scale > 1."""
    model = small_resnet()
    cfg = TrainConfig(lr=0.01, head_lr_scale=10.0)
    opt = build_optimizer(cfg.optimizer, optimizer_groups(cfg, model, model), cfg.lr)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01, 0.1, 0.1])
    assert [g["weight_decay"] > 0 for g in opt.param_groups] == [True, False, True, False]
