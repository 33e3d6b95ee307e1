"""One test per point of issue 22: where Lamb, Lars and AdaGradNorm broke torch.optim's contract.

1. state that does not fit the parameters raises (in a child process: it used to abort it);
2. load_state_dict hooks are honoured; 3. AdaGradNorm in float64; 4. AdaGradNorm and
torch.distributed.checkpoint; 5. a rejected add_param_group leaves nothing behind; 6. tensor lr;
7. a plain-number ``step`` in a checkpoint; 8. Lamb's global clipping norm in float64.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from timm.optim import Lamb as TimmLamb

import adaptive.optim.adagrad_norm as adagrad_norm_module
import adaptive.optim.lamb as lamb_module
import adaptive.optim.lars as lars_module
from adaptive.optim import AdaGradNorm, Lamb, Lars

ROOT = Path(__file__).resolve().parents[2]

# -- 1. a state that does not fit the parameters --------------------------------------------

MISMATCH_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from adaptive.optim import AdaGradNorm, Lamb, Lars

    CASES = {
        "lamb_fast": lambda ps: Lamb(ps, lr=0.1),
        "lamb_fast_blocked": lambda ps: Lamb(ps, lr=0.1, cpu_block=64),
        "lamb_foreach": lambda ps: Lamb(ps, lr=0.1, cpu_block=0),
        "lamb_reference": lambda ps: Lamb(ps, lr=0.1, foreach=False),
        "lars_fast": lambda ps: Lars(ps, lr=0.1),
        "lars_reference": lambda ps: Lars(ps, lr=0.1, foreach=False),
    }
    out = {}
    for name, build in CASES.items():
        gen = torch.Generator().manual_seed(0)
        shapes = [(300, 40), (7,), (70_000,), (5, 3)]
        a = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = build(a)
        for p in a:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        saved = opt.state_dict()
        # the same parameters, listed in another order
        b = [torch.randn(s, generator=gen).requires_grad_() for s in reversed(shapes)]
        opt2 = build(b)
        opt2.load_state_dict(saved)
        for p in b:
            p.grad = torch.randn(p.shape, generator=gen)
        before = [p.detach().clone() for p in b]
        try:
            opt2.step()
            out[name] = {"raised": None}
        except Exception as exc:
            out[name] = {
                "raised": type(exc).__name__,
                "value_error": isinstance(exc, ValueError),
                "runtime_error": isinstance(exc, RuntimeError),
                "message": str(exc),
            }
        out[name]["unchanged"] = all(torch.equal(p, q) for p, q in zip(b, before))
    print("RESULT" + json.dumps(out))
    """
)


def test_mismatched_state_raises_instead_of_aborting(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240
    )
    # on a mismatch the fused CPU kernel wrote out of bounds: signal 6 or 11, no result
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    assert len(results) == 6
    for name, r in results.items():
        assert r["raised"] == "StateMismatchError", (name, r)
        assert r["value_error"] and r["runtime_error"], name  # either except clause catches it
        assert "shape" in r["message"] and "another order" in r["message"], r["message"]
        assert r["unchanged"], f"{name}: parameters were written before the error"


def test_mismatched_dtype_and_device_metadata_raise():
    p = torch.randn(4, 3, requires_grad=True)
    opt = Lamb([p])
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].half()
    with pytest.raises(ValueError, match=r"'exp_avg' .* dtype torch.float16"):
        opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"device meta"):
        opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(4, 3)
    opt.state[p]["step"] = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"'step' .* expected a 0-dim float32 tensor"):
        opt.step()


# -- 2. load_state_dict hooks -------------------------------------------------------------


def _stepped(cls, dtype, **kw):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(6, 4, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
    opt = cls(ps, lr=0.1, **kw)
    for s in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s)).to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("cls", "key"), [(Lamb, "exp_avg"), (Lars, "momentum_buffer")])
