"""Batch-size tests: how large a batch the current gradient noise asks for.

Each test is a plain function of one gradient-statistics result (the object returned by
``adaptive.stats.GradientStatistics.result()``, or anything with the same fields) and returns the
*proposed* batch size ``b̂`` as a 0-d tensor on the statistics' device. Nothing here reads a tensor
to the host: :func:`adaptive.batching.next_batch_size` does that, once per decision.

Notation: ``b`` samples with per-sample gradients ``g_i`` (of each sample's own loss), mean
``ḡ = (1/b) Σ g_i``. All variances are unbiased (divided by ``b − 1``).

- Norm test (Byrd, Chin, Nocedal, Wu 2012, Math. Prog. 134:127-155):
  accept ``b`` if ``V/b ≤ η²‖ḡ‖²`` with ``V = Σ_j Var_i(g_ij)``; propose ``b̂ = V / (η²‖ḡ‖²)``.
- Inner-product test (Bollapragada, Byrd, Nocedal 2018, SIAM J. Optim. 28(4)):
  ``b̂ = Var_i(⟨g_i, ḡ⟩) / (θ²‖ḡ‖⁴)``.
- Orthogonality test (same paper): ``b̂ = Σ_j Var_i(g_i − (⟨g_i,ḡ⟩/‖ḡ‖²) ḡ)_j / (ν²‖ḡ‖²)``.
- Augmented inner-product test: the larger of the two (Lau, Liu, Kolar 2024, arXiv 2402.11215).
- Coordinate-wise norm test for AdaGrad (Lau, Liu, Kolar 2024): see
  :func:`coordinate_norm_test` for the aggregation used here and why.

Zero mean gradient: when the denominator is 0 the test cannot be met by any finite batch if the
numerator is positive (``b̂ = +inf``, so the rule goes to the maximum batch size) and asks for
nothing if the numerator is 0 too (``b̂ = 0``: keep the batch). A slightly negative numerator
from floating-point cancellation is clamped to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "augmented_inner_product_test",
    "coordinate_norm_test",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
]


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _field(stats: Any, name: str) -> torch.Tensor:
    value = getattr(stats, name, None)
    if value is None:
        raise ValueError(
            f"the statistics result has no field {name!r}; pass the result of "
            "GradientStatistics(...).result() (per_coordinate=True for the coordinate-wise test)"
        )
    return torch.as_tensor(value)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with the zero-denominator convention of this module."""
    numerator = numerator.clamp_min(0)
    positive = denominator > 0
    safe = torch.where(positive, denominator, torch.ones_like(denominator))
    inf = torch.full_like(numerator, math.inf)
    fallback = torch.where(numerator > 0, inf, torch.zeros_like(numerator))
    return torch.where(positive, numerator / safe, fallback)


def norm_test(stats: Any, eta: float = 0.1) -> torch.Tensor:
    """Norm test (Byrd et al. 2012): ``b̂ = V / (η² ‖ḡ‖²)``.

    ``V = (Σ_i ‖g_i‖² − b‖ḡ‖²)/(b − 1)`` is the summed per-coordinate sample variance (the
    ``variance`` field) and ``‖ḡ‖²`` the squared norm of the mean gradient (``grad_sq_norm``).
    The batch passes when ``b ≥ b̂``. Smaller ``η`` asks for larger batches; the AdAdaGrad
    paper (arXiv 2402.11215) uses ``η = 0.1`` on MNIST and ``0.5`` on CIFAR-10. Since
    ``E‖ḡ‖² = |G|² + V/b``, the test asks, in expectation, for growth only while
    ``b < B_simple·(1 − η²)/η²`` with ``B_simple = V/|G|²`` (McCandlish et al. 2018's simple
    noise scale): ``η = 0.5`` aims at ``3·B_simple``, ``0.7`` at about ``B_simple``, and
    ``η ≥ 1`` grows the batch only on estimation noise.
    """
    eta = _check_positive("eta", eta)
    variance = _field(stats, "variance")
    grad_sq = _field(stats, "grad_sq_norm")
    return _ratio(variance, grad_sq * eta**2)


def inner_product_test(stats: Any, theta: float = 0.5) -> torch.Tensor:
    """Inner-product test (Bollapragada et al. 2018): ``b̂ = Var_i(⟨g_i,ḡ⟩) / (θ² ‖ḡ‖⁴)``.

    Uses ``inner_product_variance`` (the unbiased sample variance of the per-sample inner
    products with the batch mean gradient, all layers summed per sample before the variance) and
    ``grad_sq_norm``. The default ``θ = 0.5`` is the value of the AdAdaGrad authors' CIFAR-100
    example.
    """
    theta = _check_positive("theta", theta)
    ip_var = _field(stats, "inner_product_variance")
    grad_sq = _field(stats, "grad_sq_norm")
    return _ratio(ip_var, grad_sq.square() * theta**2)


