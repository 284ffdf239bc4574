"""Optimizers and learning-rate schedules, built from a TrainConfig.

Schedules (cfg.lr_schedule): constant, step (per epoch), cosine with linear warm-up (per batch),
onecycle (per batch), or a per-epoch list like "1e-3:10,1e-4:10,1e-5" (the seed's "a different
lr per epoch"; the list's values replace cfg.lr, and the last value holds to the end).
torch.optim.lr_scheduler classes do the arithmetic; `Schedule` only says when they step, so the
trainer calls `step_batch()` after every optimizer step and `step_epoch()` after every epoch
whatever the schedule. On resume restore the optimizer's state_dict too: it holds the current lr.
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn
from torch.optim import lr_scheduler

from research.config import OPTIMIZERS, SCHEDULES, ConfigError, TrainConfig

EPOCH_LIST_EXAMPLE = "1e-3:10,1e-4:10,1e-5"


def _epoch_list_error(text: str, problem: str) -> ConfigError:
    close = difflib.get_close_matches(text.strip(), SCHEDULES, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"lr_schedule={text!r}: {problem}.{hint} Use one of {', '.join(SCHEDULES)}, or a per-epoch list "
        f"lr:epochs,... whose last entry may omit epochs (= the rest of training), e.g. '{EPOCH_LIST_EXAMPLE}'."
    )


def parse_epoch_list(text: str) -> list[tuple[float, int | None]]:
    """'1e-3:10,1e-4:10,1e-5' -> [(1e-3, 10), (1e-4, 10), (1e-5, None)]."""
    if not isinstance(text, str) or not text.strip():
        raise _epoch_list_error(str(text), "empty schedule")
    items = [item.strip() for item in text.split(",")]
    out: list[tuple[float, int | None]] = []
    for i, item in enumerate(items):
        last = i == len(items) - 1
        if not item:
            raise _epoch_list_error(text, f"entry {i + 1} is empty (a stray comma?)")
        lr_text, sep, epochs_text = item.partition(":")
        try:
            lr = float(lr_text)
        except ValueError:
            raise _epoch_list_error(text, f"{lr_text.strip()!r} in entry {i + 1} is not a learning rate") from None
        if not lr > 0:
            raise _epoch_list_error(text, f"learning rate {lr_text.strip()} in entry {i + 1} must be > 0")
        if not sep:
            if not last:
                raise _epoch_list_error(text, f"entry {i + 1} ({item!r}) needs ':epochs'; only the last may omit it")
            out.append((lr, None))
            continue
        try:
            epochs = int(epochs_text)
        except ValueError:
            raise _epoch_list_error(text, f"{epochs_text.strip()!r} in entry {i + 1} is not a whole number of epochs") from None
        if epochs <= 0:
            raise _epoch_list_error(text, f"entry {i + 1} has {epochs} epochs; use 1 or more")
        out.append((lr, epochs))
    return out


def epoch_list_lr(entries: list[tuple[float, int | None]], epoch: int) -> float:
    """The learning rate of 0-based `epoch` under a parsed per-epoch list."""
    start = 0
    for lr, epochs in entries:
        if epochs is None or epoch < start + epochs:
            return lr
        start += epochs
    return entries[-1][0]


# ---------------------------------------------------------------------------------------
# Optimizers


def param_groups(params: Iterable[nn.Parameter] | nn.Module, weight_decay: float, head_lr_scale: float = 1.0,
                 lr: float = 1.0, image_size: int | None = None) -> list[dict]:
    """Weights (decayed) and biases + norm scales (1-D tensors; not decayed), per lr scale.

    Decaying biases and batch-norm/layer-norm scales only pulls them to 0 without regularising
    anything (the nanoGPT/timm convention). Given a module, the classifier head
    (`research.models.head_parameters`) gets lr * head_lr_scale (differential learning rates), and a
    model with `lr_scales(image_size)` (VGGv2 below 224 px) scales the parameters it names on top.
    """
    scale: dict[int, float] = {}
    if isinstance(params, nn.Module):
        from research.models import head_parameters

        model = params
        if head_lr_scale != 1.0:
            scale = {id(p): head_lr_scale for p in head_parameters(model)}
        if image_size is not None and hasattr(model, "lr_scales"):
            for p, factor in model.lr_scales(image_size).items():
                scale[id(p)] = scale.get(id(p), 1.0) * factor
        params = model.parameters()
    params = [p for p in params if p.requires_grad]
    groups: dict[tuple[float, bool], dict] = {}
    for p in params:
        factor, decay = scale.get(id(p), 1.0), p.ndim > 1
        group = groups.setdefault((factor, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                    "lr": lr * factor})
        group["params"].append(p)
    # the base lr's groups first (the trainer logs group 0's lr), decayed before not decayed
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))]


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter] | nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (no Nesterov) or AdamW at cfg.lr (the head at cfg.lr * cfg.head_lr_scale);
    weight decay on weights only."""
    groups = param_groups(params, cfg.weight_decay, cfg.head_lr_scale, cfg.lr, cfg.image_size)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ConfigError(f"optimizer={cfg.optimizer!r} is not valid. Choose one of: {', '.join(OPTIMIZERS)}.")


# ---------------------------------------------------------------------------------------
# Schedules


class Schedule:
    """A torch lr scheduler plus when it steps: per 'batch' (at most `total_steps` times) or per 'epoch'."""

    def __init__(self, scheduler: lr_scheduler.LRScheduler, per: str, total_steps: int | None = None) -> None:
        self.scheduler = scheduler
        self.per = per
        self.total_steps = total_steps

    def step_batch(self) -> None:
        # Capped: OneCycleLR raises past its total, and cosine would climb back up.
        if self.per == "batch" and (self.total_steps is None or self.scheduler.last_epoch < self.total_steps):
            self.scheduler.step()

    def step_epoch(self) -> None:
        if self.per == "epoch":
            self.scheduler.step()

    def current_lr(self) -> float:
        return float(self.scheduler.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _cosine(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int, steps_per_epoch: int):
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"warmup_epochs={cfg.warmup_epochs} must be less than epochs={cfg.epochs}.")
    if warmup == 0:
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    # Linear from lr/warmup up to lr over the warm-up batches, then cosine to 0 by the last batch.
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup)
    decay = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    """cfg.lr_schedule -> Schedule. steps_per_epoch = optimizer steps per epoch (len(train loader))."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be > 0.")
    total = cfg.epochs * steps_per_epoch
    name = cfg.lr_schedule
    if name == "constant":
        return Schedule(lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0), "epoch")
    if name == "step":
        return Schedule(lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma), "epoch")
    if name == "cosine":
        return Schedule(_cosine(cfg, optimizer, total, steps_per_epoch), "batch", total)
    if name == "onecycle":
        # torch defaults: 30% warm-up from max_lr/25, momentum (or Adam beta1) cycled 0.95 -> 0.85 -> 0.95.
        max_lr = [group["lr"] for group in optimizer.param_groups]  # per group: the head may run at its own scale
        return Schedule(lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total), "batch", total)
    entries = parse_epoch_list(name)
    base = cfg.lr
    return Schedule(lr_scheduler.LambdaLR(optimizer, lambda epoch: epoch_list_lr(entries, epoch) / base), "epoch")