def test_load_state_dict_honours_user_hooks(cls, key, dtype):
    ps, opt = _stepped(cls, dtype)
    saved = opt.state_dict()
    fresh = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = cls(fresh, lr=0.1)

    def pre_hook(_opt, sd):  # remap: a new dict whose first moment is doubled
        sd = copy.deepcopy(sd)
        sd["state"][0][key] = sd["state"][0][key] * 2
        return sd

    def post_hook(o):  # post-process what was loaded
        o.state[o.param_groups[0]["params"][1]][key].zero_()

    opt2.register_load_state_dict_pre_hook(pre_hook)
    opt2.register_load_state_dict_post_hook(post_hook)
    opt2.load_state_dict(saved)
    want0 = (saved["state"][0][key] * 2).float()
    got0, got1 = opt2.state[fresh[0]][key], opt2.state[fresh[1]][key]
    assert got0.dtype == torch.float32 and got1.dtype == torch.float32  # dtype still restored
    torch.testing.assert_close(got0, want0, rtol=0, atol=0)  # the pre-hook's state was loaded
    assert got1.abs().max() == 0  # the post-hook's change was kept
    torch.testing.assert_close(saved["state"][0][key], opt.state[ps[0]][key])  # source intact


# -- 3. AdaGradNorm in float64 -------------------------------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
def test_adagrad_norm_float64_state_and_steps(foreach):
    x0 = torch.tensor([1.0 + 1e-12, -2.0, 3.0], dtype=torch.float64)
    p = x0.clone().requires_grad_()
    opt = AdaGradNorm([p], lr=1e-13, b0=1.0, foreach=foreach)
    b_sq = 1.0
    x = x0.tolist()
    for s in range(3):
        g = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64) * (s + 1)
        p.grad = g.clone()
        opt.step()
        b_sq += float((g * g).sum())
        x = [xi - 1e-13 * gi / b_sq**0.5 for xi, gi in zip(x, g.tolist(), strict=True)]
    assert opt.b_squared.dtype == torch.float64
    assert p.dtype == torch.float64
    torch.testing.assert_close(p.detach(), torch.tensor(x, dtype=torch.float64), rtol=1e-15, atol=0)
    assert p[0].item() != 1.0  # not rounded through float32
    assert opt.b_squared.item() == pytest.approx(b_sq, rel=1e-15)


