"""The Triton LAMB of adaptive.optim.lamb_triton against ``Lamb(foreach=False)``.

Without a GPU the kernels run under the Triton interpreter on CPU tensors: triton decides at
import whether it interprets, and other tests may import it first, so
:func:`test_interpreted_kernels` runs this file again in a child pytest with
``TRITON_INTERPRET=1`` set from the start (in this process the interpreted tests skip). The
tests marked ``cuda`` run the compiled kernels (``pytest -m cuda``) and skip without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from adaptive.optim import Lamb, lamb_triton

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
CHILD = os.environ.get("ADAPTIVE_TRITON_CHILD") == "1"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_interpreted_kernels(triton_child):
    triton_child[0](__file__, minimum=8)


@pytest.fixture
def triton_lamb(monkeypatch):
    """Lamb's fast path on the interpreted kernels for CPU tensors, blocks of 64 elements (so
    tensors span several programs); returns the list of calls, so a test can check they ran."""
    if not CHILD or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreted kernels run in the child process (test_interpreted_kernels)")
    calls = []
    step = lamb_triton.lamb_step

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return step(*args, **kwargs)

    monkeypatch.setattr(lamb_triton, "takes", lamb_triton.applies)
    monkeypatch.setattr(lamb_triton, "lamb_step", counted)
    monkeypatch.setattr(lamb_triton, "_BLOCK", 64)
    return calls


def _params(seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(30, 7, generator=gen)
    zero = torch.zeros(9, 4)  # zero-initialised: ratio 1 at the first step
    b16 = torch.randn(13, 11, generator=gen).to(torch.bfloat16)
    bias = torch.randn(7, generator=gen)
    t = torch.randn(4, 50, generator=gen).t()  # dense, not contiguous
    return [p.to(device).requires_grad_() for p in (w, zero, b16, bias, t)]


def _groups(ps, options):
    w, zero, b16, bias, t = ps
    return [
        {"params": [w, zero, t], "weight_decay": 0.05, **options},
        {"params": [b16], "weight_decay": 0.02, **options},
        {"params": [bias], "weight_decay": 0.0, "lr": 0.003, **options},
    ]


def _run(ps, options, opt_kw, steps=4):
    opt = Lamb(_groups(ps, options), lr=0.01, **opt_kw)
    for s in range(steps):
        gen = torch.Generator().manual_seed(100 + s)
        for p in ps:
            g = torch.randn(p.shape, generator=gen) * (0.1 + s)
            p.grad = torch.empty_like(p).copy_(g)  # laid out like the parameter
        opt.step()
    return opt


def _close(got, want):
    """float32 parameters to 1e-5; bfloat16 ones to a few units in the last place: the Triton
    interpreter's float32 -> bfloat16 conversion does not round as torch's does (1 ulp per
    write-back, over 4 steps)."""
    for a, b in zip(got, want, strict=True):
        if a.dtype == torch.bfloat16:
            torch.testing.assert_close(a, b, rtol=3e-2, atol=5e-2)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


OPTIONS = [
    {},
    {"decoupled_decay": True},
    {"bias_correction": False},
    {"trust_clip": (0.1, 2.0), "weight_norm_clip": (0.5, 3.0)},
    {"adapt": False},
    {"adapt_without_decay": False},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_matches_reference(triton_lamb, options, max_grad_norm):
    kw = {"max_grad_norm": max_grad_norm}
    if "adapt_without_decay" in options:
        kw["adapt_without_decay"] = options.pop("adapt_without_decay")
    got, want = _params(0), _params(0)
    opt = _run(got, options, {**kw, "foreach": True, "cpu_block": 0})
    _run(want, options, {**kw, "foreach": False})
    assert triton_lamb, "the Triton path did not run"
    _close(got, want)
    state_ref = _run(_params(0), options, {**kw, "foreach": False}).state
    for sa, sb in zip(opt.state.values(), state_ref.values(), strict=True):
        assert sa["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert torch.equal(sa["step"], sb["step"])


def test_tables_follow_new_gradient_buffers(triton_lamb):
    """A gradient set to None and rebuilt lands in a new buffer: the address table is rebuilt."""
    got, want = _params(1), _params(1)
    _run(got, {}, {"foreach": True, "cpu_block": 0}, steps=2)
    _run(want, {}, {"foreach": False}, steps=2)
    assert triton_lamb
    _close(got, want)


def test_applies_refuses_what_the_kernels_cannot_take(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4, 5)
    z = torch.zeros_like
    assert lamb_triton.applies([x], [x.clone()], [z(x)], [z(x)])
    assert not lamb_triton.applies([x.double()], [x.double()], [z(x).double()], [z(x).double()])
    assert not lamb_triton.applies([x], [x.t().contiguous().t()], [z(x)], [z(x)])  # layout
    strided = torch.randn(4, 10)[:, ::2]
    assert not lamb_triton.applies([strided], [strided], [strided], [strided])  # not dense
    assert not lamb_triton.applies([x, x.bfloat16()], [x, x.bfloat16()], [z(x)] * 2, [z(x)] * 2)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not lamb_triton.applies([x], [x.clone()], [z(x)], [z(x)])  # CPU, compiled: no
    assert not lamb_triton.takes([x], [x.clone()], [z(x)], [z(x)])
    with pytest.raises(ValueError, match="not for the Triton kernels"):
        lamb_triton.lamb_step([x], [x], [z(x)], [z(x)], [torch.ones(())], {})


def test_kernels_compile_for_hopper(triton_child):
    """The compiled form (not the interpreter's) builds for sm_90 on this CPU: Triton's front end,
    MLIR passes and bundled ptxas (tests/triton_aot_worker.py; bf16/fp16 products on wgmma)."""
    triton_child[1]("lamb")


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("options", OPTIONS[:4])
def test_cuda_matches_reference(options):
    got, want = _params(2, "cuda"), _params(2, "cuda")
    _run(got, dict(options), {"max_grad_norm": 1.0})
    _run(want, dict(options), {"max_grad_norm": 1.0, "foreach": False})
    for a, b in zip(got, want, strict=True):
        tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol / 10)


@pytest.mark.cuda
@needs_cuda
def test_cuda_step_takes_the_kernels_and_never_syncs(monkeypatch):
    calls = []
    step = lamb_triton.lamb_step
    monkeypatch.setattr(
        lamb_triton, "lamb_step", lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    )
    ps = _params(3, "cuda")
    opt = _run(ps, {}, {"max_grad_norm": 1.0}, steps=2)  # tables built, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in ps:
            p.grad.normal_()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls and all(torch.isfinite(p).all() for p in ps)
