"""Lars: against the formula written out, its own reference path, and across resumption."""

from __future__ import annotations

import io
import math

import pytest
import torch

from adaptive.optim import Lars


def _lars_formula(x0, grads, lr, mu, wd, tc, eps, nesterov, trust_norm, adapt=True):
    """Algorithm 1 of You, Gitman, Ginsburg 2017 with lr applied outside the buffer, in float64."""
    x = [float(v) for v in x0]
    buf = [0.0] * len(x)
    for g in grads:
        g = [float(e) for e in g]
        if adapt:
            d = [gi + wd * xi for gi, xi in zip(g, x, strict=True)]
            xn = math.sqrt(sum(v * v for v in x))
            gn = math.sqrt(sum(v * v for v in g))
            dn = math.sqrt(sum(v * v for v in d))
            denom = gn + wd * xn + eps if trust_norm == "paper" else dn + eps
            rho = tc * xn / denom if xn > 0 and gn > 0 else 1.0
            d = [rho * di for di in d]
        else:
            d = g
        buf = [mu * bi + di for bi, di in zip(buf, d, strict=True)]
        step = [di + mu * bi for di, bi in zip(d, buf, strict=True)] if nesterov else buf
        x = [xi - lr * si for xi, si in zip(x, step, strict=True)]
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("trust_norm", ["paper", "combined"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_formula(foreach, trust_norm, nesterov):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=gen)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(6)]
    b0 = torch.randn(3, generator=gen)
    w = x0.clone().double().requires_grad_()
    b = b0.clone().double().requires_grad_()
    opt = Lars(
        [w, b],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
        trust_coefficient=0.02,
        eps=1e-3,
        nesterov=nesterov,
        trust_norm=trust_norm,
        foreach=foreach,
    )
    for g in grads:
        w.grad = g.double()
        b.grad = g[0].double()
        opt.step()
    expected_w = _lars_formula(
        x0.flatten(), [g.flatten() for g in grads], 0.5, 0.9, 0.1, 0.02, 1e-3, nesterov, trust_norm
    )
    # the 1-D bias: no ratio and no decay (exclude_1d)
    expected_b = _lars_formula(
        b0, [g[0] for g in grads], 0.5, 0.9, 0.0, 0.02, 1e-3, nesterov, trust_norm, adapt=False
    )
    torch.testing.assert_close(w.detach().flatten(), expected_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.detach(), expected_b, rtol=1e-10, atol=1e-12)
    assert (w.detach() - x0.double()).abs().max() > 1e-2


def _groups():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(20, 6, generator=gen).requires_grad_()
    zero = torch.zeros(3, 3, requires_grad=True)
    frozen = torch.randn(4, 4, generator=gen).requires_grad_()
    b16 = torch.randn(10, 5, generator=gen).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(6, generator=gen).requires_grad_()
    groups = [
        {"params": [w, zero, frozen, bias], "weight_decay": 1e-3},
        {"params": []},
        {"params": [b16], "trust_norm": "combined", "momentum": 0.0, "nesterov": False},
        {"params": [], "adapt": False},
    ]
    return groups, [w, zero, b16, bias], [w, zero, frozen, b16, bias]


def _run(groups, train, steps, start=0, opt=None, **kw):
    opt = opt or Lars(groups, lr=1.0, trust_coefficient=0.01, **kw)
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + s)
        for p in train:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_fast_equals_reference(nesterov):
    ga, ta, aa = _groups()
    gb, tb, ab = _groups()
    _run(ga, ta, 30, nesterov=nesterov)
    _run(gb, tb, 30, nesterov=nesterov, foreach=False)
    for x, y in zip(aa, ab, strict=True):
        tol = (
            {"rtol": 2e-2, "atol": 2e-2}
            if x.dtype == torch.bfloat16
            else {"rtol": 1e-5, "atol": 1e-6}
        )
        torch.testing.assert_close(x, y, **tol)
    torch.testing.assert_close(aa[2], _groups()[2][2])  # frozen param untouched
    assert aa[1].abs().max() > 0  # zero tensor moved


def test_lars_state_dict_resume():
    ga, ta, aa = _groups()
    _run(ga, ta, 12)
    gb, tb, ab = _groups()
    opt = _run(gb, tb, 6)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ab]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    gc, tc, ac = _groups()
    with torch.no_grad():
        for p, saved in zip(ac, ckpt["params"], strict=True):
            p.copy_(saved)
    opt_c = Lars(gc, lr=1.0, trust_coefficient=0.01)
    opt_c.load_state_dict(ckpt["opt"])
    _run(gc, tc, 6, start=6, opt=opt_c)
    for x, y in zip(aa, ac, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_lars_closure_sparse_and_invalid():
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = Lars([p], lr=0.1, momentum=0.0, exclude_1d=False, trust_coefficient=0.5)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(25.0)
    # g = 2x = (6, 8): rho = 0.5 * 5 / 10, x <- x - 0.1 * rho * g
    torch.testing.assert_close(
        p.detach(), torch.tensor([3.0 - 0.1 * 0.25 * 6, 4.0 - 0.1 * 0.25 * 8])
    )

    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = Lars(emb.parameters())
    emb(torch.tensor([0])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()

    q = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\), got 1.5"):
        Lars(q, momentum=1.5)
    with pytest.raises(ValueError, match=r"trust_coefficient must be in \(0.0, inf\), got 0.0"):
        Lars(q, trust_coefficient=0.0)
    with pytest.raises(ValueError, match="trust_norm must be one of"):
        Lars(q, trust_norm="l1")
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        Lars(q, momentum=0.0, nesterov=True)
