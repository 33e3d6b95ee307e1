"""Batch-size tests against formulas written out on torch.func per-sample gradients."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from adaptive.batching import (
    augmented_inner_product_test,
    coordinate_norm_test,
    inner_product_test,
    norm_test,
    orthogonality_test,
)


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _stats_from(grads: dict) -> SimpleNamespace:
    """Every statistic the tests read, from the full per-sample gradient matrix (b, P)."""
    names = list(grads)
    b = next(iter(grads.values())).shape[0]
    G = torch.cat([grads[n].reshape(b, -1) for n in names], dim=1).double()
    gbar = G.mean(0)
    ip = G @ gbar
    proj = G - (ip / gbar.dot(gbar)).unsqueeze(1) * gbar
    return SimpleNamespace(
        batch_size=b,
        per_sample_sq_norms=G.square().sum(1),
        sum_sq_norms=G.square().sum(),
        grad_sq_norm=gbar.dot(gbar),
        variance=G.var(0, correction=1).sum(),
        inner_product_variance=ip.var(correction=1),
        orthogonality_variance=proj.var(0, correction=1).sum(),
        coordinate_sq_sums={n: grads[n].double().square().sum(0) for n in names},
        mean_grads={n: grads[n].double().mean(0) for n in names},
        _G=G,
    )


@pytest.fixture(scope="module")
def stats() -> SimpleNamespace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(24, 6)
    y = torch.randint(0, 3, (24,))
    return _stats_from(_per_sample_grads(model, x, y))


def test_norm_test_matches_byrd_formula(stats):
    G, b = stats._G, stats.batch_size
    gbar = G.mean(0)
    # V = (Σ‖g_i‖² − b‖ḡ‖²)/(b−1), b̂ = V/(η²‖ḡ‖²)
    v = (G.square().sum() - b * gbar.square().sum()) / (b - 1)
    expected = v / (0.1**2 * gbar.square().sum())
    assert norm_test(stats, eta=0.1).item() == pytest.approx(expected.item(), rel=1e-9)
    # b passes exactly when b >= b̂ (Var/b ≤ η²‖ḡ‖²)
    b_hat = norm_test(stats, eta=0.3).item()
    assert (v / b <= 0.3**2 * gbar.square().sum()).item() == (b >= b_hat)


@pytest.mark.parametrize("eta", [0.5, 0.7, 0.85, 1.0, 2.0])
def test_norm_test_grows_only_below_the_noise_scale_bound(eta):
    """E‖ḡ‖² = |G|² + V/b, so the test asks for more than b (in expectation) only while
    b < B_simple·(1 − η²)/η², B_simple = V/|G|²: checked on Gaussian per-sample gradients, in
    enough dimensions that one batch's estimates sit near their expectations, at noise scales
    30% either side of the bound."""
    g = torch.Generator().manual_seed(0)
    b, d, sigma = 16, 20_000, 1.0
    bound = (1 - eta**2) / eta**2  # growth iff b < B_simple · bound
    for factor, grows in ((1.3, True), (1 / 1.3, False)):
        if bound <= 0 and grows:
            continue  # eta >= 1: no noise scale makes the test grow in expectation
        noise_scale = b / bound * factor if bound > 0 else 10.0 * b  # B_simple = V / |G|²
        v = d * sigma**2
        mean = torch.zeros(d, dtype=torch.float64)
        mean[0] = math.sqrt(v / noise_scale)  # |G|² = V / B_simple
        per_sample = mean + sigma * torch.randn(b, d, generator=g, dtype=torch.float64)
        gbar = per_sample.mean(0)
        stats = SimpleNamespace(
            variance=per_sample.var(0, unbiased=True).sum(),
            grad_sq_norm=gbar.square().sum(),
        )
        assert (float(norm_test(stats, eta=eta)) > b) is grows, (eta, factor)


def test_inner_product_and_orthogonality_formulas(stats):
    G = stats._G
    gbar = G.mean(0)
    n2 = gbar.dot(gbar)
    ips = torch.stack([G[i].dot(gbar) for i in range(G.shape[0])])
    ip_var = ((ips - ips.mean()) ** 2).sum() / (G.shape[0] - 1)
    assert inner_product_test(stats, theta=0.7).item() == pytest.approx(
        (ip_var / (0.7**2 * n2**2)).item(), rel=1e-9
    )
    orth = torch.stack([G[i] - G[i].dot(gbar) / n2 * gbar for i in range(G.shape[0])])
    orth_var = ((orth - orth.mean(0)) ** 2).sum() / (G.shape[0] - 1)
    assert orthogonality_test(stats, nu=2.0).item() == pytest.approx(
        (orth_var / (4.0 * n2)).item(), rel=1e-9
    )
    both = augmented_inner_product_test(stats, theta=0.7, nu=2.0).item()
    assert both == pytest.approx(
        max(inner_product_test(stats, 0.7).item(), orthogonality_test(stats, 2.0).item())
    )


def test_coordinate_test_formula_with_and_without_preconditioner(stats):
    G, eta = stats._G, 0.2
    gbar = G.mean(0)
    var = G.var(0, correction=1)
    m = G.square().mean(0)  # default v_j: per-sample second moment
    w = torch.where(m > 0, 1 / m, torch.zeros_like(m))
    expected = (var * w).sum() / (eta**2 * (gbar.square() * w).sum())
    got = coordinate_norm_test(stats, eta=eta, eps=0.0).item()
    assert got == pytest.approx(expected.item(), rel=1e-9)
    # with an AdaGrad accumulator v: weights 1/(√v + ε)²
    acc = {n: torch.rand_like(t) + 0.5 for n, t in stats.mean_grads.items()}
    vflat = torch.cat([acc[n].reshape(-1) for n in stats.mean_grads])
    w = 1 / (vflat.sqrt() + 1e-3) ** 2
    expected = (var * w).sum() / (eta**2 * (gbar.square() * w).sum())
    got = coordinate_norm_test(stats, eta=eta, preconditioner=acc, eps=1e-3).item()
    assert got == pytest.approx(expected.item(), rel=1e-9)
    # the weighted-mean identity of the docstring: b̂ = Σ w_j b̂_j, w_j ∝ ḡ_j²/v_j
    share = gbar.square() * w / (gbar.square() * w).sum()
    per_coord = var / (eta**2 * gbar.square())
    assert got == pytest.approx((share * per_coord).sum().item(), rel=1e-6)


def _synthetic(mean: torch.Tensor, b: int, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    G = mean + torch.randn(b, mean.numel(), generator=g, dtype=torch.float64)
    gbar = G.mean(0)
    return SimpleNamespace(
        batch_size=b,
        grad_sq_norm=gbar.dot(gbar),
        variance=G.var(0, correction=1).sum(),
        coordinate_sq_sums={"w": G.square().sum(0)},
        mean_grads={"w": gbar},
        _G=G,
    )


def test_coordinate_test_does_not_jump_to_max_on_noise():
    """Half the coordinates carry signal (mean 1), half are pure noise (mean 0), σ = 1."""
    b, eta, b_max = 32, 0.1, 60_000
    mean = torch.cat([torch.ones(500), torch.zeros(500)]).double()
    for seed in range(5):
        s = _synthetic(mean, b, seed)
        G = s._G
        var = G.var(0, correction=1)
        gbar = G.mean(0)
        naive_max = (var / (eta**2 * gbar.square())).max().item()
        assert naive_max > b_max  # all-coordinates aggregation: straight to b_max
        ours = coordinate_norm_test(s, eta=eta).item()
        norm = norm_test(s, eta=eta).item()
        # bounded, same order as the norm test: Σ Var_j/m_j ≈ 250 + 500, Σ ḡ_j²/m_j ≈ 250 + 16
        assert 100 < ours < 3 * norm < b_max / 20
    # pure noise: the test asks for about b/η² (as the norm test does), not the maximum
    s = _synthetic(torch.zeros(1000, dtype=torch.float64), b, 7)
    ours = coordinate_norm_test(s, eta=eta).item()
    assert 0.5 * b / eta**2 < ours < 2 * b / eta**2 < b_max


def test_zero_mean_gradient_guard():
    s = SimpleNamespace(
        variance=torch.tensor(2.0),
        grad_sq_norm=torch.tensor(0.0),
        inner_product_variance=torch.tensor(0.0),
        orthogonality_variance=torch.tensor(1.0),
    )
    assert math.isinf(norm_test(s).item())
    assert inner_product_test(s).item() == 0.0  # 0/0: nothing to ask for
    assert math.isinf(augmented_inner_product_test(s).item())
    s.variance = torch.tensor(-1e-9)  # cancellation below zero: clamped
    assert norm_test(s).item() == 0.0


def test_bad_arguments_are_named():
    s = SimpleNamespace(variance=torch.tensor(1.0), grad_sq_norm=torch.tensor(1.0))
    with pytest.raises(ValueError, match="eta"):
        norm_test(s, eta=0.0)
    with pytest.raises(TypeError, match="theta"):
        inner_product_test(s, theta="big")
    with pytest.raises(ValueError, match="inner_product_variance"):
        inner_product_test(s)
    with pytest.raises(ValueError, match="per_coordinate=True"):
        coordinate_norm_test(s)
