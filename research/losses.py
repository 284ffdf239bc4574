"""Losses for imbalanced classification: cross-entropy, focal, and long-tail methods.

All losses here are one formula with different parts switched on:

    loss = mean_i  sum_c  w_c * y_ic * (1 - p_ic)^gamma * -log p_ic,   p_i = softmax(adjust(z_i, y_i))

- y: the target distribution. Class indices (LongTensor [B]) become one-hot; soft targets
  (FloatTensor [B, C], from mixup/cutmix) are used as given. Every loss accepts both.
  label_smoothing mixes y with the uniform distribution (as torch's CrossEntropyLoss does).
- w: per-class weights (focal alpha, class-balanced, DRW), normalised to mean 1. The batch
  average is a plain mean over samples (as in Cui et al.'s code), not torch's weighted mean.
- gamma: the focal term (0 = cross-entropy).
- adjust: logit adjustment (balanced softmax / logit adjustment add tau*log prior; LDAM
  subtracts a per-class margin on the target and scales by s).

Predictions always use the model's raw logits; the adjustments only shape training.
Every loss has `set_epoch(epoch)` (call it at the start of each epoch, with the trainer's epoch
number); class weights with `drw_epoch` apply from `epoch >= drw_epoch`.
Classes with zero training images count as 1 for priors and weights (no inf/NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from research.config import LOSSES, TrainConfig
from research.errors import ConfigError

LDAM_SCALE = 30.0  # s in Cao et al. 2019
LDAM_DRW_BETA = 0.9999  # the class-balanced beta LDAM-DRW uses for its deferred weights
LOGIT_ADJUST_TAU = 1.0  # Menon et al.'s tau; at 1 logit_adjust is the same loss as balanced_softmax


def soft_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B] class indices or [B, C] probabilities -> float [B, C] probabilities."""
    if target.dim() == 1 and not target.is_floating_point():
        return F.one_hot(target, num_classes).float()
    if target.dim() == 2 and target.shape[1] == num_classes:
        return target.float()
    raise ValueError(
        f"target of shape {tuple(target.shape)} and dtype {target.dtype}: expected class indices "
        f"(LongTensor [B]) or soft targets (FloatTensor [B, {num_classes}])."
    )


def _counts(class_counts: list[int]) -> torch.Tensor:
    return torch.tensor([max(int(n), 1) for n in class_counts], dtype=torch.float64)


def inverse_frequency_weights(class_counts: list[int]) -> torch.Tensor:
    """1/n_c normalised to mean 1 (focal alpha)."""
    w = 1.0 / _counts(class_counts)
    return (w / w.mean()).float()


def class_balanced_weights(class_counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: (1 - beta) / (1 - beta^n_c), normalised to sum num_classes."""
    n = _counts(class_counts)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(class_counts)).float()


def log_prior(class_counts: list[int]) -> torch.Tensor:
    n = _counts(class_counts)
    return torch.log(n / n.sum()).float()


def ldam_margins(class_counts: list[int], max_margin: float) -> torch.Tensor:
    """Cao et al. 2019: m_c proportional to n_c^(-1/4), scaled so the largest is max_margin."""
    m = _counts(class_counts) ** -0.25
    return (m * (max_margin / m.max())).float()


class SoftmaxLoss(nn.Module):
    """The formula in the module docstring; subclasses override `adjust`. Plain use = cross-entropy."""

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        class_weight: torch.Tensor | None = None,
        drw_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.drw_epoch = drw_epoch
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.weights_on = class_weight is not None and drw_epoch is None

    def set_epoch(self, epoch: int) -> None:
        """Deferred re-weighting: class weights apply from drw_epoch on (always, without one)."""
        if self.class_weight is not None:
            self.weights_on = self.drw_epoch is None or epoch >= self.drw_epoch

    def adjust(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = soft_targets(target, self.num_classes).to(logits.device)
        logits = logits.float()  # the loss in float32 under bf16 autocast
        log_p = F.log_softmax(self.adjust(logits, y), dim=1)
        if self.label_smoothing:
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        terms = -log_p * y
        if self.gamma:
            terms = terms * (1.0 - log_p.exp()).clamp(min=0.0).pow(self.gamma)
        if self.weights_on:
            terms = terms * self.class_weight.to(terms.device)
        return terms.sum(dim=1).mean()


class LogitAdjustedLoss(SoftmaxLoss):
    """Balanced softmax (Ren et al. 2020) = logit-adjusted loss (Menon et al. 2021) at tau=1.

    Train on logits + tau * log prior; the model's raw logits then estimate the balanced posterior.
    """

    def __init__(self, class_counts: list[int], tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(len(class_counts), label_smoothing)
        self.register_buffer("offset", tau * log_prior(class_counts), persistent=False)

    def adjust(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits + self.offset.to(logits.device)


class LDAMLoss(SoftmaxLoss):
    """LDAM (Cao et al. 2019): s * (z - m_y on the target class), with DRW class-balanced weights.

    Soft targets subtract each class's margin in proportion to its target mass (y_c * m_c),
    which reduces to the paper's rule for one-hot targets.
    """

    def __init__(
        self,
        class_counts: list[int],
        max_margin: float,
        drw_epoch: int | None,
        scale: float = LDAM_SCALE,
        label_smoothing: float = 0.0,
    ) -> None:
        # Without drw_epoch this is plain LDAM (no re-weighting), as in the paper's "LDAM" rows.
        weight = class_balanced_weights(class_counts, LDAM_DRW_BETA) if drw_epoch is not None else None
        super().__init__(len(class_counts), label_smoothing, class_weight=weight, drw_epoch=drw_epoch)
        self.scale = scale
        self.register_buffer("margins", ldam_margins(class_counts, max_margin), persistent=False)

    def adjust(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.scale * (logits - y * self.margins.to(logits.device))


def build_loss(cfg: TrainConfig, class_counts: list[int]) -> nn.Module:
    """cfg.loss -> a module `loss(logits, target) -> scalar` with `set_epoch(epoch)`.

    class_counts: training images per class, in class order (Version.class_counts("train")).
    """
    num_classes = len(class_counts)
    smoothing = cfg.label_smoothing
    if cfg.loss == "ce":
        return SoftmaxLoss(num_classes, smoothing)
    if cfg.loss == "focal":
        alpha = inverse_frequency_weights(class_counts) if cfg.focal_alpha else None
        return SoftmaxLoss(num_classes, smoothing, gamma=cfg.focal_gamma, class_weight=alpha)
    if cfg.loss == "cb_focal":
        weight = class_balanced_weights(class_counts, cfg.cb_beta)
        return SoftmaxLoss(num_classes, smoothing, gamma=cfg.focal_gamma, class_weight=weight, drw_epoch=cfg.drw_epoch)
    if cfg.loss in ("balanced_softmax", "logit_adjust"):
        tau = 1.0 if cfg.loss == "balanced_softmax" else LOGIT_ADJUST_TAU
        return LogitAdjustedLoss(class_counts, tau=tau, label_smoothing=smoothing)
    if cfg.loss == "ldam":
        return LDAMLoss(class_counts, cfg.ldam_max_margin, cfg.drw_epoch, label_smoothing=smoothing)
    raise ConfigError(f"loss={cfg.loss!r} is not valid. Choose one of: {', '.join(LOSSES)}.")


__all__ = [
    "build_loss",
    "SoftmaxLoss",
    "LogitAdjustedLoss",
    "LDAMLoss",
    "soft_targets",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "ldam_margins",
    "log_prior",
]
