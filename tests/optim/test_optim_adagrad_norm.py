"""AdaGradNorm: one accumulator over all groups, against the formula written out."""

from __future__ import annotations

import io
import math

import pytest
import torch

from adaptive.optim import AdaGradNorm


def _setup():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=gen).requires_grad_()
    b = torch.randn(4, generator=gen).requires_grad_()
    frozen = torch.randn(2, generator=gen).requires_grad_()
    c16 = torch.randn(6, 2, generator=gen).to(torch.bfloat16).requires_grad_()
    groups = [{"params": [a, frozen], "lr": 0.5}, {"params": []}, {"params": [b, c16], "lr": 0.2}]
    return groups, [a, b, c16], [a, frozen, b, c16]


def _grads(train, s):
    gen = torch.Generator().manual_seed(10 + s)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in train]


@pytest.mark.parametrize("foreach", [None, False])
def test_adagrad_norm_matches_formula_with_global_accumulator(foreach):
    groups, train, _ = _setup()
    x0 = [p.detach().double().flatten().tolist() for p in train]
    lrs = [0.5, 0.2, 0.2]
    opt = AdaGradNorm(groups, b0=0.3, foreach=foreach)
    xs = [list(v) for v in x0]
    b_sq = 0.3**2
    for s in range(5):
        grads = _grads(train, s)
        for p, g in zip(train, grads, strict=True):
            p.grad = g
        opt.step()
        flat = [g.double().flatten().tolist() for g in grads]
        b_sq += sum(v * v for g in flat for v in g)  # one norm over every group
        b = math.sqrt(b_sq)
        xs = [
            [xi - lr * gi / b for xi, gi in zip(x, g, strict=True)]
            for x, g, lr in zip(xs, flat, lrs, strict=True)
        ]
    for p, x in zip(train[:2], xs[:2], strict=True):
        torch.testing.assert_close(
            p.detach().double().flatten(),
            torch.tensor(x, dtype=torch.float64),
            rtol=1e-5,
            atol=1e-6,
        )
    # bf16 param: one rounding per step, so compare at bf16 precision
    torch.testing.assert_close(
        train[2].detach().double().flatten(),
        torch.tensor(xs[2], dtype=torch.float64),
        rtol=2e-2,
        atol=2e-2,
    )
    assert opt.b_squared.item() == pytest.approx(b_sq, rel=1e-5)
    assert abs(xs[0][0] - x0[0][0]) > 0.05


def test_adagrad_norm_fast_equals_reference_and_frozen_untouched():
    ga, ta, aa = _setup()
    gb, tb, ab = _setup()
    oa = AdaGradNorm(ga)
    ob = AdaGradNorm(gb, foreach=False)
    for s in range(25):
        for ps in (ta, tb):
            for p, g in zip(ps, _grads(ps, s), strict=True):
                p.grad = g
        oa.step()
        ob.step()
    for x, y in zip(aa, ab, strict=True):
        tol = (
            {"rtol": 1e-2, "atol": 1e-2}
            if x.dtype == torch.bfloat16
            else {"rtol": 1e-5, "atol": 1e-6}
        )
        torch.testing.assert_close(x, y, **tol)
    torch.testing.assert_close(oa.b_squared, ob.b_squared)
    torch.testing.assert_close(aa[1], _setup()[2][1])


def test_adagrad_norm_state_dict_resume():
    ga, ta, aa = _setup()
    oa = AdaGradNorm(ga)
    for s in range(8):
        for p, g in zip(ta, _grads(ta, s), strict=True):
            p.grad = g
        oa.step()
    gb, tb, ab = _setup()
    ob = AdaGradNorm(gb)
    for s in range(4):
        for p, g in zip(tb, _grads(tb, s), strict=True):
            p.grad = g
        ob.step()
    buf = io.BytesIO()
    torch.save({"opt": ob.state_dict(), "params": [p.detach().clone() for p in ab]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    gc, tc, ac = _setup()
    with torch.no_grad():
        for p, saved in zip(ac, ckpt["params"], strict=True):
            p.copy_(saved)
    oc = AdaGradNorm(gc)
    oc.load_state_dict(ckpt["opt"])
    for s in range(4, 8):
        for p, g in zip(tc, _grads(tc, s), strict=True):
            p.grad = g
        oc.step()
    for x, y in zip(aa, ac, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(oa.b_squared, oc.b_squared, rtol=0, atol=0)


def test_adagrad_norm_closure_sparse_invalid():
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = AdaGradNorm([p], lr=1.0, b0=1e-3)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(25.0)
    b = math.sqrt(1e-6 + 100.0)  # ‖g‖ = ‖(6, 8)‖ = 10
    torch.testing.assert_close(p.detach(), torch.tensor([3.0 - 6.0 / b, 4.0 - 8.0 / b]))

    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = AdaGradNorm(emb.parameters())
    emb(torch.tensor([0])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    with pytest.raises(ValueError, match=r"b0 must be in \(0.0, inf\), got 0.0"):
        AdaGradNorm([torch.zeros(1, requires_grad=True)], b0=0.0)
    with pytest.raises(ValueError, match=r"lr must be in \[0.0, inf\), got -0.1"):
        AdaGradNorm([torch.zeros(1, requires_grad=True)], lr=-0.1)