def orthogonality_test(stats: Any, nu: float = 1.0) -> torch.Tensor:
    """Orthogonality test (Bollapragada et al. 2018).

    ``b̂ = Σ_j Var_i(g_i − (⟨g_i,ḡ⟩/‖ḡ‖²) ḡ)_j / (ν² ‖ḡ‖²)``: the noise orthogonal to the mean
    direction, relative to the mean's length. Uses ``orthogonality_variance`` and
    ``grad_sq_norm``; default ``ν = 1`` as in the AdAdaGrad authors' CIFAR-100 example.
    """
    nu = _check_positive("nu", nu)
    orth_var = _field(stats, "orthogonality_variance")
    grad_sq = _field(stats, "grad_sq_norm")
    return _ratio(orth_var, grad_sq * nu**2)


def augmented_inner_product_test(stats: Any, theta: float = 0.5, nu: float = 1.0) -> torch.Tensor:
    """Augmented inner-product test: ``max(inner_product_test, orthogonality_test)``.

    Both conditions of Bollapragada et al. (2018) must hold, so the proposal is the larger one
    (the ``ip+orth`` test of Lau, Liu, Kolar, arXiv 2402.11215).
    """
    return torch.maximum(inner_product_test(stats, theta), orthogonality_test(stats, nu))


def coordinate_norm_test(
    stats: Any,
    eta: float = 0.1,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Coordinate-wise norm test for AdaGrad, aggregated in AdaGrad's own geometry.

    Per coordinate ``j`` the test of Lau, Liu, Kolar (arXiv 2402.11215) asks
    ``Var_j / b ≤ η² ḡ_j²``, i.e. ``b ≥ b̂_j = Var_j / (η² ḡ_j²)`` with
    ``Var_j = (Σ_i g_ij² − b ḡ_j²)/(b − 1)``. Requiring it for *every* coordinate
    (``max_j b̂_j``) is unusable: a coordinate whose true gradient is 0 has ``ḡ_j² ≈ Var_j/b``
    times a χ²₁ draw, so the smallest of many such draws is near 0 and ``max_j b̂_j`` explodes to
    the maximum batch on noise alone.

    Aggregation used here (our reading; the paper's exact aggregation is not public): AdaGrad
    moves coordinate ``j`` by ``α ḡ_j / √v_j``. Weight each coordinate's requirement by its share
    of that step's squared length, ``w_j ∝ ḡ_j² / v_j``, and take the weighted mean of ``b̂_j``::

        b̂ = Σ_j w_j b̂_j = Σ_j Var_j / v_j  /  (η² Σ_j ḡ_j² / v_j)

    This is the norm test applied to the preconditioned gradient ``P ḡ``, ``P = diag(v)^{-1/2}``:
    ``E‖P(ḡ − ∇F)‖² ≤ η² ‖P ∇F‖²``. A coordinate with ``ḡ_j ≈ 0`` gets weight ≈ 0 exactly where
    its ``b̂_j`` blows up, so it adds only its (bounded) noise ``Var_j / v_j`` to the numerator.

    Args:
        stats: a statistics result with ``batch_size``, ``coordinate_sq_sums`` (name → ``Σ_i
            g_i²``) and ``mean_grads`` (name → ``ḡ``), i.e. ``per_coordinate=True``.
        eta: the tolerance ``η``.
        preconditioner: name → AdaGrad's accumulator ``v`` (e.g. ``torch.optim.Adagrad``'s
            ``state[p]["sum"]``). When ``None``, the batch's per-sample second moment
            ``v_j = (1/b) Σ_i g_ij²`` is used: a scale for each coordinate that does not depend on
            ``b``, is positive wherever the coordinate has any gradient, and bounds every
            numerator term by ``Var_j / v_j ≤ b/(b − 1)``.
        eps: AdaGrad's ε, added to ``√v_j``.

    Returns:
        the proposed batch size as a 0-d float tensor.
    """
    eta = _check_positive("eta", eta)
    eps = float(eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    sq_sums = getattr(stats, "coordinate_sq_sums", None)
    means = getattr(stats, "mean_grads", None)
    if not sq_sums or not means:
        raise ValueError(
            "coordinate_norm_test needs per-coordinate statistics: build "
            "GradientStatistics(model, per_coordinate=True) so the result has "
            "coordinate_sq_sums and mean_grads"
        )
    b = int(stats.batch_size)
    if b < 2:
        raise ValueError(f"the coordinate-wise test needs batch_size >= 2, got {b}")
    numerator = None
    denominator = None
    for name, sq_sum in sq_sums.items():
        if name not in means:
            raise ValueError(f"mean_grads has no entry for parameter {name!r}")
        mean = means[name].to(sq_sum.dtype)
        var = ((sq_sum - b * mean.square()) / (b - 1)).clamp_min(0)
        if preconditioner is None:
            v = sq_sum / b
        else:
            if name not in preconditioner:
                raise ValueError(f"preconditioner has no entry for parameter {name!r}")
            v = preconditioner[name].to(sq_sum.dtype)
        scale = (v.sqrt() + eps).square()
        # Coordinates with no gradient at all (v = 0, eps = 0) carry no weight and no noise.
        inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
        num = (var * inv).sum()
        den = (mean.square() * inv).sum()
        numerator = num if numerator is None else numerator + num
        denominator = den if denominator is None else denominator + den
    assert numerator is not None and denominator is not None
    return _ratio(numerator, denominator * eta**2)
