"""Lamb: against the paper's formula, timm's Lamb, its own reference path, and across resumption."""

from __future__ import annotations

import copy
import io
import math
import time

import pytest
import torch
from timm.optim import Lamb as TimmLamb

from adaptive.optim import Lamb


def _make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 3), (200,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _grads(params: list[torch.Tensor], step: int, scale: float = 0.1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * scale for p in params]


def _run(make_opt, params, steps: int, start: int = 0, scale: float = 0.1):
    opt = make_opt(params)
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t, scale), strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
    return opt


# (our kwargs, timm kwargs): the same mathematics configured in both libraries
TIMM_CONFIGS = {
    "paper": ({}, {}),
    "no_bias_correction": ({"bias_correction": False}, {"bias_correction": False}),
    "lambc_trust_clip": ({"trust_clip": (0.0, 1.0)}, {"trust_clip": True}),
    "decoupled": (
        {"decoupled_decay": True, "weight_decay": 0.1},
        {"decoupled_decay": True, "weight_decay": 0.1},
    ),
    "global_clip": ({"max_grad_norm": 1.0}, {"max_grad_norm": 1.0}),
    "skip_adapt_without_decay": (
        {"weight_decay": 0.0, "adapt_without_decay": False},
        {"weight_decay": 0.0, "always_adapt": False},
    ),
}


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("config", sorted(TIMM_CONFIGS))
def test_lamb_matches_timm_over_20_steps(config, foreach):
    ours, theirs = TIMM_CONFIGS[config]
    base = {"lr": 1e-2, "weight_decay": 0.01}
    timm_kw = {**base, "max_grad_norm": None, "always_adapt": True, **theirs}
    # large gradients so that the global clip is active in "global_clip"
    scale = 3.0 if config == "global_clip" else 0.1
    a = _make_params()
    b = _make_params()
    _run(lambda ps: Lamb(ps, **{**base, **ours}, foreach=foreach, cpu_block=64), a, 20, scale=scale)
    _run(lambda ps: TimmLamb(ps, **timm_kw), b, 20, scale=scale)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # the parameters moved well beyond the tolerance
    assert max((x - y).abs().max().item() for x, y in zip(a, _make_params(), strict=True)) > 1e-2


def _lamb_formula_one_tensor(x0, grads, lr, b1, b2, eps, wd, phi_clip=None, ratio_clip=None):
    """You et al. 2019 Algorithm 2 for one tensor, written out element by element in float64."""
    x = [float(v) for v in x0]
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        g = [float(e) for e in g]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        m_hat = [mi / (1 - b1**t) for mi in m]
        v_hat = [vi / (1 - b2**t) for vi in v]
        u = [
            mh / (math.sqrt(vh) + eps) + wd * xi for mh, vh, xi in zip(m_hat, v_hat, x, strict=True)
        ]
        x_norm = math.sqrt(sum(xi * xi for xi in x))
        u_norm = math.sqrt(sum(ui * ui for ui in u))
        if x_norm > 0 and u_norm > 0:
            phi = x_norm if phi_clip is None else min(max(x_norm, phi_clip[0]), phi_clip[1])
            ratio = phi / u_norm
            if ratio_clip is not None:
                ratio = min(max(ratio, ratio_clip[0]), ratio_clip[1])
        else:
            ratio = 1.0
        x = [xi - lr * ratio * ui for xi, ui in zip(x, u, strict=True)]
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize(
    "clips",
    [(None, None), ((0.5, 1.5), None), (None, (0.0, 0.05))],
    ids=["phi_id", "phi_clip", "ratio_clip"],
)
def test_lamb_matches_formula_for_one_tensor(foreach, clips):
    phi_clip, ratio_clip = clips
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, generator=gen)
    grads = [torch.randn(6, generator=gen) for _ in range(5)]
    p = x0.clone().double().requires_grad_()
    opt = Lamb(
        [p],
        lr=0.1,
        betas=(0.8, 0.95),
        eps=1e-3,
        weight_decay=0.3,
        weight_norm_clip=phi_clip,
        trust_clip=ratio_clip,
        foreach=foreach,
    )
    for g in grads:
        p.grad = g.double()
        opt.step()
    expected = _lamb_formula_one_tensor(x0, grads, 0.1, 0.8, 0.95, 1e-3, 0.3, phi_clip, ratio_clip)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    assert (p.detach() - x0.double()).abs().max() > 5e-3


def test_lamb_zero_tensor_takes_plain_step():
    """Ratio 1 where ‖x‖ = 0: a zero-initialised tensor moves by lr * u after one step."""
    p = torch.zeros(4, requires_grad=True)
    opt = Lamb([p], lr=0.1, eps=1e-6, weight_decay=0.5)
    p.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    opt.step()
    # step 1: m_hat = g, v_hat = g^2, r = g/(|g| + eps), x = 0 so u = r
    g = torch.tensor([1.0, -2.0, 0.5, 0.0])
    torch.testing.assert_close(p.detach(), -0.1 * g / (g.abs() + 1e-6))


