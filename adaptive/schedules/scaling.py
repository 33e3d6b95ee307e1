"""Batch-size scaling rules for the learning rate, as plain functions an adaptive-batch
controller can apply (e.g. through :meth:`SampleClockedScheduler.set_lr_scale`).

- ``"none"``:   ``lr`` unchanged.
- ``"linear"``: ``lr · B / B0`` (Goyal et al. 2017, arXiv 1706.02677; SGD).
- ``"sqrt"``:   ``lr · sqrt(B / B0)`` (Malladi et al. 2022, arXiv 2205.10287; Adam-type).
- AdaScale (Johnson et al. 2020, arXiv 2007.05105): gain
  ``r = (σ² + μ²) / (σ²/S + μ²)`` with ``S = B / B0``, ``σ²`` the trace of the covariance of
  the base-batch (``B0``) gradient and ``μ²`` the squared norm of the true gradient; ``lr · r``,
  ``1 <= r <= S``.

Growing the batch already acts like decaying the lr (Smith et al. 2018, arXiv 1711.00489), and
the power scheduler's ``β · a`` term is linear in the batch: do not stack a rule on top of it.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch

Rule = Literal["none", "linear", "sqrt", "adascale"]
RULES: tuple[str, ...] = ("none", "linear", "sqrt", "adascale")


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive real number, got {value!r}")
    return float(value)


def lr_scale_factor(batch_size: float, base_batch_size: float, rule: str = "linear") -> float:
    """The factor on the lr when the batch goes from ``base_batch_size`` to ``batch_size``
    under ``rule`` ("none", "linear" or "sqrt"; AdaScale needs gradient statistics: use
    :func:`adascale_gain`)."""
    ratio = _positive("batch_size", batch_size) / _positive("base_batch_size", base_batch_size)
    if rule == "none":
        return 1.0
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "adascale":
        raise ValueError("rule='adascale' needs gradient statistics: use adascale_gain()")
    raise ValueError(f"rule={rule!r} is not a scaling rule; use one of {list(RULES)}")


def adascale_gain(
    variance: torch.Tensor | float, sq_norm: torch.Tensor | float, scale: float
) -> torch.Tensor | float:
    """AdaScale gain ``r = (σ² + μ²) / (σ²/S + μ²)``, clamped to ``[1, S]`` (arXiv 2007.05105).

    Args:
        variance: ``σ²``, trace of the base-batch gradient covariance (tensor or float).
        sq_norm: ``μ²``, squared norm of the expected gradient (tensor or float).
        scale: ``S = B / B0`` (>= 1).

    Tensors stay on their device (no host sync); a caller reads the gain every ``interval``
    steps. Both zero (no signal) gives ``r = 1``.
    """
    s = _positive("scale", scale)
    if s < 1.0:
        raise ValueError(f"scale must be >= 1 (B >= B0), got {scale}")
    if isinstance(variance, torch.Tensor) or isinstance(sq_norm, torch.Tensor):
        var = torch.as_tensor(variance).clamp_min(0)
        mu2 = torch.as_tensor(sq_norm).clamp_min(0)
        num = var + mu2
        den = var / s + mu2
        gain = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 1.0)
        return gain.clamp(1.0, s)
    var, mu2 = max(float(variance), 0.0), max(float(sq_norm), 0.0)
    den = var / s + mu2
    if den == 0.0:
        return 1.0
    return min(max((var + mu2) / den, 1.0), s)


def scale_lr(
    lr: float,
    batch_size: float,
    base_batch_size: float,
    rule: str = "linear",
    gain: float | None = None,
) -> float:
    """``lr`` rescaled for ``batch_size`` under ``rule``; ``rule="adascale"`` uses ``gain``
    (from :func:`adascale_gain`)."""
    lr = _positive("lr", lr)
    if rule == "adascale":
        if gain is None:
            raise ValueError("rule='adascale' needs gain= (see adascale_gain)")
        return lr * _positive("gain", gain)
    if gain is not None:
        raise ValueError(f"gain= is only used with rule='adascale', not rule={rule!r}")
    return lr * lr_scale_factor(batch_size, base_batch_size, rule)
