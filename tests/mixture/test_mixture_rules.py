"""Reweighting rules against formulas written out here, a brute-force grid and torch.func."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from adaptive.mixture import (
    DomainLossMeter,
    DoReMi,
    Exp3Mixture,
    GroupInfluence,
    MixtureSignals,
    alignment_from_statistics,
    apply_floor,
    doremi_update,
    exponentiated_influence_update,
    group_alignment,
    tikmix_objective,
    tikmix_weights,
)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def sig(losses, counts, ref=None):
    return MixtureSignals(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(counts, dtype=torch.float64),
        None if ref is None else torch.tensor(ref, dtype=torch.float64),
    )


# --------------------------------------------------------------------------------- DoReMi
def test_doremi_update_by_hand():
    alpha = np.array([0.5, 0.3, 0.2])
    proxy, ref = np.array([3.0, 2.0, 1.0]), np.array([2.5, 2.5, 0.5])
    eta, c = 0.7, 0.01
    lam = np.maximum(proxy - ref, 0.0)  # [0.5, 0, 0.5]
    a = alpha * np.exp(eta * lam)
    a /= a.sum()
    expected = (1 - c) * a + c / 3
    got = doremi_update(torch.tensor(alpha), torch.tensor(lam), eta, c)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_doremi_class_time_average_unseen_domain_and_resume():
    rule = DoReMi(3, eta=1.0, smoothing=1e-3, reference_losses=[1.0, 1.0, 1.0])
    steps = [([2.0, 1.5, 9.0], [4, 3, 0]), ([1.2, 2.0, 1.0], [2, 2, 2])]
    alpha = np.full(3, 1 / 3)
    history = []
    for losses, counts in steps:
        lam = np.maximum(np.array(losses) - 1.0, 0.0) * (np.array(counts) > 0)
        a = alpha * np.exp(lam)
        alpha = 0.999 * a / a.sum() + 0.001 / 3
        history.append(alpha)
        out = rule.update(sig(losses, counts))
        np.testing.assert_allclose(out.numpy(), alpha, rtol=1e-12)
    np.testing.assert_allclose(rule.average_weights.numpy(), np.mean(history, axis=0), rtol=1e-12)
    clone = DoReMi(3, reference_losses=[1.0, 1.0, 1.0])
    clone.load_state_dict(roundtrip(rule.state_dict()))
    s = sig([1.5, 1.1, 3.0], [1, 1, 1])
    torch.testing.assert_close(clone.update(s), rule.update(s))


def test_doremi_reference_per_update_and_errors():
    rule = DoReMi(2)
    with pytest.raises(ValueError, match="reference losses"):
        rule.update(sig([1.0, 2.0], [1, 1]))
    out = rule.update(sig([1.0, 2.0], [1, 1], ref=[1.0, 1.0]))
    a = np.array([0.5, 0.5 * math.e])
    np.testing.assert_allclose(out.numpy(), 0.999 * a / a.sum() + 0.0005, rtol=1e-12)
    with pytest.raises(ValueError, match="NaN or infinite for domain"):
        rule.update(sig([float("nan"), 2.0], [1, 1], ref=[1.0, 1.0]))
    # a NaN of a domain that was not drawn is ignored
    rule.update(sig([float("nan"), 2.0], [0, 1], ref=[1.0, 1.0]))


# ----------------------------------------------------------------------------------- EXP3
def test_exp3_matches_hand_written_bandit():
    k = 3
    rule = Exp3Mixture(k, reward_scale=10.0)
    rng = np.random.default_rng(0)
    r_hat = np.zeros(k)
    pi = np.full(k, 1 / k)

    def eps(t):
        return 1 / k if t == 0 else min(1 / k, math.sqrt(math.log(k) / (k * t)))

    for t in range(1, 30):
        losses = rng.uniform(1, 5, size=k)
        counts = rng.integers(0, 3, size=k)
        r_hat = r_hat + np.where(counts > 0, losses / 10.0, 0.0) / pi
        z = np.exp(eps(t - 1) * r_hat - np.max(eps(t - 1) * r_hat))
        pi = (1 - k * eps(t)) * z / z.sum() + eps(t)
        out = rule.update(sig(losses.tolist(), counts.tolist()))
        np.testing.assert_allclose(out.numpy(), pi, rtol=1e-10)
    assert pi.min() >= eps(29) - 1e-12
    clone = Exp3Mixture(k)
    clone.load_state_dict(roundtrip(rule.state_dict()))
    s = sig([2.0, 3.0, 1.0], [1, 1, 1])
    torch.testing.assert_close(clone.update(s), rule.update(s))
    with pytest.raises(ValueError, match="NaN"):
        rule.update(sig([float("nan"), 1.0, 1.0], [1, 1, 1]))


# --------------------------------------------------------------------------- floors, meter
def test_apply_floor_formula_and_bounds():
    w = torch.tensor([0.9, 0.1, 0.0], dtype=torch.float64)
    out = apply_floor(w, 0.05)
    torch.testing.assert_close(out, 0.05 + 0.85 * w)
    assert float(out.min()) >= 0.05 and abs(float(out.sum()) - 1) < 1e-12
    with pytest.raises(ValueError, match="floor"):
        apply_floor(w, 0.34)


def test_domain_loss_meter_matches_loop():
    meter = DomainLossMeter(3)
    losses = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 6.0])]
    sources = [torch.tensor([0, 2, 0, 2]), torch.tensor([2, 2])]
    for l, s in zip(losses, sources, strict=True):
        meter.add(l, s)
    out = meter.signals()
    torch.testing.assert_close(out.counts, torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(out.losses, torch.tensor([2.0, 0.0, 4.25], dtype=torch.float64))
    assert out.reference_losses is None
    restored = DomainLossMeter(3)
    restored.load_state_dict(roundtrip(meter.state_dict()))
    torch.testing.assert_close(restored.signals().losses, out.losses)


# ------------------------------------------------------------------------------- TiKMiX-D
def simplex_grid(step):
    n = round(1 / step)
    pts = [(i * step, j * step, (n - i - j) * step) for i in range(n + 1) for j in range(n + 1 - i)]
    return np.array(pts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tikmix_slsqp_matches_brute_force_grid(seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2, 3))
    prior = np.array([0.5, 0.3, 0.2])
    w = tikmix_weights(torch.tensor(s), prior=prior).numpy()
    assert abs(w.sum() - 1) < 1e-9 and w.min() >= 0
    assert np.all(s @ w >= s @ prior - 1e-7)  # Pareto constraint
    grid = simplex_grid(0.0025)
    feasible = grid[np.all(grid @ s.T >= s @ prior - 1e-12, axis=1)]
    # the objective written out, vectorised over the grid: std(P̂) − ΣP̂ − H(w)
    p_hat = feasible @ s.T / (np.abs(s).max(axis=1) + 1e-8)
    wc = np.clip(feasible, 1e-12, None)
    values = p_hat.std(axis=1) - p_hat.sum(axis=1) + (wc * np.log(wc)).sum(axis=1)
    best = values.min()
    assert abs(tikmix_objective(feasible[values.argmin()], s) - best) < 1e-12
    got = tikmix_objective(w, s)
    # SLSQP is at least as good as the best grid point (up to the grid's resolution)
    assert got <= best + 1e-6
    assert got >= best - 5e-3


def test_tikmix_single_target_is_softmax_of_normalised_alignment():
    # n = 1, no binding constraint: minimise −s·w/max|s| − H(w) on the simplex → w ∝ exp(s/max|s|)
    s = np.array([0.4, -0.2, 1.0, 0.1])
    expected = np.exp(s / np.abs(s).max())
    expected /= expected.sum()
    w = tikmix_weights(torch.tensor(s), pareto=False).numpy()
    np.testing.assert_allclose(w, expected, atol=1e-5)


def test_exponentiated_update_by_hand():
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    s = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    t = np.array([0.25, 0.75])
    score = t @ s
    score = score / np.abs(score).max()
    expected = w.numpy() * np.exp(0.5 * score)
    expected /= expected.sum()
    got = exponentiated_influence_update(w, torch.tensor(s), eta=0.5, target_weights=t)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_group_influence_smoothing_floor_and_resume():
    rule = GroupInfluence(3, method="exponentiated", eta=1.0, smoothing=0.5, floor=0.01)
    s = torch.tensor([1.0, 0.0, -1.0])
    w0 = torch.full((3,), 1 / 3, dtype=torch.float64)
    new = exponentiated_influence_update(w0, s)
    expected = apply_floor(0.5 * w0 + 0.5 * new, 0.01)
    torch.testing.assert_close(rule.update(s), expected)
    clone = GroupInfluence(3, method="exponentiated", eta=1.0, smoothing=0.5, floor=0.01)
    clone.load_state_dict(roundtrip(rule.state_dict()))
    torch.testing.assert_close(clone.update(s), rule.update(s))
    tik = GroupInfluence(3)
    out = tik.update(MixtureSignals(torch.zeros(3), torch.ones(3), alignment=s))
    assert int(out.argmax()) == 0 and int(out.argmin()) == 2
    with pytest.raises(ValueError, match="alignment"):
        tik.update(MixtureSignals(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="finite"):
        tik.update(torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="method"):
        GroupInfluence(3, method="bogus")


# ----------------------------------------------------------- alignment vs torch.func oracle
def per_sample_grads(model, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], dim=1)


def test_group_alignment_and_sensor_match_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2])
    xt, yt = torch.randn(6, 5), torch.randint(0, 3, (6,))

    g = per_sample_grads(model, x, y).double()
    d = per_sample_grads(model, xt, yt).double().mean(0)
    expected = torch.stack([g[groups == j].mean(0) @ d for j in range(3)])

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    s = group_alignment(
        model, loss_fn, [(x[groups == j], y[groups == j]) for j in range(3)], [(xt, yt)]
    )
    torch.testing.assert_close(s[0], expected, rtol=1e-5, atol=1e-7)

    from adaptive.stats import GradientStatistics

    stats = GradientStatistics(model, loss_reduction="sum", num_groups=3, inner_products=False)
    model.zero_grad()
    loss_fn(model, (xt, yt)).backward()
    stats.set_target({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    with stats.capture(group_ids=groups):
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    res = stats.result()
    got = alignment_from_statistics(res.group_grad_dots, res.group_counts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