def test_adagrad_norm_float32_accumulator_for_low_precision():
    p = torch.randn(5, dtype=torch.bfloat16, requires_grad=True)
    opt = AdaGradNorm([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.b_squared.dtype == torch.float32 and p.dtype == torch.bfloat16


# -- 4. AdaGradNorm and torch.distributed.checkpoint ----------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + s)
        opt.zero_grad()
        model(torch.randn(6, 3, generator=gen)).square().mean().backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize(
    "build",
    [
        lambda ps: AdaGradNorm(ps, lr=0.1),
        lambda ps: AdaGradNorm(ps, lr=0.1, foreach=False),
        lambda ps: Lamb(ps, lr=0.05),
        lambda ps: Lars(ps, lr=0.5, trust_coefficient=0.1),
    ],
    ids=["adagrad_norm", "adagrad_norm_reference", "lamb", "lars"],
)
def test_distributed_checkpoint_round_trip(build, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    ref = _model()
    opt_ref = build(ref.parameters())
    _train(ref, opt_ref, 6)
    model = _model()
    opt = build(model.parameters())
    _train(model, opt, 3)
    assert all(isinstance(k, torch.Tensor) for k in opt.state)  # only parameter-keyed state
    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=tmp_path,
    )
    model2 = _model(seed=1)
    opt2 = build(model2.parameters())
    target = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(target, checkpoint_id=tmp_path)
    model2.load_state_dict(target["model"])
    set_optimizer_state_dict(model2, opt2, target["optim"])
    _train(model2, opt2, 3, start=3)
    for a, b in zip(ref.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adagrad_norm_loads_checkpoint_with_global_key():
    gen = torch.Generator().manual_seed(0)
    a = [
        torch.randn(4, 2, generator=gen).to(torch.bfloat16).requires_grad_(),
        torch.randn(3, generator=gen).requires_grad_(),
    ]
    opt = AdaGradNorm(a, lr=0.1)
    for p in a:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    b_sq = opt.b_squared.clone()
    # the format before the accumulator moved: a string key beside the parameter ids
    old = {"state": {"global": {"b_squared": b_sq.clone()}}, "param_groups": sd["param_groups"]}
    b = [p.detach().clone().requires_grad_() for p in a]
    opt2 = AdaGradNorm(b, lr=0.1)
    opt2.load_state_dict(old)
    assert "global" not in opt2.state
    assert opt2.b_squared.dtype == torch.float32  # not cast to the first parameter's bf16
    torch.testing.assert_close(opt2.b_squared, b_sq, rtol=0, atol=0)
    for p, q in zip(a, b, strict=True):
        p.grad = torch.full_like(p, 0.5)
        q.grad = torch.full_like(q, 0.5)
    opt.step()
    opt2.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # an optimizer pickled in the old layout
    legacy = copy.deepcopy(opt2)
    legacy.state = type(legacy.state)(dict)
    legacy.state["global"] = {"b_squared": b_sq.clone()}
    restored = copy.deepcopy(legacy)
    assert "global" not in restored.state
    torch.testing.assert_close(restored.b_squared, b_sq, rtol=0, atol=0)


# -- 5. a rejected add_param_group ----------------------------------------------------------


@pytest.mark.parametrize("cls", [Lamb, Lars, AdaGradNorm])
def test_rejected_param_group_is_not_kept(cls):
    opt = cls([torch.zeros(2, requires_grad=True)], lr=0.1)
    q = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr must be in \[0.0, inf\)"):
        opt.add_param_group({"params": [q], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [q], "lr": 0.5})  # the corrected retry
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.param_groups) == 2


# -- 6. tensor lr ---------------------------------------------------------------------------

BUILDERS = {
    "lamb": lambda ps, lr, **kw: Lamb(ps, lr=lr, weight_decay=0.1, **kw),
    "lamb_decoupled": lambda ps, lr, **kw: Lamb(
        ps, lr=lr, weight_decay=0.1, decoupled_decay=True, **kw
    ),
    "lamb_no_adapt": lambda ps, lr, **kw: Lamb(ps, lr=lr, adapt=False, bias_correction=False, **kw),
    "lars": lambda ps, lr, **kw: Lars(ps, lr=lr, weight_decay=0.01, trust_coefficient=0.1, **kw),
    "adagrad_norm": lambda ps, lr, **kw: AdaGradNorm(ps, lr=lr, **kw),
}
PATHS = {"fast": {}, "reference": {"foreach": False}, "foreach": {"cpu_block": 0}}
# every optimizer on both paths, Lamb also on its foreach path without CPU pieces
CASES = [(n, p) for n in sorted(BUILDERS) for p in PATHS if p != "foreach" or n.startswith("lamb")]


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    shapes = [(70_000,), (9, 5), (4,)]
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        for s in shapes
    ]


def _run_lr(build, lr, kw, steps=4, dtype=torch.float32, schedule=None):
    ps = _params(dtype)
    opt = build(ps, lr, **kw)
    for s in range(steps):
        gen = torch.Generator().manual_seed(50 + s)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        opt.step()
        if schedule is not None:
            schedule(opt, s)
    return ps


@pytest.mark.parametrize(("name", "path"), CASES)
def test_tensor_lr_gives_the_float_lr_numbers(name, path):
    kw = PATHS[path]
    build = BUILDERS[name]
    lr_t = torch.tensor(0.03, dtype=torch.float64)  # exactly the float 0.03
    floats = _run_lr(build, 0.03, kw)
    tensors = _run_lr(build, lr_t, kw)
    for a, b in zip(floats, tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (floats[1].detach() - _params()[1]).abs().max() > 1e-4  # it moved

    # a scheduler changes the tensor in place, as torch's LRScheduler does with a tensor lr
    def halve(opt, s):
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(0.03 / 2 ** (s + 1))
            else:
                group["lr"] = 0.03 / 2 ** (s + 1)

    floats = _run_lr(build, 0.03, kw, schedule=halve)
    tensors = _run_lr(build, torch.tensor(0.03, dtype=torch.float64), kw, schedule=halve)
    for a, b in zip(floats, tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "path"), CASES)
def test_tensor_lr_kept_as_tensor_matches_float(name, path, monkeypatch):
    """The path a device lr or a compiled step takes: lr stays a 0-dim tensor in the math."""
    kw = PATHS[path]

    def keep_tensor(lr):
        return lr.detach().reshape(()) if isinstance(lr, torch.Tensor) else lr

    for module in (lamb_module, lars_module, adagrad_norm_module):
        monkeypatch.setattr(module, "step_lr", keep_tensor)
    floats = _run_lr(BUILDERS[name], 0.03, kw)
    tensors = _run_lr(BUILDERS[name], torch.tensor(0.03, dtype=torch.float64), kw)
    for a, b in zip(floats, tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    tensors16 = _run_lr(BUILDERS[name], torch.tensor(0.03), kw, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in tensors16)


@pytest.mark.parametrize("cls", [Lamb, Lars, AdaGradNorm])
def test_tensor_lr_validated(cls):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="one element"):
        cls(p, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"lr must be in \[0.0, inf\)"):
        cls(p, lr=torch.tensor(-0.1))
    lr = torch.tensor([0.1])  # a one-element tensor is accepted and kept as the same object
    opt = cls(p, lr=lr)
    assert opt.param_groups[0]["lr"] is lr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lamb_decoupled", "lars", "adagrad_norm"])
def test_compiled_step_follows_a_changing_tensor_lr_without_recompiling(name):
    """What a tensor lr is for: torch.compile of step() with an lr a scheduler changes."""
    import torch._dynamo

    kw = {"cpu_block": 0} if name.startswith("lamb") else {}
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    a, b = [x0.clone().requires_grad_()], [x0.clone().requires_grad_()]
    lr = torch.tensor(0.05, dtype=torch.float64)
    eager, compiled = BUILDERS[name](a, 0.05, **kw), BUILDERS[name](b, lr, **kw)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(compiled.step)
    for s in range(4):
        g = torch.randn(8, 3, generator=torch.Generator().manual_seed(s))
        a[0].grad, b[0].grad = g.clone(), g.clone()
        eager.param_groups[0]["lr"] = 0.05 / (s + 1)
        lr.fill_(0.05 / (s + 1))
        eager.step()
        if s == 0:
            compiled.step()  # the state is created eagerly, one graph serves every later step
            continue
        try:
            step()
        except Exception as exc:  # no C++ toolchain or an inductor limitation on this machine
            pytest.skip(f"torch.compile of {name}.step failed here: {type(exc).__name__}: {exc}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    assert (b[0].detach() - x0).abs().max() > 0.01


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "path"), CASES)
def test_cuda_tensor_lr_matches_float(name, path):
    kw = PATHS[path]

    def run(lr):
        ps = [p.detach().cuda().requires_grad_() for p in _params()]
        opt = BUILDERS[name](ps, lr, **kw)
        for s in range(4):
            gen = torch.Generator().manual_seed(50 + s)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).float().cuda()
            opt.step()
        return ps

    for a, b in zip(run(0.03), run(torch.tensor(0.03, device="cuda")), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- 7. a plain-number step ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{}, {"cpu_block": 0}, {"foreach": False}], ids=["fast", "foreach", "reference"]
)
def test_lamb_loads_plain_number_step(kw):
    a = _params()
    opt = Lamb(a, lr=0.01, **kw)
    for s in range(3):
        for p in a:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
        opt.step()
    sd = opt.state_dict()
    old = copy.deepcopy(sd)
    for st in old["state"].values():
        st["step"] = int(st["step"].item())  # as older torch and other libraries saved it
    b = [p.detach().clone().requires_grad_() for p in a]
    opt2 = Lamb(b, lr=0.01, **kw)
    opt2.load_state_dict(old)
    st = opt2.state[b[0]]["step"]
    assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.item() == 3
    for s in range(3, 5):
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
            q.grad = p.grad.clone()
        opt.step()
        opt2.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# -- 8. Lamb's global clipping norm in float64 ------------------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
def test_lamb_float64_max_grad_norm_matches_timm(foreach):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(7, 5), (5,), (200,)]]
    a = [b.clone().requires_grad_() for b in base]
    b = [b.clone().requires_grad_() for b in base]
    ours = Lamb(a, lr=1e-2, max_grad_norm=1.0, foreach=foreach, cpu_block=64)
    theirs = TimmLamb(b, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, always_adapt=True)
    for s in range(10):
        g = torch.Generator().manual_seed(200 + s)
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 3.0  # clip active
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q, start in zip(a, b, base, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        assert (p.detach() - start).abs().max() > 1e-3
