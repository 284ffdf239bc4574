"""Each loss against numbers computed independently here (plain math on Python floats)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from research.config import LOSSES, TrainConfig
from research.errors import ConfigError
from research.losses import build_loss

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]]
TARGET = [0, 2, 1]
COUNTS = [100, 10, 1]


def logits_t() -> torch.Tensor:
    return torch.tensor(LOGITS, requires_grad=True)


def target_t() -> torch.Tensor:
    return torch.tensor(TARGET)


def torch_ce(**kwargs) -> float:
    return float(F.cross_entropy(torch.tensor(LOGITS), target_t(), **kwargs))


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def ref_loss(logits, target, weight=None, gamma=0.0, offset=None, smoothing=0.0) -> float:
    """-sum_c y_c w_c (1-p_c)^gamma log p_c averaged over rows, with y one-hot (+ smoothing)."""
    k = len(logits[0])
    weight = weight or [1.0] * k
    offset = offset or [0.0] * k
    total = []
    for row, t in zip(logits, target):
        p = softmax([z + o for z, o in zip(row, offset)])
        y = [(1.0 - smoothing) * (c == t) + smoothing / k for c in range(k)]
        total.append(-sum(y[c] * weight[c] * (1 - p[c]) ** gamma * math.log(p[c]) for c in range(k)))
    return mean(total)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def value(loss, logits=None, target=None) -> float:
    out = loss(logits if logits is not None else logits_t(), target if target is not None else target_t())
    return float(out.detach())


def test_cross_entropy_matches_hand_computation_and_torch():
    expected = mean(-math.log(softmax(row)[t]) for row, t in zip(LOGITS, TARGET))
    loss = build_loss(cfg(loss="ce"), COUNTS)
    assert value(loss) == pytest.approx(expected, rel=1e-6)
    assert value(loss) == pytest.approx(torch_ce(), rel=1e-6)


def test_cross_entropy_label_smoothing():
    loss = build_loss(cfg(loss="ce", label_smoothing=0.1), COUNTS)
    assert value(loss) == pytest.approx(ref_loss(LOGITS, TARGET, smoothing=0.1), rel=1e-6)
    assert value(loss) == pytest.approx(torch_ce(label_smoothing=0.1), rel=1e-6)


def test_focal_loss_by_hand():
    expected = mean(-((1 - softmax(r)[t]) ** 2) * math.log(softmax(r)[t]) for r, t in zip(LOGITS, TARGET))
    assert value(build_loss(cfg(loss="focal", focal_gamma=2.0), COUNTS)) == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    focal = value(build_loss(cfg(loss="focal", focal_gamma=0.0), COUNTS))
    assert focal == pytest.approx(torch_ce(), rel=1e-6)


def test_focal_alpha_is_inverse_frequency_with_mean_one():
    inv = [1 / n for n in COUNTS]
    alpha = [a / mean(inv) for a in inv]  # 100, 10, 1 -> proportional to 1, 10, 100
    expected = ref_loss(LOGITS, TARGET, weight=alpha, gamma=1.5)
    loss = build_loss(cfg(loss="focal", focal_gamma=1.5, focal_alpha=True), COUNTS)
    assert value(loss) == pytest.approx(expected, rel=1e-6)


def cb_weights(counts, beta):
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [w / sum(raw) * len(counts) for w in raw]


def test_class_balanced_focal_by_hand():
    w = cb_weights(COUNTS, 0.99)
    loss = build_loss(cfg(loss="cb_focal", cb_beta=0.99, focal_gamma=2.0), COUNTS)
    loss.set_epoch(0)
    assert value(loss) == pytest.approx(ref_loss(LOGITS, TARGET, weight=w, gamma=2.0), rel=1e-6)


def test_cb_focal_deferred_reweighting_switches_at_drw_epoch():
    loss = build_loss(cfg(loss="cb_focal", cb_beta=0.99, focal_gamma=2.0, drw_epoch=3), COUNTS)
    plain = ref_loss(LOGITS, TARGET, gamma=2.0)
    weighted = ref_loss(LOGITS, TARGET, weight=cb_weights(COUNTS, 0.99), gamma=2.0)
    assert value(loss) == pytest.approx(plain, rel=1e-6)  # before any set_epoch: not yet
    for epoch, expected in [(0, plain), (2, plain), (3, weighted), (7, weighted), (1, plain)]:
        loss.set_epoch(epoch)
        assert value(loss) == pytest.approx(expected, rel=1e-6), epoch


def test_balanced_softmax_adds_the_log_prior():
    prior = [math.log(n / sum(COUNTS)) for n in COUNTS]
    expected = ref_loss(LOGITS, TARGET, offset=prior)
    assert value(build_loss(cfg(loss="balanced_softmax"), COUNTS)) == pytest.approx(expected, rel=1e-6)
    # logit adjustment with tau = 1 is the same loss
    assert value(build_loss(cfg(loss="logit_adjust"), COUNTS)) == pytest.approx(expected, rel=1e-6)


def test_balanced_softmax_with_uniform_counts_is_cross_entropy():
    loss = build_loss(cfg(loss="balanced_softmax"), [7, 7, 7])
    assert value(loss) == pytest.approx(torch_ce(), rel=1e-6)


def ldam_ref(weight=None, max_margin=0.5, s=30.0) -> float:
    raw = [n**-0.25 for n in COUNTS]
    margins = [m * max_margin / max(raw) for m in raw]
    adjusted = [[s * (z - (margins[c] if c == t else 0.0)) for c, z in enumerate(row)]
                for row, t in zip(LOGITS, TARGET)]
    return ref_loss(adjusted, TARGET, weight=weight)


def test_ldam_margins_scale_and_drw():
    loss = build_loss(cfg(loss="ldam", ldam_max_margin=0.5, drw_epoch=2), COUNTS)
    loss.set_epoch(0)
    assert value(loss) == pytest.approx(ldam_ref(), rel=1e-5)
    loss.set_epoch(2)
    assert value(loss) == pytest.approx(ldam_ref(weight=cb_weights(COUNTS, 0.9999)), rel=1e-5)


def test_ldam_without_drw_never_reweights():
    loss = build_loss(cfg(loss="ldam", ldam_max_margin=0.3), COUNTS)
    loss.set_epoch(50)
    assert value(loss) == pytest.approx(ldam_ref(max_margin=0.3), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_takes_soft_targets(name):
    loss = build_loss(cfg(loss=name, drw_epoch=0), COUNTS)
    loss.set_epoch(1)
    one_hot = F.one_hot(target_t(), 3).float()
    assert value(loss, target=one_hot) == pytest.approx(value(loss), rel=1e-6)
    # a mixup-style target: the loss is linear in y for every loss but LDAM (margins move with y)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, dims=0)
    logits = logits_t()
    out = loss(logits, mixed)
    out.backward()
    assert out.ndim == 0 and torch.isfinite(out) and logits.grad is not None
    if name != "ldam":
        expected = 0.7 * value(loss) + 0.3 * value(loss, target=target_t().roll(1))
        assert float(out.detach()) == pytest.approx(expected, rel=1e-5)


def test_loss_in_float32_under_bf16_logits():
    loss = build_loss(cfg(loss="focal"), COUNTS)
    out = loss(logits_t().bfloat16(), target_t())
    assert out.dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ConfigError, match="ce, focal, cb_focal, balanced_softmax, logit_adjust, ldam"):
        build_loss(cfg(loss="softmax"), COUNTS)
    with pytest.raises(ValueError, match="class indices"):
        build_loss(cfg(loss="ce"), COUNTS)(logits_t(), torch.zeros(3, 4))


def test_class_without_training_images_gives_finite_losses():
    for name in LOSSES:
        loss = build_loss(cfg(loss=name, drw_epoch=0, label_smoothing=0.1), [5, 0, 3])
        loss.set_epoch(0)
        assert math.isfinite(value(loss)), name
