"""Variance and noise-scale estimators from group means, for models the per-sample hooks cannot see.

When only the mean gradients ``ḡ_k`` of groups of samples are known (micro-batches of an
accumulation step, data-parallel ranks, or consecutive steps), the per-sample variance is still
estimable:

- Between-group estimator (law of total variance). With ``K`` groups of sizes ``m_k`` (``Σ m_k = b``)
  and i.i.d. samples of covariance ``Σ``, ``E[m_k‖ḡ_k‖²] = m_k‖G‖² + tr Σ`` and
  ``E[b‖ḡ‖²] = b‖G‖² + tr Σ``, so

      ``tr Σ ≈ (Σ_k m_k‖ḡ_k‖² − b‖ḡ‖²) / (K − 1)``

  is unbiased for any group sizes. With groups of size one it is the per-sample formula
  ``(Σ_i ‖g_i‖² − b‖ḡ‖²)/(b − 1)``. It needs ``K ≥ 2`` (NaN/inf otherwise).
- Two-batch estimator (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
  arXiv 1812.06162, appendix A): from a small batch ``B_s`` and a big batch ``B_b``,
  ``‖G‖² ≈ (B_b‖G_b‖² − B_s‖G_s‖²)/(B_b − B_s)`` and ``tr Σ ≈ (‖G_s‖² − ‖G_b‖²)/(1/B_s − 1/B_b)``;
  each is noisy, so both are smoothed by an exponential moving average before the ratio
  ``B_simple = tr Σ/‖G‖²`` is taken. :class:`TwoBatchNoiseScale` keeps those EMAs on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TwoBatchNoiseScale", "group_variance", "two_batch_estimates"]


def group_variance(weighted_group_sq: Tensor, grad_sq_norm: Tensor, b: Tensor, k: Tensor) -> Tensor:
    """``(Σ_k m_k‖ḡ_k‖² − b‖ḡ‖²)/(K − 1)``: unbiased ``tr Σ`` from ``K`` group means.

    Args:
        weighted_group_sq: ``Σ_k m_k‖ḡ_k‖²``.
        grad_sq_norm: ``‖ḡ‖²`` of the union of the groups.
        b: total number of samples ``Σ_k m_k``.
        k: number of groups ``K``.
    """
    return (weighted_group_sq - b * grad_sq_norm) / (k - 1)


def two_batch_estimates(
    small_sq_norm: Tensor, big_sq_norm: Tensor, small_batch: float, big_batch: float
) -> tuple[Tensor, Tensor]:
    """Unbiased ``(‖G‖², tr Σ)`` from squared gradient norms at two batch sizes (McCandlish 2018).

    Raises:
        ValueError: if the batch sizes are not ``0 < small_batch < big_batch`` (equal sizes carry
            no information about the noise and would divide by zero).
    """
    if not (0 < small_batch < big_batch):
        raise ValueError(
            f"two_batch_estimates needs 0 < small_batch < big_batch, got small_batch={small_batch}, "
            f"big_batch={big_batch}"
        )
    g2 = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return g2, trace


class TwoBatchNoiseScale:
    """EMA-smoothed simple noise scale ``B_simple = EMA(tr Σ)/EMA(‖G‖²)`` from two batch sizes.

    Each :meth:`update` takes the squared norm of a small-batch gradient (e.g. one rank's or one
    micro-batch's mean gradient) and of the big-batch gradient (the all-reduced or accumulated
    mean). The EMAs are bias-corrected like Adam's moments. Everything stays on the device; read
    :meth:`noise_scale` when a decision is due.

    Args:
        beta: EMA decay in ``[0, 1)``.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.steps = 0
        self.ema_sq_norm: Tensor | None = None
        self.ema_trace: Tensor | None = None

    def update(
        self, small_sq_norm: Tensor, big_sq_norm: Tensor, small_batch: float, big_batch: float
    ) -> None:
        g2, trace = two_batch_estimates(small_sq_norm, big_sq_norm, small_batch, big_batch)
        g2, trace = g2.detach().float(), trace.detach().float()
        if self.ema_sq_norm is None or self.ema_trace is None:
            self.ema_sq_norm = torch.zeros_like(g2)
            self.ema_trace = torch.zeros_like(trace)
        self.ema_sq_norm = self.beta * self.ema_sq_norm + (1 - self.beta) * g2
        self.ema_trace = self.beta * self.ema_trace + (1 - self.beta) * trace
        self.steps += 1

    def estimates(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected ``(EMA ‖G‖², EMA tr Σ)``."""
        if self.ema_sq_norm is None or self.ema_trace is None:
            raise RuntimeError("TwoBatchNoiseScale: no update yet")
        corr = 1.0 - self.beta**self.steps
        return self.ema_sq_norm / corr, self.ema_trace / corr

    def noise_scale(self) -> Tensor:
        g2, trace = self.estimates()
        return trace / g2

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "steps": self.steps,
            "ema_sq_norm": self.ema_sq_norm,
            "ema_trace": self.ema_trace,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.steps = int(state["steps"])
        self.ema_sq_norm = state["ema_sq_norm"]
        self.ema_trace = state["ema_trace"]
