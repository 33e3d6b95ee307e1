"""Online Data Mixing (ODM): domain weights from the EXP3 adversarial bandit.

Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model Pre-Training",
arXiv 2312.02406 (2023); update rule as in the authors' ``Exp3WeightUpdater``. Each domain is an
arm; the reward of a domain drawn in the interval is its training loss (scaled by
``1/reward_scale``; the authors divide by 10), so domains the model still finds hard are drawn more:

    R̂_i ← R̂_i + r_i / π_i                 for every domain i drawn (importance weighting)
    ε_t  = min(1/K, √(ln K / (K·t)))        (exploration rate, t = number of updates)
    π_i  = (1 − K·ε_t)·exp(ε_{t−1}·R̂_i) / Σ_j exp(ε_{t−1}·R̂_j) + ε_t

with ``ε_0 = 1/K``. ``ε_t`` is also the smallest probability any domain gets (the bandit's own
floor); ``floor`` adds a further minimum if wanted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adaptive.mixture.signals import MixtureSignals, check_losses
from adaptive.mixture.weights import apply_floor, check_floor

__all__ = ["Exp3Mixture", "exp3_exploration", "exp3_probabilities"]


def exp3_exploration(num_domains: int, t: int) -> float:
    """``ε_t = min(1/K, √(ln K / (K·t)))``; ``ε_0 = 1/K``."""
    k = num_domains
    if t <= 0:
        return 1.0 / k
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def exp3_probabilities(cumulative_rewards: Tensor, eps_prev: float, eps_now: float) -> Tensor:
    """``π = (1 − K·ε_t)·softmax(ε_{t−1}·R̂) + ε_t``."""
    k = cumulative_rewards.numel()
    return (1.0 - k * eps_now) * torch.softmax(eps_prev * cumulative_rewards, dim=0) + eps_now


class Exp3Mixture:
    """Stateful EXP3 rule (ODM). Feed per-domain losses; read the next sampling weights.

    Args:
        num_domains: ``K``.
        reward_scale: rewards are ``loss / reward_scale`` (ODM: 10).
        floor: optional extra minimum weight on the returned weights.

    A domain is "drawn" in an interval when its count is positive; only drawn domains get a
    reward. With a whole batch per step several domains are drawn at once, each importance-weighted
    by its own ``1/π_i`` as in the authors' code. A NaN or infinite loss of a drawn domain raises
    ``ValueError``.
    """

    def __init__(self, num_domains: int, reward_scale: float = 10.0, floor: float = 0.0) -> None:
        if not isinstance(num_domains, int) or num_domains < 2:
            raise ValueError(f"num_domains must be an integer >= 2, got {num_domains!r}")
        if not reward_scale > 0:
            raise ValueError(f"reward_scale must be positive, got {reward_scale!r}")
        check_floor(floor, num_domains)
        self.num_domains = num_domains
        self.reward_scale = float(reward_scale)
        self.floor = float(floor)
        self._rewards = torch.zeros(num_domains, dtype=torch.float64)
        self._probs = torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float64)
        self._t = 0

    @property
    def weights(self) -> Tensor:
        return apply_floor(self._probs.clone(), self.floor)

    @property
    def cumulative_rewards(self) -> Tensor:
        return self._rewards.clone()

    def update(self, signals: MixtureSignals) -> Tensor:
        drawn = signals.counts.to("cpu") > 0
        losses = check_losses(signals.losses, self.num_domains, "losses", drawn)
        rewards = torch.where(drawn, losses / self.reward_scale, torch.zeros_like(losses))
        self._rewards = self._rewards + rewards / self._probs
        eps_prev = exp3_exploration(self.num_domains, self._t)
        self._t += 1
        eps_now = exp3_exploration(self.num_domains, self._t)
        self._probs = exp3_probabilities(self._rewards, eps_prev, eps_now)
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": self._rewards.clone(), "probs": self._probs.clone(), "t": self._t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rewards = torch.as_tensor(state["rewards"], dtype=torch.float64).clone()
        self._probs = torch.as_tensor(state["probs"], dtype=torch.float64).clone()
        self._t = int(state["t"])
