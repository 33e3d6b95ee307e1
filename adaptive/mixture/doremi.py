"""DoReMi: domain weights by exponentiated gradient ascent on the excess loss.

Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023,
arXiv 2305.10429 (Algorithm 1). With per-domain proxy loss ``ℓ_i`` and reference loss ``r_i``:

    λ_i = max(ℓ_i − r_i, 0)                       (excess loss)
    α'  = softmax(log α + η·λ)                    (exponentiated gradient step)
    α   = (1 − c)·α' + c/k                        (smoothing toward uniform)

with ``η = 1`` and ``c = 10⁻³`` in the paper's runs. The paper's output is the time average
``ᾱ = (1/T) Σ_t α_t``. Here the current ``α`` is the sampling distribution during training (the
online use), and :attr:`DoReMi.average_weights` gives ``ᾱ`` for a later run.

The reference loss is either per-domain (a vector measured once, e.g. a reference model's loss
on held-out data of each domain) or supplied with every update (the reference model's loss on
the same batch, as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adaptive.mixture.signals import MixtureSignals, check_losses
from adaptive.mixture.weights import apply_floor, as_weights, check_floor

__all__ = ["DoReMi", "doremi_update", "excess_loss"]


def excess_loss(proxy_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """``λ_i = max(ℓ_proxy,i − ℓ_ref,i, 0)`` per domain."""
    return (proxy_losses - reference_losses).clamp_min(0.0)


def doremi_update(
    weights: Tensor, excess: Tensor, eta: float = 1.0, smoothing: float = 1e-3
) -> Tensor:
    """One DoReMi step: ``(1 − c)·softmax(log α + η·λ) + c/k``.

    Args:
        weights: current domain weights ``α`` (a probability vector, entries > 0).
        excess: per-domain excess loss ``λ`` (see :func:`excess_loss`).
        eta: step size ``η``.
        smoothing: ``c`` in [0, 1].
    """
    k = weights.numel()
    mixed = torch.softmax(torch.log(weights) + eta * excess, dim=0)
    return (1.0 - smoothing) * mixed + smoothing / k


class DoReMi:
    """Stateful DoReMi rule: feed per-domain losses, read the next sampling weights.

    Args:
        num_domains: ``k``.
        eta: step size ``η`` (paper: 1.0).
        smoothing: ``c`` (paper: 10⁻³).
        reference_losses: fixed per-domain reference loss, used when an update brings none.
        initial_weights: starting ``α`` (default uniform).
        floor: optional minimum weight applied to the returned sampling weights
            (:func:`~adaptive.mixture.weights.apply_floor`); the state ``α`` itself is not floored.

    A domain absent from the interval (count 0) gets ``λ_i = 0``, as in the paper's code. A NaN or
    infinite loss of a domain that was seen raises ``ValueError``.
    """

    def __init__(
        self,
        num_domains: int,
        eta: float = 1.0,
        smoothing: float = 1e-3,
        reference_losses: Sequence[float] | Tensor | None = None,
        initial_weights: Sequence[float] | Tensor | None = None,
        floor: float = 0.0,
    ) -> None:
        if not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        if not eta > 0:
            raise ValueError(f"eta must be positive, got {eta!r}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must lie in [0, 1], got {smoothing!r}")
        check_floor(floor, num_domains)
        self.num_domains = num_domains
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.floor = float(floor)
        self.reference_losses = (
            None
            if reference_losses is None
            else check_losses(torch.as_tensor(reference_losses), num_domains, "reference_losses")
        )
        k = num_domains
        self._alpha = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if initial_weights is None
            else as_weights(initial_weights, k, "initial_weights")
        )
        if bool((self._alpha <= 0).any()):
            raise ValueError(
                f"initial_weights must be positive for DoReMi, got {self._alpha.tolist()}"
            )
        self._sum = torch.zeros(k, dtype=torch.float64)
        self._updates = 0

    @property
    def weights(self) -> Tensor:
        """Sampling weights: the current ``α`` after the floor."""
        return apply_floor(self._alpha.clone(), self.floor)

    @property
    def average_weights(self) -> Tensor:
        """``ᾱ``, the mean of ``α`` over the updates so far (the paper's output)."""
        if self._updates == 0:
            return self._alpha.clone()
        return self._sum / self._updates

    def update(self, signals: MixtureSignals) -> Tensor:
        """Advance ``α`` from the interval's per-domain losses; return the new sampling weights."""
        seen = signals.counts > 0
        proxy = check_losses(signals.losses, self.num_domains, "losses", seen)
        ref = signals.reference_losses
        if ref is None:
            ref = self.reference_losses
        if ref is None:
            raise ValueError(
                "DoReMi needs reference losses: pass reference_losses= to DoReMi or per-sample "
                "reference losses with the signals"
            )
        ref = check_losses(ref, self.num_domains, "reference_losses", seen)
        excess = torch.where(seen, excess_loss(proxy, ref), torch.zeros_like(proxy))
        self._alpha = doremi_update(self._alpha, excess, self.eta, self.smoothing)
        self._sum += self._alpha
        self._updates += 1
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self._alpha.clone(),
            "sum": self._sum.clone(),
            "updates": self._updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._alpha = torch.as_tensor(state["alpha"], dtype=torch.float64).clone()
        self._sum = torch.as_tensor(state["sum"], dtype=torch.float64).clone()
        self._updates = int(state["updates"])
