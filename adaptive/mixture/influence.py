"""Group influence (TiKMiX): weight each domain by how well its gradient serves the target.

Wang et al., "TiKMiX: Take Data Influence into Dynamic Mixture for Language Model Pre-training",
arXiv 2508.17677 (2025). The influence of up-weighting a group ``S`` of training samples on a
target (validation) loss ``f`` is ``I_f(S) = −∇f(θ)ᵀ H⁻¹ Σ_{z∈S} ∇ℓ(z, θ)``. With ``H ≈ I`` (the
paper does not say which approximation it uses) the benefit of domain ``j`` for target ``i`` is the
alignment

    S_ij = ⟨∇f_i(θ), ḡ_j⟩,   ḡ_j = mean gradient of domain j's samples,

positive when a step on domain ``j`` lowers target loss ``i``. (We use the mean rather than the
sum over the group so that a domain's score does not grow with how often it is currently drawn.)

TiKMiX-D turns the ``n × k`` matrix ``S`` into weights by

    minimise_w  α·std(P̂) − β·Σ_i P̂_i − γ·H(w)
    subject to  Σ_j w_j = 1,  w ≥ 0,  S·w ≥ S·w_prior   (no target worse off than the prior mix)

with ``P = S·w``, ``P̂_i = P_i / (max_j |S_ij| + 10⁻⁸)``, ``H(w) = −Σ w_j log w_j`` and
``α = β = γ = 1``, solved by SLSQP from the uniform vector. (The paper divides by ``max_j S_ij``;
the absolute value keeps the sign of ``P_i`` when every domain hurts target ``i``.)

The alternative :func:`exponentiated_influence_update` is a mirror-ascent step on the
target-weighted alignment, ``w ← softmax(log w + η·ŝ)`` with
``ŝ_j = Σ_i t_i S_ij / max_j |Σ_i t_i S_ij|``
(the form DoGE, arXiv 2310.15393, uses with its own scores): cheaper, smoother over time, but
without the Pareto constraint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn

from adaptive.mixture.signals import MixtureSignals
from adaptive.mixture.weights import apply_floor, as_weights, check_floor

__all__ = [
    "GroupInfluence",
    "alignment_from_statistics",
    "exponentiated_influence_update",
    "group_alignment",
    "tikmix_objective",
    "tikmix_weights",
]

_EPS = 1e-8
_METHODS = ("tikmix", "exponentiated")


def _as_matrix(alignment: Tensor | np.ndarray, k: int | None = None) -> np.ndarray:
    s = np.asarray(torch.as_tensor(alignment).detach().cpu().to(torch.float64))
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or (k is not None and s.shape[1] != k):
        raise ValueError(f"alignment must have shape (n_targets, {k}) or ({k},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"alignment must be finite (no NaN or inf), got {s.tolist()}")
    return s


def tikmix_objective(
    w: np.ndarray, s: np.ndarray, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0
) -> float:
    """``α·std(P̂) − β·ΣP̂ − γ·H(w)`` with ``P̂_i = (S·w)_i / (max_j |S_ij| + 10⁻⁸)``."""
    scale = np.abs(s).max(axis=1) + _EPS
    p_hat = (s @ w) / scale
    wc = np.clip(w, 1e-12, None)
    entropy = -float(np.sum(wc * np.log(wc)))
    return alpha * float(np.std(p_hat)) - beta * float(np.sum(p_hat)) - gamma * entropy


def _tikmix_gradient(
    w: np.ndarray, s: np.ndarray, alpha: float, beta: float, gamma: float
) -> np.ndarray:
    scale = np.abs(s).max(axis=1) + _EPS
    a = s / scale[:, None]  # P̂ = A·w
    p_hat = a @ w
    sd = float(np.std(p_hat))
    d_std = (p_hat - p_hat.mean()) / (len(p_hat) * sd) if sd > 0 else np.zeros_like(p_hat)
    wc = np.clip(w, 1e-12, None)
    return alpha * (a.T @ d_std) - beta * a.sum(axis=0) + gamma * (np.log(wc) + 1.0)


def tikmix_weights(
    alignment: Tensor | np.ndarray,
    prior: Sequence[float] | Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    pareto: bool = True,
) -> Tensor:
    """The TiKMiX-D mixture for an ``(n, k)`` (or ``(k,)``) alignment matrix, by SLSQP.

    Args:
        alignment: ``S``, row ``i`` the alignment of every domain with target ``i``.
        prior: ``w_prior`` of the Pareto constraint ``S·w ≥ S·w_prior`` (default uniform).
        alpha, beta, gamma: objective coefficients (paper: all 1).
        pareto: impose the Pareto constraint.

    Returns the weights as a float64 tensor summing to one. If SLSQP ends on a point that breaks a
    constraint by more than 10⁻⁶, the prior is returned with a ``RuntimeWarning``.
    """
    s = _as_matrix(alignment)
    k = s.shape[1]
    w_prior = np.full(k, 1.0 / k) if prior is None else as_weights(prior, k, "prior").numpy()
    floor_p = s @ w_prior
    constraints: list[dict[str, Any]] = [
        {"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones_like(w)}
    ]
    if pareto:
        constraints.append({"type": "ineq", "fun": lambda w: s @ w - floor_p, "jac": lambda w: s})
    res = minimize(
        tikmix_objective,
        np.full(k, 1.0 / k),
        args=(s, alpha, beta, gamma),
        jac=_tikmix_gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=constraints,
        options={"maxiter": 500, "ftol": 1e-12},
    )
    w = np.clip(res.x, 0.0, None)
    violation = abs(w.sum() - 1.0)
    if pareto:
        violation = max(violation, float(np.max(floor_p - s @ w, initial=0.0)))
    if violation > 1e-6:
        warnings.warn(
            f"TiKMiX-D SLSQP ended outside the constraints ({res.message}, violation "
            f"{violation:.2e}); keeping the prior mixture",
            RuntimeWarning,
            stacklevel=2,
        )
        w = w_prior
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)


def exponentiated_influence_update(
    weights: Tensor,
    alignment: Tensor | np.ndarray,
    eta: float = 1.0,
    target_weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """``w ← softmax(log w + η·ŝ)``, ``ŝ = score / max|score|``, ``score_j = Σ_i t_i S_ij``.

    ``target_weights`` ``t`` weighs the targets (default: equal weights ``1/n``).
    """
    s = _as_matrix(alignment, weights.numel())
    n = s.shape[0]
    t = np.full(n, 1.0 / n) if target_weights is None else as_weights(target_weights, n).numpy()
    score = torch.as_tensor(t @ s, dtype=torch.float64)
    score = score / (score.abs().max() + _EPS)
    return torch.softmax(torch.log(weights.to(torch.float64)) + eta * score, dim=0)


def alignment_from_statistics(group_grad_dots: Tensor, group_counts: Tensor) -> Tensor:
    """Mean per-sample alignment ``Σ_{i∈group} ⟨g_i, d⟩ / |group|`` (0 for an empty group).

    Takes the statistics sensor's ``group_grad_dots`` and ``group_counts`` (see
    ``adaptive.stats.GradientStatistics``).
    """
    counts = group_counts.to(torch.float64)
    dots = group_grad_dots.to(torch.float64)
    return torch.where(counts > 0, dots / counts.clamp_min(1.0), torch.zeros_like(dots))


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def group_alignment(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    domain_batches: Sequence[Any],
    target_batches: Sequence[Any],
    params: Iterable[nn.Parameter] | None = None,
) -> Tensor:
    """``S_ij = ⟨∇ f_i, ḡ_j⟩`` by one backward pass per domain and per target.

    Args:
        model: the model at its current parameters (left unchanged; ``.grad`` is not touched).
        loss_fn: ``loss_fn(model, batch)`` → the batch's **mean** loss (a scalar tensor).
        domain_batches: one batch per training domain (``ḡ_j`` is the gradient of its mean loss).
        target_batches: one batch per target (``∇f_i``).
        params: parameters to differentiate (default: all that require grad).

    Returns the ``(n_targets, k)`` float64 matrix on the CPU. Costs ``n + k`` backward passes; the
    statistics sensor computes the same ``⟨g_i, d⟩`` sums inside the ordinary backward pass.
    """
    ps = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not ps:
        raise ValueError("group_alignment: the model has no parameters that require grad")
    targets = torch.stack([_flat_grad(loss_fn(model, b), ps) for b in target_batches])
    domains = torch.stack([_flat_grad(loss_fn(model, b), ps) for b in domain_batches])
    return (targets @ domains.T).cpu()


class GroupInfluence:
    """Stateful group-influence rule: alignment matrix in, next sampling weights out.

    Args:
        num_domains: ``k``.
        method: ``"tikmix"`` (TiKMiX-D program, SLSQP, Pareto constraint against the current
            weights) or ``"exponentiated"`` (:func:`exponentiated_influence_update`).
        eta: step size of the exponentiated update.
        smoothing: ``β`` in [0, 1): ``w ← β·w_old + (1 − β)·w_new`` after each update.
        floor: minimum weight of the returned weights.
        target_weights: weights of the targets (rows of ``S``) in the exponentiated update.
        initial_weights: starting weights (default uniform).
        alpha, beta, gamma: TiKMiX-D objective coefficients.
    """

    def __init__(
        self,
        num_domains: int,
        method: str = "tikmix",
        eta: float = 1.0,
        smoothing: float = 0.0,
        floor: float = 0.0,
        target_weights: Sequence[float] | Tensor | None = None,
        initial_weights: Sequence[float] | Tensor | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
    ) -> None:
        if not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if not eta > 0:
            raise ValueError(f"eta must be positive, got {eta!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing!r}")
        check_floor(floor, num_domains)
        self.num_domains = num_domains
        self.method = method
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.floor = float(floor)
        self.target_weights = target_weights
        self.coefficients = (float(alpha), float(beta), float(gamma))
        k = num_domains
        self._w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if initial_weights is None
            else as_weights(initial_weights, k, "initial_weights")
        )
        self._updates = 0

    @property
    def weights(self) -> Tensor:
        return apply_floor(self._w.clone(), self.floor)

    def update(self, signals: MixtureSignals | Tensor) -> Tensor:
        """Take an alignment matrix (or signals carrying one); return the new sampling weights."""
        alignment = signals.alignment if isinstance(signals, MixtureSignals) else signals
        if alignment is None:
            raise ValueError("GroupInfluence needs an alignment matrix (signals.alignment is None)")
        s = _as_matrix(alignment, self.num_domains)
        if self.method == "tikmix":
            a, b, g = self.coefficients
            new = tikmix_weights(s, prior=self.weights, alpha=a, beta=b, gamma=g)
        else:
            new = exponentiated_influence_update(
                self._w.clamp_min(1e-12), s, self.eta, self.target_weights
            )
        self._w = self.smoothing * self._w + (1.0 - self.smoothing) * new
        self._w = self._w / self._w.sum()
        self._updates += 1
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._w.clone(), "updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._w = torch.as_tensor(state["weights"], dtype=torch.float64).clone()
        self._updates = int(state["updates"])
