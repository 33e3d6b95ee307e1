"""The group-mean fallback estimator and the two-batch noise scale."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive.stats import (
    GradientStatistics,
    TwoBatchNoiseScale,
    group_variance,
    two_batch_estimates,
)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4), nn.PReLU()
    )


def test_fallback_matches_group_formula_from_autograd():
    model = bn_model()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 6, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
    sizes = (3, 4, 5)
    stats = GradientStatistics(model, fallback="groups", per_coordinate=True)
    for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
        with stats.capture():
            (F.cross_entropy(model(xb), yb) / len(sizes)).backward()
    s = stats.result()
    assert s.method == "groups" and s.batch_size == 12
    assert s.per_sample_sq_norms is None and s.inner_product_variance is None

    # independent: each micro-batch's mean gradient by plain autograd
    means = []
    for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
        reference.zero_grad()
        F.cross_entropy(reference(xb), yb).backward()
        means.append(torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).double())
    m = torch.tensor(sizes, dtype=torch.float64)
    gbar = sum(mk * gk for mk, gk in zip(m, means, strict=True)) / m.sum()
    want_var = (
        sum(mk * gk.square().sum() for mk, gk in zip(m, means, strict=True))
        - 12 * gbar.square().sum()
    ) / 2
    assert torch.allclose(s.grad_sq_norm.double(), gbar.square().sum(), rtol=1e-4)
    assert torch.allclose(s.variance.double(), want_var, rtol=1e-4)
    assert torch.allclose(s.noise_scale.double(), want_var / gbar.square().sum(), rtol=1e-4)
    flat_mean = torch.cat([v.reshape(-1) for v in s.mean_grads.values()])
    assert flat_mean.numel() == gbar.numel()


def test_group_variance_is_unbiased_on_gaussian_groups():
    """E[(Σ m_k‖ḡ_k‖² − b‖ḡ‖²)/(K−1)] = tr Σ for i.i.d. samples, any group sizes."""
    g = torch.Generator().manual_seed(0)
    dim, sizes, trials = 5, (2, 3, 7), 40000
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    std = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    samples = mu + std * torch.randn(trials, sum(sizes), dim, generator=g, dtype=torch.float64)
    groups = samples.split(sizes, dim=1)
    m = torch.tensor(sizes, dtype=torch.float64)
    q = sum(mk * grp.mean(1).square().sum(1) for mk, grp in zip(m, groups, strict=True))
    gsq = samples.mean(1).square().sum(1)
    est = group_variance(q, gsq, m.sum(), torch.tensor(3.0, dtype=torch.float64))
    trace = std.square().sum()
    assert abs(float(est.mean() - trace)) < 4 * float(est.std()) / trials**0.5
    # and it is not the plain difference of norms, which is biased by tr Σ/b
    assert abs(float((q - 12 * gsq).mean() - trace)) > 10 * float(est.std()) / trials**0.5


def test_two_batch_estimates_recover_expectations():
    # ‖G_B‖² = ‖G‖² + tr Σ / B in expectation: plug the expectations in, get ‖G‖², tr Σ back.
    g2, tr = 3.0, 40.0
    small, big = 8.0, 64.0
    est_g2, est_tr = two_batch_estimates(
        torch.tensor(g2 + tr / small), torch.tensor(g2 + tr / big), small, big
    )
    assert torch.allclose(est_g2, torch.tensor(g2)) and torch.allclose(est_tr, torch.tensor(tr))
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        two_batch_estimates(torch.tensor(1.0), torch.tensor(1.0), 8, 8)


def test_two_batch_noise_scale_ema_and_resume():
    ns = TwoBatchNoiseScale(beta=0.9)
    resumed = TwoBatchNoiseScale(beta=0.5)
    for t in range(6):
        ns.update(torch.tensor(3.0 + 40.0 / 8 + 0.1 * t), torch.tensor(3.0 + 40.0 / 64), 8, 64)
        if t == 2:
            buf = io.BytesIO()
            torch.save(ns.state_dict(), buf)
            buf.seek(0)
            resumed.load_state_dict(torch.load(buf, weights_only=True))
        elif t > 2:
            resumed.update(
                torch.tensor(3.0 + 40.0 / 8 + 0.1 * t), torch.tensor(3.0 + 40.0 / 64), 8, 64
            )
    assert torch.equal(ns.noise_scale(), resumed.noise_scale())
    # a constant signal: the bias-corrected EMA is the signal itself
    const = TwoBatchNoiseScale(beta=0.9)
    for _ in range(3):
        const.update(torch.tensor(3.0 + 40.0 / 8), torch.tensor(3.0 + 40.0 / 64), 8, 64)
    assert torch.allclose(const.noise_scale(), torch.tensor(40.0 / 3.0))
    with pytest.raises(ValueError, match="beta"):
        TwoBatchNoiseScale(beta=1.0)