def _mixed_groups(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(300, 7, generator=gen).requires_grad_()  # split into pieces by cpu_block=128
    zero = torch.zeros(9, 4, requires_grad=True)  # zero-initialised
    frozen = torch.randn(5, generator=gen).requires_grad_()  # grad stays None
    b16 = torch.randn(130, 3, generator=gen).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(7, generator=gen).requires_grad_()
    t = torch.randn(4, 6, generator=gen).t().requires_grad_()  # non-contiguous
    groups = [
        {"params": [w, zero, frozen], "weight_decay": 0.05},
        {"params": []},
        {
            "params": [b16, t],
            "weight_decay": 0.02,
            "trust_clip": (0.1, 2.0),
            "weight_norm_clip": (0.0, 10.0),
        },
        {"params": [bias], "weight_decay": 0.0, "adapt": False, "lr": 0.003},
    ]
    return groups, [w, zero, b16, bias, t], [w, zero, frozen, b16, bias, t]


def _run_groups(groups, trainable, steps, opt_kw, start=0, opt=None):
    if opt is None:
        opt = Lamb(groups, lr=0.01, **opt_kw)
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(500 + s)
        for p in trainable:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize(
    "extra",
    [{}, {"decoupled_decay": True}, {"bias_correction": False, "max_grad_norm": 0.5}],
    ids=["default", "decoupled", "no_bc_clipped"],
)
@pytest.mark.parametrize("cpu_block", [128, 0])
def test_lamb_fast_equals_reference_mixed_groups(extra, cpu_block):
    g_fast, train_fast, all_fast = _mixed_groups()
    g_ref, train_ref, all_ref = _mixed_groups()
    opt_fast = _run_groups(g_fast, train_fast, 40, {"cpu_block": cpu_block, **extra})
    _run_groups(g_ref, train_ref, 40, {"foreach": False, **extra})
    for a, b in zip(all_fast, all_ref, strict=True):
        assert a.dtype == b.dtype
        tol = (
            {"rtol": 2e-2, "atol": 2e-2}
            if a.dtype == torch.bfloat16
            else {"rtol": 1e-5, "atol": 1e-6}
        )
        torch.testing.assert_close(a, b, **tol)
    frozen = all_fast[2]
    torch.testing.assert_close(frozen, _mixed_groups()[2][2])  # never stepped
    assert all_fast[1].abs().max() > 0  # the zero tensor learned
    assert (
        opt_fast.state[train_fast[2]]["exp_avg"].dtype == torch.float32
    )  # bf16 param, fp32 moments


@pytest.mark.parametrize(
    "extra",
    [{}, {"decoupled_decay": True}, {"bias_correction": False, "max_grad_norm": 0.5}],
    ids=["default", "decoupled", "no_bc_clipped"],
)
def test_lamb_fast_equals_reference_large_tensors(extra):
    """Tensors past the apply-at-once size (2**16 elements), split into several cache pieces,
    beside small ones; bf16 and fp64 large tensors too. ``p.grad`` is left untouched."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(300, 250), (70_000,), (64,), (5, 7)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float32]
    base = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    base.append(torch.randn(300, 240, generator=gen).to(torch.bfloat16))
    fast = [b.clone().requires_grad_() for b in base]
    ref = [b.clone().requires_grad_() for b in base]
    opt_fast = Lamb(fast, lr=0.01, cpu_block=4096, **extra)
    opt_ref = Lamb(ref, lr=0.01, foreach=False, **extra)
    for s in range(6):
        g = torch.Generator().manual_seed(900 + s)
        grads = [(torch.randn(b.shape, generator=g) * 0.1).to(b.dtype) for b in base]
        for ps in (fast, ref):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
        opt_fast.step()
        opt_ref.step()
        for p, gr in zip(fast, grads, strict=True):
            torch.testing.assert_close(p.grad, gr, rtol=0, atol=0)
    for a, b, start in zip(fast, ref, base, strict=True):
        tol = {"rtol": 2e-2, "atol": 2e-2} if a.dtype == torch.bfloat16 else {}
        torch.testing.assert_close(a, b, **tol)
        assert (a.detach().double() - start.double()).abs().max() > 1e-4  # it moved


def test_lamb_state_dict_resume_equals_uninterrupted():
    g_a, train_a, all_a = _mixed_groups()
    _run_groups(g_a, train_a, 20, {})
    g_b, train_b, all_b = _mixed_groups()
    opt_b = _run_groups(g_b, train_b, 10, {})
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "params": [p.detach().clone() for p in all_b]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    g_c, train_c, all_c = _mixed_groups()
    with torch.no_grad():
        for p, saved in zip(all_c, ckpt["params"], strict=True):
            p.copy_(saved)
    opt_c = Lamb(g_c, lr=0.01)
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.state[train_c[2]]["exp_avg_sq"].dtype == torch.float32  # not cast to bf16
    _run_groups(g_c, train_c, 10, {}, start=10, opt=opt_c)
    for a, c in zip(all_a, all_c, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_lamb_closure_and_return_value():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = Lamb([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    # first step with g = 2x: r = sign(g)/(1+eps/|g|), u = r + 0.01 x, ratio ‖x‖/‖u‖
    x = torch.tensor([1.0, 2.0])
    u = 2 * x / (2 * x + 1e-6) + 0.01 * x
    torch.testing.assert_close(p.detach(), x - 0.1 * x.norm() / u.norm() * u)


def test_lamb_deepcopy_keeps_options_and_state():
    p = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = Lamb([p], lr=0.1, max_grad_norm=0.5, cpu_block=4)
    p.grad = torch.ones_like(p)
    opt.step()
    clone = copy.deepcopy(opt)
    assert (clone.max_grad_norm, clone.foreach, clone.cpu_block) == (0.5, None, 4)
    q = clone.param_groups[0]["params"][0]
    before = p.detach().clone()
    p.grad = torch.full_like(p, 3.0)
    q.grad = torch.full_like(q, 3.0)
    opt.step()
    clone.step()
    torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert (p.detach() - before).abs().max() > 1e-3


def test_lamb_rejects_sparse_gradients():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Lamb(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lr": -1.0}, r"lr must be in \[0.0, inf\), got -1.0"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0.0, 1.0\), got 1.0"),
        ({"betas": (0.9,)}, r"betas must be a pair"),
        ({"eps": 0.0}, r"eps must be in \(0.0, inf\), got 0.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be in \[0.0, inf\), got -0.1"),
        ({"trust_clip": (2.0, 1.0)}, r"trust_clip must satisfy low <= high"),
        ({"weight_norm_clip": (-1.0, 1.0)}, r"weight_norm_clip\[0\] must be in"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm must be in \(0.0, inf\), got 0.0"),
        ({"cpu_block": -4}, r"cpu_block must be an int >= 0"),
    ],
)
def test_lamb_invalid_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Lamb([torch.zeros(2, requires_grad=True)], **kwargs)


def test_lamb_invalid_group_value():
    opt = Lamb([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"eps must be in \(0.0, inf\), got -1.0"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "eps": -1.0})


@pytest.mark.slow
def test_lamb_step_under_torch_compile():
    """The fast path compiles without recompiling per step and gives the eager numbers."""
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    a = [x0.clone().requires_grad_()]
    b = [x0.clone().requires_grad_()]
    eager = Lamb(a, lr=0.05, cpu_block=0)
    compiled_opt = Lamb(b, lr=0.05, cpu_block=0)
    compiled_step = torch.compile(compiled_opt.step)
    start = time.perf_counter()
    for s in range(4):
        g = torch.randn(8, 3, generator=torch.Generator().manual_seed(s))
        a[0].grad = g.clone()
        b[0].grad = g.clone()
        eager.step()
        if s == 0:
            compiled_opt.step()  # create the state eagerly, so one graph serves every later step
            continue
        try:
            compiled_step()
        except Exception as exc:  # no C++ toolchain or an inductor limitation on this machine
            pytest.skip(f"torch.compile of Lamb.step failed here: {type(exc).__name__}: {exc}")
        if time.perf_counter() - start > 90:
            pytest.skip("torch.compile of Lamb.step took over 90 s on this CPU")
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    assert (b[0].detach() - x0).abs().max() > 0.01


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lamb_cuda_fast_equals_reference():
    g_fast, train_fast, all_fast = _mixed_groups()
    g_ref, train_ref, all_ref = _mixed_groups()
    for ps in (all_fast, all_ref):
        for p in ps:
            p.data = p.data.cuda()

    def run(groups, train, kw):
        opt = Lamb(groups, lr=0.01, **kw)
        for s in range(20):
            gen = torch.Generator().manual_seed(500 + s)
            for p in train:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype).cuda()
            opt.step()

    run(g_fast, train_fast, {})
    run(g_ref, train_ref, {"foreach": False})
    for a, b in zip(all_fast, all_ref, strict=True):
        tol = (
            {"rtol": 2e-2, "atol": 2e-2}
            if a.dtype == torch.bfloat16
            else {"rtol": 1e-5, "atol": 1e-6}
        )
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lamb_small_tensors_one_dtype_with_clipping_equal_reference(dtype):
    """Only fp64 (or only bf16) gradients with max_grad_norm: the multi-tensor small-tensor
    path and the global clipping norm against the reference path."""
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(50, 3, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    fast = [b.clone().requires_grad_() for b in base]
    ref = [b.clone().requires_grad_() for b in base]
    kw = {"lr": 0.01, "bias_correction": False, "max_grad_norm": 0.3}
    opt_fast, opt_ref = Lamb(fast, **kw), Lamb(ref, foreach=False, **kw)
    for s in range(5):
        g = torch.Generator().manual_seed(40 + s)
        grads = [torch.randn(b.shape, generator=g, dtype=torch.float64).to(dtype) for b in base]
        for ps in (fast, ref):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
        opt_fast.step()
        opt_ref.step()
    for a, b, start in zip(fast, ref, base, strict=True):
        rtol = 1e-12 if dtype == torch.float64 else 8e-3  # bf16: one unit in the last place
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
        assert (a.detach().double() - start.double()).abs().max() > 1e-3  # it moved
